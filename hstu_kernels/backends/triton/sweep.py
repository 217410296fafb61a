"""Time the attention kernel's configs on the benchmark shapes: a tuning aid for the GPU.

``python -m hstu_kernels.backends.triton.sweep [--cases jagged256,delta256,...]`` prints, for
each case, every candidate config (the TMA ones included; for the paged cases also without the
page prefetch, at other page sizes and as stream-K) with the median time of its CUDA-graph
replay (as the autotuner times it) and the largest difference from the first config's output.
Not used by the library itself.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from hstu_kernels.backends.triton import attention as attn
from hstu_kernels.backends.triton.config import Config, candidates, default_config
from hstu_kernels.testing import make_paged_case

CASES = {
    # name: (batch, heads, head_dim, history, new, targets, paged)
    "jagged256": (8, 4, 256, 4096, 4096, 256, False),
    "jagged128": (8, 8, 128, 4096, 4096, 256, False),
    "delta256": (8, 4, 256, 4096, 128, 256, True),
    "delta128": (8, 8, 128, 4096, 128, 256, True),
    "delta256b1": (1, 4, 256, 4096, 128, 256, True),
    "delta256b4": (4, 4, 256, 4096, 128, 256, True),
    "delta256t0": (8, 4, 256, 4096, 128, 0, True),
    "jagged256b1": (1, 4, 256, 4096, 4096, 256, False),
}


def _configs(name: str, head_dim: int) -> list[tuple[Config, bool, int]]:
    """(config, fast SiLU, page size) to time on a case."""
    page_size = None if name.startswith("jagged") else 32
    out = [(c, True, 32) for c in candidates(head_dim, page_size)]
    base = default_config(head_dim, page_size, False)
    if name.startswith("delta"):
        out.append((replace(base, prefetch=False), True, 32))
        out += [(base, True, 16), (base, True, 128)]  # 4 lookups / one lookup per tile
        out += [(replace(c, stream_k=True), True, 32) for c in candidates(head_dim, page_size)]
    return out


def _sweep_case(name: str) -> None:
    from hstu_kernels.backends.triton.ops import _time_config

    b, heads, d, h, n, t, paged = CASES[name]
    cases: dict[int, object] = {}
    first = None
    for cfg, fast, page_size in _configs(name, d):
        if page_size not in cases:
            cases[page_size] = make_paged_case(
                [h] * b, [n] * b, [t] * b, page_size=page_size, heads=heads, head_dim=d,
                dtype=torch.bfloat16, device="cuda", seed=0, spare_pages=1,
            )  # fmt: skip
        pc = cases[page_size]
        if paged:
            q, k, v, cu, rows = pc.q, pc.k_new, pc.v_new, pc.cu_q, n + t
            kw = dict(kv_cache=pc.kv_cache, page_table=pc.page_table)
        else:
            q, k, v, cu, rows = pc.q_full, pc.k_full, pc.v_full, pc.cu_full, h + t
            kw = {}

        def call(out, q=q, k=k, v=v, cu=cu, rows=rows, kw=kw, pc=pc, cfg=cfg, fast=fast):
            attn.launch(q, k, v, cu, pc.num_targets, rows, d**-0.5, h + t, out, cfg,
                        fast_silu=fast, **kw)  # fmt: skip

        out = torch.full_like(q, float("nan"))
        t0 = time.perf_counter()
        try:
            call(out)
            torch.cuda.synchronize()
        except Exception as exc:
            print(f"{name:11} {cfg} fast={fast}: failed {type(exc).__name__}: {exc}"[:200])
            continue
        compile_s = time.perf_counter() - t0
        if first is None:
            first = out.float()
        diff = (out.float() - first).abs().max().item()
        ms = _time_config(lambda c: call(out), cfg)  # noqa: B023
        print(
            f"{name:11} ps={page_size:3} bm={cfg.block_m:3} bn={cfg.block_n:3} "
            f"w={cfg.num_warps} st={cfg.num_stages} split={cfg.splits} sk={int(cfg.stream_k)} "
            f"pf={int(cfg.prefetch)} tma={int(cfg.tma)} fast={int(fast)}  {ms * 1e3:8.1f} us  "
            f"diff={diff:.2e} nan={int(out.isnan().sum())} compile={compile_s:.1f}s",
            flush=True,
        )
    cases.clear()


def sweep(names: list[str]) -> None:
    """Print the time of each config on each named case."""
    for name in names:
        _sweep_case(name)
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    sweep(args.cases.split(","))


if __name__ == "__main__":
    main()
