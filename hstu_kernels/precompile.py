"""Warm the disk caches for this GPU's default backends: ``python -m hstu_kernels.precompile``.

For the current GPU's arch it compiles, in parallel processes, every variant of the CUTLASS DSL
kernels the dispatcher defaults to there (Hopper: the wgmma kernel; Blackwell: the tcgen05
kernel; elsewhere: none, Triton is the default) for the given dtypes and head dims (with and
without contexts/window where that is a variant of its own), into the
DSL's disk cache (``settings.cutedsl_cache``), and runs one small call of each Triton kernel per
dtype and head dim, which fills Triton's own cache. A later process then loads its kernels in
milliseconds instead of compiling them (seconds each). ``--arch`` compiles the DSL kernels for
another arch (no GPU needed); ``--backend`` picks DSL backends by name (``cutedsl-ampere``
too). The Triton autotuner's choices are remembered on disk by the calls themselves
(:mod:`hstu_kernels.tuning`).
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# arch -> the DSL backends the dispatcher defaults to there
DEFAULT_DSL = {"sm_90": ("cutedsl-hopper",), "sm_100": ("cutedsl-blackwell",),
               "sm_103": ("cutedsl-blackwell",)}  # fmt: skip
# DSL backends with a separately compiled contexts/window variant
WINDOWED = ("cutedsl-hopper",)
HEAD_DIMS = {"cutedsl-hopper": (64, 128, 256), "cutedsl-blackwell": (64, 128),
             "cutedsl-ampere": (64, 128, 256)}  # fmt: skip


def _compile(job: tuple[str, str, str, int, bool, bool]) -> tuple[str, float, str]:
    """One DSL variant into the disk cache: ``(label, seconds, "compile" | "disk")``."""
    backend, arch, dtype, head_dim, paged, windowed = job
    from hstu_kernels.backends.cutedsl import compile as cc

    cc.clear_memory_cache()
    start = time.perf_counter()
    torch_dtype = _DTYPES[dtype]
    if backend in ("cutedsl-hopper", "cutedsl-blackwell"):
        from hstu_kernels.backends.cutedsl import tma_variants

        family = backend.removeprefix("cutedsl-")
        tma_variants.get_kernel(family, arch, torch_dtype, head_dim, paged=paged,
                                windowed=windowed)  # fmt: skip
    else:
        from hstu_kernels.backends.cutedsl import ampere

        for split in (False, True):
            ampere.get_kernel(arch, torch_dtype, head_dim, 32 if paged else 0, paged, split)
    sources = {s["source"] for s in cc.compile_stats().values()}
    label = f"{backend} {arch} {dtype} D={head_dim} {'paged' if paged else 'jagged'}"
    label += " contexts/window" if windowed else ""
    return label, time.perf_counter() - start, "/".join(sorted(sources))


def dsl_jobs(arch: str, backends: list[str], dtypes: list[str], head_dims: list[int] | None):
    return [
        (b, arch, dt, d, paged, windowed)
        for b in backends
        for dt in dtypes
        for d in (head_dims or HEAD_DIMS[b])
        if d in HEAD_DIMS[b]
        for paged in (True, False)
        for windowed in ((False, True) if b in WINDOWED else (False,))
    ]


def warm_triton(dtypes: list[str], head_dims: list[int], page_size: int = 32) -> list[str]:
    """One small call of each Triton kernel per dtype and head dim (fills Triton's cache)."""
    import hstu_kernels as hk
    from hstu_kernels.testing import make_paged_case

    done = []
    for dt in dtypes:
        for d in head_dims:
            c = make_paged_case([70, 45], [8, 5], [8, 3], page_size=page_size, heads=2,
                                head_dim=d, dtype=_DTYPES[dt], device="cuda", seed=0)  # fmt: skip
            hk.append_kv(c.kv_cache, c.page_table, c.k_new, c.v_new, c.cu_q,
                         num_targets=c.num_targets, backend="triton")  # fmt: skip
            hk.paged_hstu_attention(c.q, c.k_new, c.v_new, c.kv_cache, c.page_table, c.cu_q,
                                    num_targets=c.num_targets, backend="triton")  # fmt: skip
            hk.hstu_attention(c.q_full, c.k_full, c.v_full, c.cu_full,
                              num_targets=c.num_targets, backend="triton")  # fmt: skip
            done.append(f"triton {dt} D={d}")
    torch.cuda.synchronize()
    return done


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hstu_kernels.precompile",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("--arch", default=None, help="sm_XY (default: this machine's GPU)")
    parser.add_argument("--backend", action="append", default=None,
                        help="DSL backend to compile (default: this arch's defaults)")  # fmt: skip
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument("--head-dims", default=None, help="e.g. 128,256 (default: all served)")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    args = parser.parse_args(argv)
    arch = args.arch
    if arch is None:
        if not torch.cuda.is_available():
            parser.error("no GPU here: give --arch to compile the DSL kernels for one")
        major, minor = torch.cuda.get_device_capability()
        arch = f"sm_{major}{minor}"
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    head_dims = [int(d) for d in args.head_dims.split(",")] if args.head_dims else None
    backends = args.backend or list(DEFAULT_DSL.get(arch.rstrip("a"), ()))
    jobs = dsl_jobs(arch, backends, dtypes, head_dims)
    if jobs:
        # spawn: the parent may have initialised CUDA, which a forked child cannot use
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=context) as pool:
            for label, seconds, source in pool.map(_compile, jobs):
                print(f"{label}: {source} {seconds:.1f} s", flush=True)
    if not args.no_triton and torch.cuda.is_available() and args.arch is None:
        for label in warm_triton(dtypes, head_dims or [64, 128, 256]):
            print(f"{label}: warmed", flush=True)


if __name__ == "__main__":
    main()
