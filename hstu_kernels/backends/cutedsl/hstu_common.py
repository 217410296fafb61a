"""Arch-neutral pieces of the HSTU attention kernels written with the CuTe DSL.

Shared by the warp-MMA kernel (``ampere.py``, sm80..sm120) and the tcgen05 kernel
(``blackwell.py``), so that GPU runs on any card exercise them. Everything here is written in
integer arithmetic that works on both Python ints and DSL ``Int32`` values: the same function
runs inside a kernel trace and in a plain-Python unit test on the CPU. Only
:func:`silu_scale_` and :func:`mask_tile_` need the DSL (they touch register fragments).

Vocabulary (DESIGN.md §1, per sequence ``b``):

- ``history`` H, ``total`` L = H + T (T targets). Key/query *positions* run over ``0..L-1``.
- Query rows of the call: ``q_len`` packed rows starting at ``q_start``; row ``r`` has position
  ``q_pos0 + r``. Jagged (no cache): ``q_pos0 = 0``, ``q_len = L``. Paged (delta):
  ``q_len = N + T``, ``q_pos0 = H - N``.
- Key ``j`` comes from the cache (``j < H``, paged only) or from packed row
  ``q_start + j - q_pos0`` of ``k``/``k_new`` (every key of the jagged case; the targets of the
  paged case).
- The mask: ``keep(p, j) = (j <= p and j < H) or j == p`` (causal history; targets see all
  history and themselves).

Tiles: the CTA for q-tile ``m_block`` owns query rows ``[m_block*BM, (m_block+1)*BM)`` of its
sequence. Its KV tiles of ``BN`` keys are those covering keys ``[0, min(H, p1))`` ("history
range", tiles ``0..nA-1``) plus those covering the diagonal of target rows ``[max(p0, H), p1)``
("target range", tiles ``nB_start..``): every other KV tile is empty for this q-tile and is never
visited. A visited tile is *full* (no per-element mask needed) when every key in it is history
and not after the tile's first query; otherwise *partial*.
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = [
    "SeqInfo",
    "classify_tile",
    "contexts_first",
    "grid_shape",
    "keep",
    "kv_tile_at",
    "kv_tile_range",
    "kv_key_source",
    "mask_tile_",
    "page_slot",
    "schedule_tile",
    "sequence_info",
    "silu_scale_",
    "split_range",
    "tile_is_full",
    "window_keep",
    "window_start",
    "window_tile_is_full",
    "window_tile_range",
]

LOG2_E = 1.4426950408889634


def _is_py(*xs: Any) -> bool:
    return all(isinstance(x, (int, bool)) for x in xs)


def _min(a: Any, b: Any) -> Any:
    if _is_py(a, b):
        return min(a, b)
    import cutlass

    return cutlass.min(a, b)


def _max(a: Any, b: Any) -> Any:
    if _is_py(a, b):
        return max(a, b)
    import cutlass

    return cutlass.max(a, b)


def _as_int(flag: Any) -> Any:
    """A boolean (Python or DSL) as 0/1 of the integer world it lives in."""
    if isinstance(flag, bool):
        return int(flag)
    import cutlass

    return cutlass.Int32(flag)


class SeqInfo(NamedTuple):
    """Where one sequence's query rows and keys are (see the module docstring)."""

    q_start: Any  # first packed row of q / k_new / out
    q_len: Any  # packed rows of the sequence in this call
    q_pos0: Any  # position of the first query row
    history: Any  # H
    total: Any  # L = H + T
    page_base: Any  # index of the sequence's first entry in page_ids (paged only; else 0)


def sequence_info(
    b: Any,
    cu_seqlens_q: Any,
    num_targets: Any,
    page_indptr: Any = None,
    last_page_len: Any = None,
    *,
    page_size: int = 0,
    paged: bool = False,
) -> SeqInfo:
    """The :class:`SeqInfo` of sequence ``b`` from the call's metadata.

    Works on DSL tensors inside a kernel and on Python lists in tests. ``paged`` and
    ``page_size`` are compile-time constants.
    """
    q_start = cu_seqlens_q[b]
    q_len = cu_seqlens_q[b + 1] - q_start
    targets = num_targets[b]
    if not paged:
        return SeqInfo(q_start, q_len, q_start * 0, q_len - targets, q_len, q_start * 0)
    page_base = page_indptr[b]
    history = (page_indptr[b + 1] - page_base - 1) * page_size + last_page_len[b]
    new = q_len - targets
    return SeqInfo(q_start, q_len, history - new, history, history + targets, page_base)


