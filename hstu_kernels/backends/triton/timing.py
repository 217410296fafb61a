"""The one timer of the Triton backend's autotuners (attention configs, projection GEMM
configs, the fused cache append): median GPU milliseconds of a call, after a warm-up call.

:func:`replayed_ms` times the call replayed from a CUDA graph, so that host overhead (which
dominates small batches when launched eagerly, tens of µs per Triton launch) does not pick the
winner; a call that cannot be captured is timed eagerly (:func:`eager_ms`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["eager_ms", "replayed_ms"]

WARMUP_MS, REP_MS = 5, 25


def eager_ms(fn: Callable[[], object]) -> float:
    """Median time (ms) of ``fn`` launched eagerly. The first call may still compile, allocate
    or load a cuBLAS kernel, which skewed ``do_bench``'s estimate: it is made, and waited for,
    first."""
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    return do_bench(fn, WARMUP_MS, REP_MS, return_mode="median")


def replayed_ms(fn: Callable[[], object]) -> float:
    """Median time (ms) of ``fn`` replayed from a CUDA graph (compiled by a first, eager call
    outside the capture); eagerly where it cannot be captured."""
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception:  # not capturable here: time it eagerly
        return eager_ms(fn)
    try:
        return do_bench(graph.replay, WARMUP_MS, REP_MS, return_mode="median")
    finally:
        del graph
