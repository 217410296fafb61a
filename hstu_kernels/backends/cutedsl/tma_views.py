"""TMA views of the packed and paged K/V/Q tensors, shared by the TMA kernels (sm_90+).

- :func:`jagged_tma_view` / :func:`jagged_window`: a packed ``[rows, heads, D]`` tensor as a
  view whose row mode ends at a sequence's end, so TMA reads rows past it as zeros;
- :func:`page_tma_view`: K or V of a paged cache, one page per TMA tile, the page id as a
  coordinate.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass.cute.typing import Float32, Int32, Int64

__all__ = [
    "TmaAttentionHost",
    "history_tile_sources",
    "history_windows",
    "jagged_tma_view",
    "jagged_window",
    "page_tma_view",
]


def jagged_tma_view(t: cute.Tensor, pad: Int32, *, mn_major: bool) -> cute.Tensor:
    """Packed ``t [rows, heads, D]`` as the TMA-able ``(pad, D, (heads, rows + 1))`` view
    (``mn_major``: ``(D, pad, (heads, rows + 1))``) that :func:`jagged_window` slides.

    The base is moved back by ``pad`` rows so that the window of a sequence ending at packed
    row ``e`` ends exactly at the first mode's bound: rows past the sequence (up to ``pad``)
    are out of bounds, which TMA reads as zeros. ``pad`` must be >= every sequence's length.
    """
    rows, heads, d = t.shape
    s_row, s_head, _ = t.stride
    base = t.iterator - Int64(pad) * s_row
    if cutlass.const_expr(mn_major):
        layout = cute.make_layout((d, pad, (heads, rows + 1)), stride=(1, s_row, (s_head, s_row)))
    else:
        layout = cute.make_layout((pad, d, (heads, rows + 1)), stride=(s_row, 1, (s_head, s_row)))
    return cute.make_tensor(base, layout)


def jagged_window(view: cute.Tensor, pad: Int32, start, length, *, mn_major: bool):
    """Rows ``start .. start + length - 1`` of a :func:`jagged_tma_view` as coordinates
    ``0 .. length - 1`` of its row mode (with batch coordinate ``(head, 0)``); coordinates
    ``length .. pad - 1`` are out of bounds (zeros)."""
    shift = pad - length
    if cutlass.const_expr(mn_major):
        return cute.domain_offset((0, shift, (0, start + length)), view)
    return cute.domain_offset((shift, 0, (0, start + length)), view)


def page_tma_view(kv_cache: cute.Tensor, which: int, *, mn_major: bool) -> cute.Tensor:
    """K (``which=0``) or V (1) of ``kv_cache [pages, 2, P, heads, D]`` as
    ``(P, D, (heads, pages))`` (``mn_major``: ``(D, P, (heads, pages))``): one page is one
    TMA tile, addressed by the batch coordinate ``(head, page_id)``."""
    pages, _, page, heads, d = kv_cache.shape
    s_page, s_kv, s_row, s_head, _ = kv_cache.stride
    base = kv_cache.iterator + which * s_kv
    if cutlass.const_expr(mn_major):
        layout = cute.make_layout((d, page, (heads, pages)), stride=(1, s_row, (s_head, s_page)))
    else:
        layout = cute.make_layout((page, d, (heads, pages)), stride=(s_row, 1, (s_head, s_page)))
    return cute.make_tensor(base, layout)


@cute.jit
def history_windows(mK: cute.Tensor, mV: cute.Tensor, pad: Int32, seq, paged: cutlass.Constexpr):
    """The K and V views the producer tiles: the page views as they are (paged), else the
    sequence's history keys ``0 .. H-1`` as windows of the packed views (rows >= H zeros)."""
    if cutlass.const_expr(paged):
        return mK, mV
    return (
        jagged_window(mK, pad, seq.q_start, seq.history, mn_major=False),
        jagged_window(mV, pad, seq.q_start, seq.history, mn_major=True),
    )


@cute.jit
def history_tile_sources(tKgK, tVgV, i, seq, page_ids, head, paged: cutlass.Constexpr):
    """TMA sources of history key tile ``i`` in the partitioned K and V views: the tile's page
    (paged: one page per tile, the page id as the batch coordinate) or tile ``i`` of the
    sequence's window. K views tile keys in mode 1, V views (MN-major) in mode 2."""
    if cutlass.const_expr(paged):
        page = page_ids[seq.page_base + i]
        return tKgK[None, 0, 0, (head, page)], tVgV[None, 0, 0, (head, page)]
    return tKgK[None, i, 0, (head, 0)], tVgV[None, 0, i, (head, 0)]


class TmaAttentionHost:
    """The two host entry points of a TMA attention kernel (``blackwell``; ``hopper``'s also
    take its split-KV buffers, so it has its own): each builds the TMA views of its op and
    calls the subclass's ``_launch(q, q_view, k_view, v_view, k_self, v_self, out,
    cu_seqlens_q, num_targets, page_indptr, page_ids, last_page_len, pad, alpha, inv_scaling,
    stream)``."""

    @cute.jit
    def jagged(
        self,
        q: cute.Tensor,
        k: cute.Tensor,
        v: cute.Tensor,
        out: cute.Tensor,
        cu_seqlens: cute.Tensor,
        num_targets: cute.Tensor,
        max_seqlen: Int32,
        alpha: Float32,
        inv_scaling: Float32,
        stream,
    ):
        """Whole sequences: ``q, k, v, out [sum L_b, heads, D]``."""
        self._launch(
            q,
            jagged_tma_view(q, max_seqlen, mn_major=False),
            jagged_tma_view(k, max_seqlen, mn_major=False),
            jagged_tma_view(v, max_seqlen, mn_major=True),
            k, v, out, cu_seqlens, num_targets, None, None, None, max_seqlen, alpha,
            inv_scaling, stream,
        )  # fmt: skip

    @cute.jit
    def paged(
        self,
        q: cute.Tensor,
        k_new: cute.Tensor,
        v_new: cute.Tensor,
        kv_cache: cute.Tensor,
        out: cute.Tensor,
        cu_seqlens_q: cute.Tensor,
        num_targets: cute.Tensor,
        page_indptr: cute.Tensor,
        page_ids: cute.Tensor,
        last_page_len: cute.Tensor,
        max_seqlen_q: Int32,
        alpha: Float32,
        inv_scaling: Float32,
        stream,
    ):
        """New history + target rows over a paged cache ``kv_cache [pages, 2, P, heads, D]``
        (``P``: the kernel's page size, one page per key tile)."""
        self._launch(
            q,
            jagged_tma_view(q, max_seqlen_q, mn_major=False),
            page_tma_view(kv_cache, 0, mn_major=False),
            page_tma_view(kv_cache, 1, mn_major=True),
            k_new, v_new, out, cu_seqlens_q, num_targets, page_indptr, page_ids, last_page_len,
            max_seqlen_q, alpha, inv_scaling, stream,
        )  # fmt: skip
