"""The cache append, taken over by the projection GEMM's epilogue.

In the cached path the new history ``k``/``v`` rows go into the paged cache. As its own
kernel (``append_kv``) that re-reads ``k`` and ``v`` and costs a launch; the projection
(:func:`~hstu_kernels.backends.triton.projection.silu_gemm`) can instead store the ``k`` and ``v`` tiles
into their pages from its epilogue as well (:class:`CacheAppend`): on an H100 at 384 rows
the projection takes ~1 µs longer and the ~2.5 µs append kernel goes away.

:func:`project_appending` picks, per shape and timed once (as CUDA-graph replays, so that
the host overhead of launches does not count), between that and the separate path
(``project_silu`` then the caller's append), so it is never slower than the separate path by
more than timing noise. ``HSTU_FUSED_APPEND=0`` always takes the separate path.

(Folding the input LayerNorm into the same GEMM, with the row statistics taken from its K
loop, was built and measured too: that GEMM took ~4 µs longer than the plain one at 384 and
1024 rows, more than the 3-4 µs LayerNorm kernel it removed, so it is not here; see
docs/block.md.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hstu_kernels import settings
from hstu_kernels.backends.triton import projection as P
from hstu_kernels.backends.triton.launcher import cannot_compile
from hstu_kernels.backends.triton.timing import replayed_ms
from hstu_kernels.tuning import TuningCache
from hstu_kernels.types import CacheAppend

__all__ = ["CHOICES", "SEPARATE", "project_appending"]

SEPARATE = "separate"  # project_silu, then the caller's append

# shape key -> the winner of its timing, per card (kept on disk like the projection's;
# CHOICES.pin(choice) fixes it)
CHOICES = TuningCache("projection-append", encode=P.encode_choice, decode=P.decode_choice)


def _enabled() -> bool:
    return settings.get().fused_append


_shape_key = P._shape_key  # the projection's buckets


def _can_time(h: torch.Tensor) -> bool:
    """Whether candidates may be timed now: on CUDA, outside a graph capture, and unless
    ``HSTU_PROJECTION_AUTOTUNE=0``."""
    if h.device.type != "cuda" or P._capturing(h):
        return False
    return settings.get().projection_autotune


def project_appending(
    h: torch.Tensor,
    weight: torch.Tensor,
    append: CacheAppend,
    separate: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """``SiLU(h @ weight)`` as ``[4, T, inner]`` (``project_silu``'s layout), with the new
    ``k``/``v`` rows written into ``append``'s cache.

    ``separate()`` does the same the separate way (``project_silu``, then the append op); it
    runs wherever the fused kernel does not (CPU, fp32, ``HSTU_FUSED_APPEND=0``, a failure,
    a shape not timed yet inside a graph capture) and is timed against the fused configs the
    first time a shape is seen.
    """
    if not (_enabled() and P._triton_ok(h) and P._fused_ok(h)):
        return separate()
    key = _shape_key(h, weight)
    choice = CHOICES.get(h.device, key)
    if choice is None:
        if not _can_time(h):
            return separate()  # untimed: the path that was there before
        choice = _time(h, weight, append, separate)
        CHOICES.put(h.device, key, choice)
    if choice == SEPARATE:
        return separate()
    try:
        return P.fused_project(h, weight, choice, append=append)
    except Exception as exc:
        if P._capturing(h) or not cannot_compile(exc):
            raise
        CHOICES.put(h.device, key, SEPARATE, persist=False)
        return separate()


def _time(
    h: torch.Tensor,
    weight: torch.Tensor,
    append: CacheAppend,
    separate: Callable[[], torch.Tensor],
) -> object:
    """The fastest of the separate path and the fused configs (pointer and, where TMA can
    run, TMA ones) that agree with it. Every candidate writes the same rows of the cache,
    and the caller's real call comes after, so the cache ends up holding what that call
    returns."""
    ref = separate()
    times = {SEPARATE: replayed_ms(separate)}
    for config in P._candidates(h, weight):

        def run(c=config) -> torch.Tensor:
            return P.fused_project(h, weight, c, append=append)

        try:
            ok = P._close_enough(run(), ref)
        except Exception as exc:  # does not compile here: skip it
            if not (isinstance(exc, ValueError) or cannot_compile(exc)):
                raise
            continue
        if ok:
            times[config] = replayed_ms(run)
    return min(times, key=times.get)
