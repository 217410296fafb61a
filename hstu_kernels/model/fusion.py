"""The input LayerNorm and the cache append, taken over by the projection GEMM.

In the cached path at small batches every kernel of a layer is short (a few µs) and each
launch boundary costs about a microsecond more, so three kernels that only move data are
folded into the projection (:func:`~hstu_kernels.model.projection.silu_gemm`):

- the input LayerNorm: ``LayerNorm(x) @ W = rstd * (x @ W') - rstd * mean * colsum(W')
  + beta @ W`` with ``W' = diag(gamma) W`` (:func:`fold_layernorm`); the GEMM reads every
  row of ``x`` whole in its K loop anyway, so it takes the row statistics from those loads;
- ``append_kv``: the ``k`` and ``v`` tiles of the new history rows are stored into their
  pages from the GEMM's epilogue as well (:class:`CacheAppend`).

:func:`project_normed` picks, per shape and timed once (like ``project_silu``), between that
fused kernel and the separate path (LayerNorm kernel, ``project_silu``, the caller's append),
so it is never slower than the separate path by more than timing noise.
``HSTU_FUSED_INPUT=0`` always takes the separate path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hstu_kernels.types import PageTable

__all__ = ["CacheAppend", "FoldedNorm", "SEPARATE", "fold_layernorm", "project_normed"]

FUSED_INPUT_ENV = "HSTU_FUSED_INPUT"
SEPARATE = "separate"  # LayerNorm kernel + project_silu + the caller's append

_CHOICES: dict[tuple, object] = {}  # shape key -> the winner of its timing
TIMINGS: dict[tuple, dict] = {}  # shape key -> every candidate's time (ms), for reports


@dataclass(frozen=True)
class FoldedNorm:
    """A LayerNorm folded into the projection weight (see :func:`fold_layernorm`).

    ``weight [K, N]``: ``diag(gamma) @ W`` in W's dtype; ``colsum [N]``: the column sums of
    that rounded weight (fp32, so the mean's term cancels exactly); ``bias [N]``:
    ``beta @ W`` (fp32); ``eps``: the LayerNorm's.
    """

    weight: torch.Tensor
    colsum: torch.Tensor
    bias: torch.Tensor
    eps: float


def fold_layernorm(
    gamma: torch.Tensor, beta: torch.Tensor, weight: torch.Tensor, eps: float
) -> FoldedNorm:
    """Fold ``LayerNorm(., gamma, beta, eps)`` in front of ``weight [K, N]``."""
    if gamma.shape != (weight.shape[0],) or beta.shape != gamma.shape:
        raise ValueError(
            f"gamma, beta: expected [{weight.shape[0]}], got {tuple(gamma.shape)} and "
            f"{tuple(beta.shape)}"
        )
    w32 = weight.float()
    folded = (gamma.float()[:, None] * w32).to(weight.dtype).contiguous()
    return FoldedNorm(
        weight=folded,
        colsum=folded.float().sum(0).contiguous(),
        bias=(beta.float() @ w32).contiguous(),
        eps=float(eps),
    )


@dataclass(frozen=True)
class CacheAppend:
    """Where the projection's epilogue writes the new history ``k``/``v`` rows: the layer's
    cache ``kv_cache [num_pages, 2, page_size, heads, D]`` through ``page_table``, for the
    packed rows ``cu_seqlens [B+1]`` of which the last ``num_targets[b]`` of each sequence
    are targets (not written). The same contract as :func:`hstu_kernels.append_kv`."""

    kv_cache: torch.Tensor
    page_table: PageTable
    cu_seqlens: torch.Tensor
    num_targets: torch.Tensor

    @property
    def batch(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    def check(self, tokens: int, inner: int, h: torch.Tensor) -> None:
        """Raise ValueError/TypeError if the kernel cannot write this cache for ``h``."""
        kv = self.kv_cache
        if kv.dim() != 5 or kv.shape[1] != 2 or kv.shape[3] * kv.shape[4] != inner:
            raise ValueError(
                f"kv_cache: expected [pages, 2, page_size, heads, D] with heads*D = {inner}, "
                f"got {tuple(kv.shape)}"
            )
        if kv.stride(4) != 1 or kv.stride(3) != kv.shape[4]:
            raise ValueError(f"kv_cache: each slot's [heads, D] must be contiguous, got "
                             f"strides {kv.stride()}")  # fmt: skip
        if kv.dtype != h.dtype or kv.device != h.device:
            raise TypeError(
                f"kv_cache: expected {h.dtype} on {h.device}, got {kv.dtype} on {kv.device}"
            )
        if self.batch < 1 or self.num_targets.shape != (self.batch,):
            raise ValueError("cu_seqlens, num_targets: expected [B+1] and [B], B >= 1")
        if self.page_table.page_ids.numel() == 0:
            raise ValueError("page_table.page_ids: expected at least one page per sequence")


def _enabled() -> bool:
    return os.environ.get(FUSED_INPUT_ENV, "1") != "0"


def _shape_key(x: torch.Tensor, weight: torch.Tensor, appends: bool) -> tuple:
    bucket = 1 << (max(1, x.shape[0]) - 1).bit_length()
    return (x.device, bucket, x.shape[1], weight.shape[1], x.dtype, appends)


def _can_time(x: torch.Tensor) -> bool:
    """Whether candidates may be timed now: on CUDA, outside a graph capture, and unless
    ``HSTU_PROJECTION_AUTOTUNE=0``."""
    from hstu_kernels.model import projection as P

    if x.device.type != "cuda" or P._capturing(x):
        return False
    return os.environ.get(P.AUTOTUNE_ENV) != "0"


def project_normed(
    x: torch.Tensor,
    fold: Callable[[], FoldedNorm],
    separate: Callable[[], torch.Tensor],
    *,
    append: CacheAppend | None = None,
) -> torch.Tensor:
    """``SiLU(LayerNorm(x) @ W)`` as ``[4, T, inner]`` (``project_silu``'s layout), with the
    new ``k``/``v`` rows appended to ``append``'s cache if given.

    ``fold()`` gives the folded LayerNorm (asked only when the fused kernel may run).
    ``separate()`` computes the same thing the separate way (and appends, if ``append`` is
    given); it runs wherever the fused kernel does not (CPU, fp32, ``HSTU_FUSED_INPUT=0``, a
    failure) and is timed against the fused configs the first time a shape is seen.
    """
    from hstu_kernels.model import projection as P

    if not (_enabled() and P._triton_ok(x) and P._fused_ok(x)):
        return separate()
    fold = fold()
    inner = fold.weight.shape[1] // P.SLOTS
    key = _shape_key(x, fold.weight, append is not None)
    choice = _CHOICES.get(key)
    if choice is None:
        if not _can_time(x):
            return separate()  # untimed: the path that was there before
        choice = _time(x, fold, separate, append, inner)
        _CHOICES[key] = choice
    if choice == SEPARATE:
        return separate()
    try:
        return P.silu_gemm(x, fold.weight, choice, norm=fold, append=append)
    except Exception:
        if P._capturing(x):
            raise
        _CHOICES[key] = SEPARATE
        return separate()


def _time(
    x: torch.Tensor,
    fold: FoldedNorm,
    separate: Callable[[], torch.Tensor],
    append: CacheAppend | None,
    inner: int,
) -> object:
    """The fastest of the separate path and the fused pointer configs that agree with it.
    Every candidate writes the same rows of the cache, and the caller's real call comes
    after, so the cache ends up holding what that call returns."""
    from hstu_kernels.model import projection as P

    ref = separate()
    times = {SEPARATE: _graph_time(separate)}
    for config in P.CONFIGS:
        if not config.fits(inner):
            continue

        def run(c=config) -> torch.Tensor:
            return P.silu_gemm(x, fold.weight, c, norm=fold, append=append)

        try:
            ok = P._close_enough(run(), ref)
        except Exception:  # does not compile here: skip it
            continue
        if ok:
            times[config] = _graph_time(run)
    TIMINGS[_shape_key(x, fold.weight, append is not None)] = times
    return min(times, key=times.get)


def _graph_time(fn: Callable[[], object]) -> float:
    """Median GPU time (ms) of ``fn`` replayed from a CUDA graph: the separate path is three
    launches and the fused one a single launch, so timing them eagerly would weigh their
    host overhead (tens of µs per Triton launch), which a graph replay does not pay."""
    from triton.testing import do_bench

    from hstu_kernels.model import projection as P

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception:  # not capturable here: time it eagerly
        return P._bench(fn)
    try:
        return do_bench(graph.replay, 5, 25, return_mode="median")
    finally:
        del graph
