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


class AppendLaunch:
    """A planned append for one batch: grid and arguments fixed from its metadata tensors
    (which it holds) and row count; ``launch(kv_cache, k, v)`` writes the new history rows."""

    def __init__(
        self,
        page_table: PageTable,
        cu_seqlens: torch.Tensor,
        num_targets: torch.Tensor,
        rows: int | None,
        heads: int,
        head_dim: int,
        page_size: int,
    ) -> None:
        batch = cu_seqlens.shape[0] - 1
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
            ps, slot = self._page_size, self._width
            args = [
                None, None, None, *self._meta, total, self._batch, self._width, slot,
                2 * ps * slot, ps * slot, slot,
            ]  # fmt: skip
            constexprs = dict(PAGE_SIZE=ps, SEARCH_STEPS=max(1, self._batch.bit_length()),
                              BLOCK_R=self._block_r, BLOCK_C=self._block_c)  # fmt: skip
            grid = (cdiv(total, self._block_r),)
            found = FixedLaunch(_append_kv_kernel, grid, args, (0, 1, 2), constexprs, num_warps=4)
            self._by_rows[total] = found
        return found

    def __call__(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        total = k.shape[0]
        if total == 0 or self._batch == 0:
            return
        self._launch(total)(k, v, kv_cache)


def append_kv(
    kv_cache: torch.Tensor,
    page_table: PageTable,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    num_targets: torch.Tensor,
) -> None:
    """Write the first ``len_b - num_targets[b]`` rows of each sequence into its pages."""
    total, heads, head_dim = k.shape
    AppendLaunch(page_table, cu_seqlens, num_targets, total, heads, head_dim,
                 kv_cache.shape[2])(kv_cache, k, v)  # fmt: skip
