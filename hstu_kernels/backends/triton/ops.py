"""The Triton backend's op implementations: pick a config (autotuned once per key) and launch.

Imported only when a Triton op is first called, so that discovering the backend never imports
Triton.
"""

from __future__ import annotations

import os
import threading

import torch

from hstu_kernels.backends.triton import append as _append
from hstu_kernels.backends.triton import attention as _attn
from hstu_kernels.backends.triton.config import (
    Config,
    autotune_enabled,
    candidates,
    default_config,
    tuning_key,
)
from hstu_kernels.types import AttentionSpec, PageTable

__all__ = ["append_kv", "jagged", "paged", "paged_partials", "tuned_configs"]

_TUNED: dict[tuple, Config] = {}
_LOCK = threading.Lock()


def tuned_configs() -> dict[tuple, Config]:
    """The configs chosen so far, by tuning key (a copy)."""
    with _LOCK:
        return dict(_TUNED)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pick(run, q: torch.Tensor, batch: int, page_size: int | None, max_seqlen: int) -> Config:
    """The config for this call: tuned on first use of its key, else the fixed default."""
    head_dim = q.shape[2]
    if _interpreting() or q.device.type != "cuda" or q.dtype == torch.float32:
        # fp32 (accepted for exactness, not speed) takes the small tile set: its tiles are
        # twice as large in bytes and must fit every card's shared memory.
        return default_config(head_dim, page_size, interpret=True)
    fallback = default_config(head_dim, page_size, interpret=False)
    key = _key(q, batch, page_size, max_seqlen)
    if not autotune_enabled() or torch.cuda.is_current_stream_capturing():
        # A capture cannot time anything: reuse a config tuned before, else the default.
        with _LOCK:
            return _TUNED.get(key, fallback) if autotune_enabled() else fallback
    with _LOCK:
        if key in _TUNED:
            return _TUNED[key]
    best, best_ms = fallback, float("inf")
    for cfg in candidates(head_dim, page_size):
        try:
            ms = _time_config(run, cfg)
        except Exception:  # a config that does not fit this card (shared memory) is skipped
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    with _LOCK:
        _TUNED[key] = best
    return best


def _time_config(run, cfg: Config) -> float:
    """Median time of one launch, replayed from a CUDA graph so that host overhead (which
    dominates small batches in eager mode) does not pick the config."""
    from triton.testing import do_bench

    run(cfg)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            run(cfg)
    except Exception:
        return do_bench(lambda: run(cfg), warmup=5, rep=25, return_mode="median")
    try:
        return do_bench(graph.replay, warmup=5, rep=25, return_mode="median")
    finally:
        del graph


def _key(q: torch.Tensor, batch: int, page_size: int | None, max_seqlen: int) -> tuple:
    return tuning_key(q.shape[2], q.dtype, page_size, max_seqlen, batch * q.shape[1])


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
    """Jagged HSTU attention (the dispatcher's ``jagged`` op)."""

    def run(cfg: Config) -> None:
        _attn.launch(
            q, k, v, cu_seqlens, num_targets, max_seqlen, spec.alpha, spec.scaling_seqlen,
            out, cfg,
        )  # fmt: skip

    run(_pick(run, q, cu_seqlens.shape[0] - 1, None, max_seqlen))


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
    sum_splits: bool = True,
) -> torch.Tensor | None:
    """Paged (delta) HSTU attention (the dispatcher's ``paged`` op). ``sum_splits=False``:
    an even KV split returns its fp32 partials ``[S, *q.shape]`` unsummed instead of writing
    ``out`` (see :func:`paged_partials`); else ``None``."""

    def run(cfg: Config, sum_splits: bool = True) -> torch.Tensor | None:
        return _attn.launch(
            q, k_new, v_new, cu_seqlens_q, num_targets, max_seqlen_q, spec.alpha,
            spec.scaling_seqlen, out, cfg, kv_cache=kv_cache, page_table=page_table,
            sum_splits=sum_splits,
        )  # fmt: skip

    # The config is tuned (once per key) with the sum kernel timed in, either way.
    config = _pick(run, q, cu_seqlens_q.shape[0] - 1, kv_cache.shape[2], max_seqlen_q)
    return run(config, sum_splits)


def paged_partials(*args) -> torch.Tensor:
    """:func:`paged` without ``out`` (the dispatcher's optional ``paged_partials`` op): an even
    KV split's fp32 partials ``[S, *q.shape]``, unsummed, else the output in ``q``'s dtype."""
    out = torch.empty_like(args[0])
    partials = paged(*args, out, sum_splits=False)
    return out if partials is None else partials


def append_kv(
    kv_cache: torch.Tensor,
    page_table: PageTable,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    num_targets: torch.Tensor,
) -> None:
    """Scatter new history K/V into the pages (the dispatcher's ``append_kv`` op)."""
    _append.append_kv(kv_cache, page_table, k, v, cu_seqlens, num_targets)
