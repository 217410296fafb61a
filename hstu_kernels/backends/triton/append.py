"""Triton ``append_kv``: scatter the new history rows of a packed batch into their pages.

The grid covers every row of the packed ``k``/``v`` (a shape, known on the host); each row finds
its sequence by a binary search over ``cu_seqlens`` on the device, so no size ever comes from a
host sync and the launch can be captured in a CUDA graph. Target rows are skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
    batch = cu_seqlens.shape[0] - 1
    if total == 0 or batch == 0:
        return
    if page_table.page_ids.numel() == 0:
        raise ValueError("page_table.page_ids: expected at least one page per sequence")
    width = heads * head_dim
    block_c = min(triton.next_power_of_2(width), 1024)
    block_r = max(1, 4096 // block_c)
    _append_kv_kernel[(triton.cdiv(total, block_r),)](
        k, v, kv_cache, cu_seqlens, num_targets,
        page_table.page_ids, page_table.page_indptr, page_table.last_page_len,
        total, batch, width, k.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        PAGE_SIZE=kv_cache.shape[2], SEARCH_STEPS=max(1, batch.bit_length()),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
