"""The Triton backend's op implementations and planners: pick a config (autotuned once per
key, remembered on disk) and launch.

Imported only when a Triton op is first called or planned, so that discovering the backend
never imports Triton.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from hstu_kernels import settings
from hstu_kernels.backends.triton import append as _append
from hstu_kernels.backends.triton import attention as _attn
from hstu_kernels.backends.triton.config import (
    Config,
    autotune_enabled,
    candidates,
    default_config,
    tuning_key,
)
from hstu_kernels.backends.triton.launcher import cannot_compile
from hstu_kernels.backends.triton.timing import replayed_ms
from hstu_kernels.tuning import TuningCache
from hstu_kernels.types import AttentionSpec, PageTable, PlannedBatch

__all__ = [
    "append_kv",
    "jagged",
    "paged",
    "paged_partials",
    "plan_append_kv",
    "plan_jagged",
    "plan_paged",
    "plan_paged_partials",
    "tuned_configs",
]

_LOCK = threading.Lock()
_TUNED = TuningCache("triton-attention", encode=lambda c: c.__dict__, decode=lambda d: Config(**d))


def tuned_configs() -> dict[tuple, Config]:
    """The configs chosen so far in this process, by tuning key (a copy)."""
    return _TUNED.items()


def _untunable(device: torch.device, dtype: torch.dtype) -> bool:
    # fp32 (accepted for exactness, not speed) takes the small tile set: its tiles are twice as
    # large in bytes and must fit every card's shared memory.
    return settings.get().triton_interpret or device.type != "cuda" or dtype == torch.float32


def _known_config(b: PlannedBatch, page_size: int | None) -> Config | None:
    """The config of this batch's tuning key if it is decided without timing (interpreter,
    fp32, autotuning off, or tuned before: in this process or on disk), else ``None``."""
    if _untunable(b.device, b.dtype):
        return default_config(b.head_dim, page_size, interpret=True)
    fallback = default_config(b.head_dim, page_size, interpret=False)
    if not autotune_enabled():
        return fallback
    return _TUNED.get(b.device, _key(b, page_size))


def _key(b: PlannedBatch, page_size: int | None) -> tuple:
    return tuning_key(b.head_dim, b.dtype, page_size, b.max_seqlen, b.batch * b.heads,
                      b.kv_dtype)  # fmt: skip


def _tune(run: Callable[[Config], object], b: PlannedBatch, page_size: int | None) -> Config:
    """Time every candidate config on the call's own tensors (``run(cfg)``) and keep the
    fastest for the key; inside a CUDA graph capture (nothing can be timed) the default."""
    fallback = default_config(b.head_dim, page_size, interpret=False)
    if torch.cuda.is_current_stream_capturing():
        return fallback
    key = _key(b, page_size)
    with _LOCK:
        known = _TUNED.get(b.device, key)
        if known is not None:
            return known
        best, best_ms = fallback, float("inf")
        for cfg in candidates(b.head_dim, page_size, fp8=b.kv_dtype is not None):
            try:
                ms = _time_config(run, cfg)
            except Exception as exc:  # a config that does not fit this card or shape: skipped
                if not (isinstance(exc, ValueError) or cannot_compile(exc)):
                    raise
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
        _TUNED.put(b.device, key, best)
        return best


def _time_config(run: Callable[[Config], object], cfg: Config) -> float:
    """Median time of one launch with ``cfg``, replayed from a CUDA graph."""
    return replayed_ms(lambda: run(cfg))


class _PlannedAttention:
    """The attention of one planned batch: its :class:`~attention.AttentionLaunch` for the
    tuned config, made at once when the config is known, else on the first call (which tunes
    on that call's tensors)."""

    def __init__(self, b: PlannedBatch) -> None:
        self.batch = b
        self.paged = b.page_table is not None
        self.page_size = b.page_size if self.paged else None
        config = _known_config(b, self.page_size)
        self.launch = None if config is None else self._plan(config)

    def _plan(self, config: Config) -> _attn.AttentionLaunch:
        b = self.batch
        return _attn.AttentionLaunch(
            config, rows=b.rows, heads=b.heads, head_dim=b.head_dim, dtype=b.dtype,
            device=b.device, cu_seqlens=b.cu_seqlens, num_targets=b.num_targets,
            max_seqlen=b.max_seqlen, alpha=b.spec.alpha, scaling_seqlen=b.spec.scaling_seqlen,
            page_table=b.page_table, page_size=self.page_size,
            num_contexts=b.spec.num_contexts, max_attn_len=b.spec.max_attn_len,
            kv_fp8=b.kv_dtype is not None,
        )  # fmt: skip

    def __call__(
        self, q, k, v, kv_cache, out, kv_scales=None, sum_splits: bool = True
    ) -> torch.Tensor | None:
        launch = self.launch
        if launch is None:

            def run(cfg: Config) -> object:
                return self._plan(cfg)(q, k, v, kv_cache, out, True, kv_scales)

            launch = self._plan(_tune(run, self.batch, self.page_size))
            if not torch.cuda.is_current_stream_capturing():
                self.launch = launch  # inside a capture: the default, not remembered
        return launch(q, k, v, kv_cache, out, sum_splits, kv_scales)


def plan_jagged(b: PlannedBatch) -> Callable:
    """The ``jagged`` planner: ``run(q, k, v, out)``."""
    attention = _PlannedAttention(b)
    return lambda q, k, v, out: attention(q, k, v, None, out)


# The last batch planned and its attention: a plan asks for its paged and partials runs one
# after the other, and both are served by one launch plan.
_LAST: list = [None, None]


def _attention_of(b: PlannedBatch) -> _PlannedAttention:
    last, attention = _LAST
    if last is not b:
        attention = _PlannedAttention(b)
        _LAST[:] = b, attention
    return attention


def plan_paged(b: PlannedBatch) -> Callable:
    """The ``paged`` planner: ``run(q, k_new, v_new, kv_cache, out[, kv_scales])``."""
    return _attention_of(b)


def plan_paged_partials(b: PlannedBatch) -> Callable:
    """The ``paged_partials`` planner: ``run(q, k_new, v_new, kv_cache)`` returns an even KV
    split's fp32 partials ``[S, *q.shape]``, unsummed, else the output in ``q``'s dtype."""
    attention = _attention_of(b)

    def run(q, k_new, v_new, kv_cache, kv_scales=None) -> torch.Tensor:
        out = torch.empty_like(q)
        partials = attention(q, k_new, v_new, kv_cache, out, kv_scales, sum_splits=False)
        return out if partials is None else partials

    return run


def plan_append_kv(b: PlannedBatch) -> Callable:
    """The ``append_kv`` planner: ``run(kv_cache, k, v[, kv_scales])``."""
    return _append.AppendLaunch(b.page_table, b.cu_seqlens, b.num_targets, b.rows, b.heads,
                                b.head_dim, b.page_size, fp8=b.kv_dtype is not None)  # fmt: skip


def _planned_batch(op, q, cu, nt, max_seqlen, spec, page_table=None, page_size=None,
                   kv_scales=None):  # fmt: skip
    heads, head_dim = q.shape[1], q.shape[2]
    kv_dtype = None if kv_scales is None else torch.float8_e4m3fn
    return PlannedBatch(op, q.device, q.dtype, heads, head_dim, cu.shape[0] - 1, q.shape[0], cu,
                        nt, max_seqlen, spec, page_table, page_size, kv_dtype)  # fmt: skip


def jagged(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    num_targets: torch.Tensor,
    max_seqlen: int,
    spec: AttentionSpec,
    out: torch.Tensor,
) -> None:
    """Jagged HSTU attention (the dispatcher's ``jagged`` op): plan, then run once."""
    plan_jagged(_planned_batch("jagged", q, cu_seqlens, num_targets, max_seqlen, spec))(
        q, k, v, out
    )


def paged(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    kv_cache: torch.Tensor,
    page_table: PageTable,
    cu_seqlens_q: torch.Tensor,
    num_targets: torch.Tensor,
    max_seqlen_q: int,
    spec: AttentionSpec,
    out: torch.Tensor,
    kv_scales: torch.Tensor | None = None,
) -> None:
    """Paged (delta) HSTU attention (the dispatcher's ``paged`` op): plan, then run once."""
    b = _planned_batch("paged", q, cu_seqlens_q, num_targets, max_seqlen_q, spec, page_table,
                       kv_cache.shape[2], kv_scales)  # fmt: skip
    plan_paged(b)(q, k_new, v_new, kv_cache, out, kv_scales)


def paged_partials(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    kv_cache: torch.Tensor,
    page_table: PageTable,
    cu_seqlens_q: torch.Tensor,
    num_targets: torch.Tensor,
    max_seqlen_q: int,
    spec: AttentionSpec,
    kv_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`paged` without ``out`` (the dispatcher's optional ``paged_partials`` op)."""
    b = _planned_batch("paged", q, cu_seqlens_q, num_targets, max_seqlen_q, spec, page_table,
                       kv_cache.shape[2], kv_scales)  # fmt: skip
    return plan_paged_partials(b)(q, k_new, v_new, kv_cache, kv_scales)


def append_kv(
    kv_cache: torch.Tensor,
    page_table: PageTable,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    num_targets: torch.Tensor,
    kv_scales: torch.Tensor | None = None,
) -> None:
    """Scatter new history K/V into the pages (the dispatcher's ``append_kv`` op; an FP8 pool
    quantised, with its ``kv_scales``)."""
    _append.append_kv(kv_cache, page_table, k, v, cu_seqlens, num_targets, kv_scales)
