"""Triton ``append_kv``: scatter the new history rows of a packed batch into their pages.

The grid covers every row of the packed ``k``/``v`` (a shape, known on the host); each row finds
its sequence by a binary search over ``cu_seqlens`` on the device, so no size ever comes from a
host sync and the launch can be captured in a CUDA graph. Target rows are skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hstu_kernels.backends.triton.launcher import FixedLaunch, cdiv, next_power_of_2
from hstu_kernels.types import PageTable


@triton.jit
def cache_slots(
    rows, total_rows, CU, NUM_TARGETS, PAGE_IDS, PAGE_INDPTR, LAST_LEN, batch, stride_page,
    stride_slot, PAGE_SIZE: tl.constexpr, SEARCH_STEPS: tl.constexpr,
):  # fmt: skip
    """Where packed rows ``rows`` go in the cache: element offsets relative to its K (or V)
    plane, and whether each is a new history row (targets and rows past the batch are not).
    Shared with the projection kernel that appends from its epilogue, so that both write
    exactly where ``append_kv`` says."""
    in_range = rows < total_rows
    # Largest b with cu[b] <= row (empty sequences share an offset with the next one).
    lo = tl.zeros_like(rows)
    hi = tl.zeros_like(rows) + (batch - 1)
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        active = lo < hi
        go_right = tl.load(CU + mid, mask=in_range, other=0) <= rows
        hi = tl.where(active & ~go_right, mid - 1, hi)
        lo = tl.where(active & go_right, mid, lo)
    b = lo
    start = tl.load(CU + b, mask=in_range, other=0)
    length = tl.load(CU + b + 1, mask=in_range, other=0) - start
    new = length - tl.load(NUM_TARGETS + b, mask=in_range, other=0)
    i = rows - start
    is_new = in_range & (i < new)
    page_start = tl.load(PAGE_INDPTR + b, mask=is_new, other=0)
    num_pages = tl.load(PAGE_INDPTR + b + 1, mask=is_new, other=1) - page_start
    history = (num_pages - 1) * PAGE_SIZE + tl.load(LAST_LEN + b, mask=is_new, other=0)
    pos = history - new + i
    page = tl.load(PAGE_IDS + page_start + pos // PAGE_SIZE, mask=is_new, other=0)
    return page.to(tl.int64) * stride_page + (pos % PAGE_SIZE) * stride_slot, is_new


@triton.jit
def _append_kv_kernel(
    K,
    V,
    KV,
    CU,
    NUM_TARGETS,
    PAGE_IDS,
    PAGE_INDPTR,
    LAST_LEN,
    total_rows,
    batch,
    row_width,
    stride_tok,
    stride_page,
    stride_kv,
    stride_slot,
    PAGE_SIZE: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    dst, is_new = cache_slots(
        rows, total_rows, CU, NUM_TARGETS, PAGE_IDS, PAGE_INDPTR, LAST_LEN, batch, stride_page,
        stride_slot, PAGE_SIZE, SEARCH_STEPS,
    )  # fmt: skip
    src = rows.to(tl.int64) * stride_tok
    for c0 in range(0, row_width, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        m = is_new[:, None] & (cols < row_width)[None, :]
        k = tl.load(K + src[:, None] + cols[None, :], mask=m)
        v = tl.load(V + src[:, None] + cols[None, :], mask=m)
        tl.store(KV + dst[:, None] + cols[None, :], k, mask=m)
        tl.store(KV + stride_kv + dst[:, None] + cols[None, :], v, mask=m)


@triton.jit
def _append_kv_fp8_kernel(
    K,
    V,
    KV,
    SCALES,
    CU,
    NUM_TARGETS,
    PAGE_IDS,
    PAGE_INDPTR,
    LAST_LEN,
    total_rows,
    batch,
    stride_tok,
    stride_page,
    stride_kv,
    stride_slot,
    fp8_max,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """One head of ``BLOCK_R`` packed rows into an FP8 pool: each row quantised by its own
    scale (largest magnitude / 448, 1 for an all-zero row; ``reference.fp8.quantize``, with
    IEEE divisions so that the bytes match it), the scale beside it."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = tl.program_id(1)
    dst, is_new = cache_slots(
        rows, total_rows, CU, NUM_TARGETS, PAGE_IDS, PAGE_INDPTR, LAST_LEN, batch, stride_page,
        stride_slot, PAGE_SIZE, SEARCH_STEPS,
    )  # fmt: skip
    cols = h * HEAD_DIM + tl.arange(0, HEAD_DIM)
    src = rows.to(tl.int64)[:, None] * stride_tok + cols[None, :]
    m = is_new[:, None]
    for i in tl.static_range(2):
        x = tl.load((K if i == 0 else V) + src, mask=m, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)
        scale = tl.where(amax > 0, tl.math.div_rn(amax, fp8_max), 1.0)
        x8 = tl.math.div_rn(x, scale[:, None])
        x8 = tl.minimum(tl.maximum(x8, -fp8_max), fp8_max).to(tl.float8e4nv)
        at = dst + i * stride_kv  # the row's first element: K plane, or V
        tl.store(KV + at[:, None] + cols[None, :], x8, mask=m)
        tl.store(SCALES + at // HEAD_DIM + h, scale, mask=is_new)


class AppendLaunch:
    """A planned append for one batch: grid and arguments fixed from its metadata tensors
    (which it holds) and row count; ``launch(kv_cache, k, v)`` writes the new history rows
    (``fp8``: ``launch(kv_cache, k, v, kv_scales)`` into an FP8 pool, quantised)."""

    def __init__(
        self,
        page_table: PageTable,
        cu_seqlens: torch.Tensor,
        num_targets: torch.Tensor,
        rows: int | None,
        heads: int,
        head_dim: int,
        page_size: int,
        fp8: bool = False,
    ) -> None:
        batch = cu_seqlens.shape[0] - 1
        if fp8 and (head_dim & (head_dim - 1) or head_dim < 16):
            raise ValueError(f"k: head_dim must be a power of two >= 16 for Triton, got {head_dim}")
        self._fp8, self._heads, self._head_dim = fp8, heads, head_dim
        if page_table.page_ids.numel() == 0 and batch:
            raise ValueError("page_table.page_ids: expected at least one page per sequence")
        self._meta = (cu_seqlens, num_targets, page_table.page_ids, page_table.page_indptr,
                      page_table.last_page_len)  # fmt: skip
        self._batch, self._page_size = batch, page_size
        self._width = width = heads * head_dim
        self._block_c = min(next_power_of_2(width), 1024)
        self._block_r = max(1, 4096 // self._block_c)
        self._by_rows: dict[int, FixedLaunch] = {}
        if rows is not None:
            self._launch(rows)

    def _launch(self, total: int) -> FixedLaunch:
        found = self._by_rows.get(total)
        if found is None:
            make = self._fp8_launch if self._fp8 else self._plain_launch
            found = self._by_rows[total] = make(total)
        return found

    def _plain_launch(self, total: int) -> FixedLaunch:
        ps, slot = self._page_size, self._width
        args = [
            None, None, None, *self._meta, total, self._batch, self._width, slot, 2 * ps * slot,
            ps * slot, slot,
        ]  # fmt: skip
        constexprs = dict(PAGE_SIZE=ps, SEARCH_STEPS=max(1, self._batch.bit_length()),
                          BLOCK_R=self._block_r, BLOCK_C=self._block_c)  # fmt: skip
        grid = (cdiv(total, self._block_r),)
        return FixedLaunch(_append_kv_kernel, grid, args, (0, 1, 2), constexprs, num_warps=4)

    def _fp8_launch(self, total: int) -> FixedLaunch:
        ps, slot = self._page_size, self._width
        args = [
            None, None, None, None, *self._meta, total, self._batch, slot, 2 * ps * slot,
            ps * slot, slot, 448.0,
        ]  # fmt: skip
        block_r = max(1, min(64, 4096 // self._head_dim))
        constexprs = dict(HEAD_DIM=self._head_dim, PAGE_SIZE=ps,
                          SEARCH_STEPS=max(1, self._batch.bit_length()), BLOCK_R=block_r)  # fmt: skip
        grid = (cdiv(total, block_r), self._heads)
        return FixedLaunch(_append_kv_fp8_kernel, grid, args, (0, 1, 2, 3), constexprs,
                           num_warps=4)  # fmt: skip

    def __call__(
        self,
        kv_cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_scales: torch.Tensor | None = None,
    ) -> None:
        total = k.shape[0]
        if total == 0 or self._batch == 0:
            return
        if self._fp8:
            self._launch(total)(k, v, kv_cache, kv_scales)
        else:
            self._launch(total)(k, v, kv_cache)


def append_kv(
    kv_cache: torch.Tensor,
    page_table: PageTable,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    num_targets: torch.Tensor,
    kv_scales: torch.Tensor | None = None,
) -> None:
    """Write the first ``len_b - num_targets[b]`` rows of each sequence into its pages (an FP8
    pool: quantised, with ``kv_scales``)."""
    total, heads, head_dim = k.shape
    fp8 = kv_scales is not None
    AppendLaunch(page_table, cu_seqlens, num_targets, total, heads, head_dim,
                 kv_cache.shape[2], fp8)(kv_cache, k, v, kv_scales)  # fmt: skip