def grid_shape(max_q_len: int, block_m: int, heads: int, batch: int) -> tuple[int, int, int]:
    """Launch grid ``(q-tiles, heads, batch)``: one CTA per (q-tile, head, sequence); CTAs
    past a short sequence's end exit at once."""
    return (max(1, -(-max_q_len // block_m)), heads, batch)


def schedule_tile(block_x: Any, block_y: Any, block_z: Any, num_m_blocks: Any) -> tuple:
    """``(m_block, head, batch)`` of a CTA. Later q-tiles see more keys (causal), so the first
    CTAs launched take the last q-tiles: the long tiles start first, short ones fill the tail."""
    return num_m_blocks - 1 - block_x, block_y, block_z


def lpt_tile(block: Any, batch: Any, heads: Any, splits: Any, num_m_blocks: Any) -> tuple:
    """``(m_block, head, batch, split)`` of CTA ``block`` of a one-dimensional grid of
    ``num_m_blocks * batch * heads * splits`` CTAs, longest first across the whole grid: the
    last query tiles (they see the most keys) of every sequence and head before any shorter
    one, a tile's splits side by side. (A grid ordered by sequence would start a later
    sequence's long tiles only after an earlier one's short tiles.)"""
    split = block % splits
    rest = block // splits
    head = rest % heads
    rest = rest // heads
    return num_m_blocks - 1 - rest // batch, head, rest % batch, split


def contexts_first(m_block: Any, num_m_blocks: Any, num_contexts: Any, block_m: int) -> Any:
    """The q-tile to run in place of :func:`lpt_tile`'s ``m_block`` with a contextual prefix:
    the q-tiles holding context rows (the first ``ceil(C / block_m)``; their rows see the whole
    history, so they are as long as the longest tile) first, then the rest longest first. A
    permutation of ``0 .. num_m_blocks - 1``; the identity when ``C = 0``."""
    k = _min((num_contexts + block_m - 1) // block_m, num_m_blocks)
    order = num_m_blocks - 1 - m_block  # 0: launched first
    return _as_int(order < k) * order + _as_int(order >= k) * (num_m_blocks - 1 - order + k)


def kv_tile_range(p0: Any, p1: Any, history: Any, total: Any, block_n: int) -> tuple:
    """The KV tiles of the q-tile with query positions ``[p0, p1)`` (``p1 > p0``).

    Returns ``(count, n_a, n_b_start)``: visit ``count`` tiles, the i-th being
    :func:`kv_tile_at` ``(i, n_a, n_b_start)``: history tiles ``0..n_a-1`` then target
    (diagonal) tiles ``n_b_start..``. Never visits a tile twice; ``count >= 1``.
    """
    n_a = (_min(history, p1) + block_n - 1) // block_n
    n_b_start = _max(n_a, _max(p0, history) // block_n)
    n_b_end = _max(n_b_start, (_min(p1, total) + block_n - 1) // block_n)
    return n_a + n_b_end - n_b_start, n_a, n_b_start


def kv_tile_at(i: Any, n_a: Any, n_b_start: Any) -> Any:
    """The KV tile index visited at step ``i`` of :func:`kv_tile_range`."""
    return i + _as_int(i >= n_a) * (n_b_start - n_a)


def split_range(count: Any, split: Any, num_splits: Any) -> tuple:
    """Split-KV: the steps ``[begin, end)`` of a ``count``-step tile walk that chunk ``split``
    of ``num_splits`` takes (contiguous, equal up to one; trailing chunks may be empty)."""
    per = (count + num_splits - 1) // num_splits
    begin = split * per
    return begin, _min(count, begin + per)


def tile_is_full(n_block: Any, block_n: int, p0: Any, history: Any) -> Any:
    """True when every (query, key) pair of the tile is kept: all keys are history and none is
    after the q-tile's first query. Such tiles skip the per-element mask."""
    last_key = (n_block + 1) * block_n - 1
    return (last_key <= p0) & (last_key < history)


def window_start(p: Any, history: Any, num_contexts: Any, max_attn_len: Any) -> Any:
    """The first history key a query at position ``p`` sees with contexts/window (DESIGN.md §1
    on clamped ids): ``min(p, H) - W``, or 0 while the window still reaches the contexts
    (``min(p, H) - W < C``) or there is no window (``W = 0``). It never decreases with ``p``."""
    start = _min(p, history) - max_attn_len
    return _as_int((max_attn_len > 0) & (start >= num_contexts)) * start


def window_keep(p: Any, j: Any, history: Any, num_contexts: Any, max_attn_len: Any) -> Any:
    """Whether query ``p`` sees *history* key ``j`` with contexts/window: causal from its
    :func:`window_start` on, a context row (``p < C``) the whole history. (A target row's own
    key is not a history key; it always sees it.)"""
    seen = (j <= p) | (p < num_contexts)
    return seen & (j >= window_start(p, history, num_contexts, max_attn_len)) & (j < history)


def window_tile_range(
    p0: Any, p1: Any, history: Any, num_contexts: Any, max_attn_len: Any, block_n: int
) -> tuple:
    """``(first, end)``: the history key tiles ``[first, end)`` the q-tile with query
    positions ``[p0, p1)`` visits with contexts/window. They start at the first row's window
    (later rows' windows start no earlier) and end at the last history key of the last row, or
    at the end of the history for a q-tile holding a context row (``p0 < C``). Every other
    history tile has no key any row of the q-tile sees."""
    first = window_start(p0, history, num_contexts, max_attn_len) // block_n
    last = _min(history, p1)  # keys before it: the causal end of the q-tile's rows
    last = last + _as_int(p0 < num_contexts) * (history - last)
    return first, _max((last + block_n - 1) // block_n, first)


def window_tile_is_full(
    n_block: Any, block_n: int, p0: Any, p_last: Any, history: Any, num_contexts: Any,
    max_attn_len: Any,
) -> Any:  # fmt: skip
    """True when every pair of q-tile rows ``[p0, p_last]`` x history tile ``n_block`` is kept
    by :func:`window_keep`: :func:`tile_is_full`, and the tile starts at or after the last
    row's window start (the latest of the q-tile's)."""
    start = window_start(p_last, history, num_contexts, max_attn_len)
    return tile_is_full(n_block, block_n, p0, history) & (n_block * block_n >= start)


def keep(p: Any, j: Any, history: Any) -> Any:
    """The HSTU mask (contexts/window absent): causal history, targets see history + self."""
    return ((j <= p) & (j < history)) | (j == p)


def classify_tile(p0: int, p1: int, j0: int, j1: int, history: int, total: int) -> str:
    """``"empty"``, ``"partial"`` or ``"full"`` for queries ``[p0, p1)`` x keys ``[j0, j1)``
    (plain Python; keys ``>= total`` do not exist). The tile walk of :func:`kv_tile_range`
    visits exactly the non-empty tiles and skips the mask on the full ones."""
    pairs = [keep(p, j, history) for p in range(p0, p1) for j in range(j0, min(j1, total))]
    if not any(pairs):
        return "empty"
    if all(pairs) and j1 <= total:
        return "full"
    return "partial"


def page_slot(j: Any, page_size: int) -> tuple:
    """``(index into the sequence's page list, offset inside the page)`` of history key ``j``
    (``page_size`` a power of two, compile-time)."""
    shift = page_size.bit_length() - 1
    if 1 << shift != page_size:
        raise ValueError(f"page_size: expected a power of two, got {page_size}")
    return j >> shift, j & (page_size - 1)


def kv_key_source(j: Any, info: SeqInfo, paged: bool) -> tuple:
    """Where key ``j`` of a sequence lives: ``(from_cache, in_range, packed_row)``.

    ``from_cache``: a history key of the paged case (read it through :func:`page_slot`);
    ``in_range``: ``j < total`` (keys past the sequence must be zero-filled, which makes them
    contribute nothing since ``silu(0) = 0``); ``packed_row``: the row of ``k``/``k_new`` that
    holds key ``j`` when it is not in the cache (clamp before using it as an address).
    """
    from_cache = (j < info.history) if paged else (j < 0)
    return from_cache, j < info.total, info.q_start + j - info.q_pos0


def silu_scale_(acc: Any, alpha: Any, inv_scaling: Any, fast_tanh: bool = False) -> None:
    """In place on an fp32 register fragment: ``s -> silu(alpha * s) * inv_scaling``.

    Default: ``silu(x) = x / (1 + 2^(-x log2 e))`` with the hardware ``ex2.approx`` and
    ``rcp.approx`` (two MUFU ops, relative error ~1e-7). ``fast_tanh``: ``silu(x) = h + h
    tanh(h)``, ``h = x / 2``, with ``tanh.approx`` (one MUFU op, relative error ~5e-4: below
    bf16 rounding, not below fp16's). A DSL-only helper (call it in a kernel).
    """
    import cutlass.cute as cute

    if fast_tanh:
        half_alpha = alpha * 0.5
        for i in range(cute.size(acc)):  # plain Python loop: unrolled at trace time
            h = acc[i] * half_alpha
            hs = h * inv_scaling
            acc[i] = hs * cute.math.tanh(h, fastmath=True) + hs
        return
    neg_alpha_log2e = -alpha * LOG2_E
    for i in range(cute.size(acc)):  # plain Python loop: unrolled at trace time
        s = acc[i]
        e = cute.math.exp2(s * neg_alpha_log2e, fastmath=True)
        acc[i] = (s * alpha) * cute.arch.rcp_approx(e + 1.0) * inv_scaling


def mask_tile_(
    acc_mn: Any, coords_mn: Any, p_base: Any, j_base: Any, history: Any,
    window: tuple | None = None,
) -> None:  # fmt: skip
    """Zero the elements of an ``(M, N)``-viewed fp32 fragment that :func:`keep` drops, or
    with ``window = (num_contexts, max_attn_len)`` what :func:`window_keep` drops (history keys
    only).

    ``coords_mn`` is the identity-tensor partition of the same fragment (``(row, col)`` inside
    the tile); the element's query position is ``p_base + row`` and key ``j_base + col``. Apply
    it to S before :func:`silu_scale_` (``silu(0) = 0``) or to P after it.
    """
    import cutlass
    import cutlass.cute as cute

    for r in range(cute.size(acc_mn, mode=[0])):
        p = p_base + coords_mn[r, 0][0]
        for c in range(cute.size(acc_mn, mode=[1])):
            j = j_base + coords_mn[0, c][1]
            kept = keep(p, j, history) if window is None else window_keep(p, j, history, *window)
            acc_mn[r, c] = cutlass.select_(kept, acc_mn[r, c], cutlass.Float32(0.0))
