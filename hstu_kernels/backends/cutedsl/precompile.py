"""Warm the on-disk kernel cache: compile many variants in parallel processes.

``python -m hstu_kernels.backends.cutedsl.precompile --arch sm_90 --jobs 8 \\
    --variant bf16:128:32:paged --variant bf16:256:0:jagged ...``

Each variant is ``dtype:head_dim:page_size:KIND`` (KIND ``paged``, ``jagged``, ``paged-split`` or
``jagged-split``: the split-KV variants), optionally followed by
``:BM,BN,threads`` to compile a tile shape other than the default (tuning runs). A compile is single-threaded and
takes seconds; a deployment (or a test session) compiles its variants once here, and every
later process loads them from the cache (``compile.CACHE_ENV``) in milliseconds.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from hstu_kernels import settings

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parse_variant(text: str) -> tuple[torch.dtype, int, int, bool, bool]:
    """``"bf16:128:32:paged-split"`` -> ``(torch.bfloat16, 128, 32, True, True)`` (the
    arguments of ``ampere.get_kernel`` after the arch; a trailing tile field is not part of
    the result)."""
    dtype, head_dim, page_size, kind = text.split(":")[:4]
    kinds = ("paged", "jagged", "paged-split", "jagged-split")
    if dtype not in _DTYPES or kind not in kinds:
        raise ValueError(f"variant: expected dtype:head_dim:page_size:KIND, got {text!r}")
    split = kind.endswith("-split")
    return _DTYPES[dtype], int(head_dim), int(page_size), kind.startswith("paged"), split


def _compile_one(arch: str, text: str) -> tuple[str, float, str]:
    from hstu_kernels.backends.cutedsl import ampere
    from hstu_kernels.backends.cutedsl import compile as cc

    parts = text.split(":")
    tile = tuple(int(x) for x in parts[4].split(",")) if len(parts) > 4 else None
    settings.configure(cutedsl_tile=tile)  # this worker process only
    cc.clear_memory_cache()
    start = time.perf_counter()
    ampere.get_kernel(arch, *parse_variant(text))
    source = next(iter(cc.compile_stats().values()))["source"]
    return text, time.perf_counter() - start, source


def precompile(arch: str, variants: list[str], jobs: int) -> list[tuple[str, float, str]]:
    """Compile ``variants`` for ``arch`` into the disk cache with ``jobs`` processes;
    returns ``(variant, seconds, "compile" | "disk")`` for each."""
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile_one, [arch] * len(variants), variants))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=None, help="sm_XY (default: this machine's GPU)")
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--variant", action="append", required=True)
    args = parser.parse_args()
    arch = args.arch
    if arch is None:
        major, minor = torch.cuda.get_device_capability()
        arch = f"sm_{major}{minor}"
    for text, seconds, source in precompile(arch, args.variant, args.jobs):
        print(f"{arch} {text}: {source} {seconds:.1f}s")


if __name__ == "__main__":
    main()
