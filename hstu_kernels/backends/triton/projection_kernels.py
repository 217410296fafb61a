"""Triton kernels of the fused projection (:mod:`hstu_kernels.backends.triton.projection` drives them).

Kept apart so that importing the model never imports Triton, and so that the kernels can be
re-decorated (module reload) when the interpreter is switched on, as the CPU tests do.
"""

import triton
import triton.language as tl

# the append contract's row -> page slot mapping, one implementation for both writers
from hstu_kernels.backends.triton.append import cache_slots


@triton.jit
def silu_f32(x, FAST: tl.constexpr):
    """SiLU of an fp32 tensor."""
    # FAST (GPU only): x * sigmoid(x) = h + h * tanh(h) with h = x / 2, one tanh.approx
    # (one special-function op) instead of exp2 and a division (two, plus fix-ups). The
    # epilogue of the persistent kernel does not overlap the next tile's MMAs, so this is on
    # the critical path (128 SiLUs per thread per 128x256 tile). Its error is absolute:
    # tanh.approx's 2^-11 makes it <= |x| * 2^-12, an eighth of the bf16 rounding of a value
    # of x's size; where SiLU(x) is ~0 (x << 0) the result is up to |x| * 2^-12, not ~0.
    if FAST:
        h = 0.5 * x
        t = tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=r,r", [h], dtype=tl.float32, is_pure=True,
            pack=1,
        )  # fmt: skip
        return h + h * t
    else:
        return x * tl.sigmoid(x)


@triton.jit
def silu_gemm_kernel(
    H, W, OUT, M, K, inner,
    KV, CU, NUM_TARGETS, PAGE_IDS, PAGE_INDPTR, LAST_LEN, batch,
    stride_page, stride_kv, stride_slot,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, FAST_SILU: tl.constexpr,
    APPEND: tl.constexpr = False, PAGE_SIZE: tl.constexpr = 16,
    SEARCH_STEPS: tl.constexpr = 1,
):  # fmt: skip
    # H [M, K], W [K, 4 * inner] and OUT [4, M, inner] are contiguous. APPEND: the k and v
    # tiles are also written into their rows of the paged cache KV (new history rows only),
    # as append_kv would, which saves that kernel's launch and its re-read of k and v.
    n_cols = 4 * inner
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = n_cols // BLOCK_N
    # grouped order: GROUP_M row tiles walk a column tile before the next column,
    # so W's column tile (and H's row tiles) stay in L2 between programs
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # rows past the end load row (r % M), a real one, so the loads need no row mask;
    # those rows are not stored
    rows_in = (rows % M).to(tl.int64)
    h_ptrs = H + rows_in[:, None] * K + ks[None, :]
    w_ptrs = W + ks[:, None].to(tl.int64) * n_cols + cols[None, :]
    slot = (pid_n * BLOCK_N) // inner  # the tile lies inside one column group
    if APPEND:
        # Looked up before the K loop, so that the chain of dependent loads runs under it.
        # Slots u, v, q, k: only v (1) and k (3) are appended (rows M and past: none).
        cache_off, is_new = cache_slots(
            tl.where(slot % 2 == 1, rows, M), M, CU, NUM_TARGETS, PAGE_IDS, PAGE_INDPTR,
            LAST_LEN, batch, stride_page, stride_slot, PAGE_SIZE, SEARCH_STEPS,
        )  # fmt: skip
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(h_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_left = K - k0 * BLOCK_K
            a = tl.load(h_ptrs, mask=ks[None, :] < k_left, other=0.0)
            b = tl.load(w_ptrs, mask=ks[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * n_cols

    y = silu_f32(acc, FAST_SILU)  # on the fp32 accumulator: one rounding, at the store
    y = y.to(OUT.dtype.element_ty)
    out_cols = cols - slot * inner
    dst = (
        OUT + slot.to(tl.int64) * M * inner + rows.to(tl.int64)[:, None] * inner + out_cols[None, :]
    )
    tl.store(dst, y, mask=(rows < M)[:, None])
    if APPEND:  # v (slot 1) goes to plane 1, k (slot 3) to plane 0
        kv_dst = KV + ((3 - slot) // 2) * stride_kv + cache_off[:, None] + out_cols[None, :]
        tl.store(kv_dst, y, mask=is_new[:, None])


@triton.jit
def silu_split_kernel(SRC, DST, rows, n_cols, stride_src, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    part = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = (r < rows)[:, None] & (cols < n_cols)[None, :]
    src = SRC + r[:, None] * stride_src + part * n_cols + cols[None, :]
    x = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.sigmoid(x)
    dst = DST + part * rows * n_cols + r[:, None] * n_cols + cols[None, :]
    tl.store(dst, y.to(DST.dtype.element_ty), mask=mask)


@triton.jit
def silu_gemm_tma_kernel(
    h_desc, w_desc, out_desc, M, K, inner,
    KV, CU, NUM_TARGETS, PAGE_IDS, PAGE_INDPTR, LAST_LEN, batch,
    stride_page, stride_kv, stride_slot,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, FLATTEN: tl.constexpr,
    FAST_SILU: tl.constexpr, APPEND: tl.constexpr = False, PAGE_SIZE: tl.constexpr = 16,
    SEARCH_STEPS: tl.constexpr = 1,
):  # fmt: skip
    # h_desc [M, K] in [BLOCK_M, BLOCK_K] blocks, w_desc [K, 4 * inner] in
    # [BLOCK_K, BLOCK_N], out_desc [4, M, inner] in [1, BLOCK_M, BLOCK_N // 2]. A 3-d
    # output descriptor, not [4 * M, inner]: TMA clips a store at each dimension's end,
    # so the rows of a last row tile past M are dropped, not written into the next slot.
    # K past its end loads as zeros (both operands), so no K mask is needed. APPEND: as in
    # silu_gemm_kernel, the k and v tiles' new history rows also go into the paged cache KV
    # (pointer stores: a row's page slot is not a box of any descriptor).
    HALF_N: tl.constexpr = BLOCK_N // 2
    start = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = 4 * inner // BLOCK_N
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_group = GROUP_M * tiles_n
    # the epilogue recomputes its tile from its own counter, as tutorial 09 does, so
    # the software pipeline (which issues the next tile's loads before this tile's
    # store) need not carry the loads' tile indices into the epilogue
    tile_c = start - NUM_SMS
    for tile in tl.range(start, tiles_m * tiles_n, NUM_SMS, flatten=FLATTEN):
        # grouped order (see silu_gemm_kernel): GROUP_M row tiles per column tile
        first_m = (tile // per_group) * GROUP_M
        group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
        off_m = (first_m + (tile % per_group) % group_rows) * BLOCK_M
        off_n = ((tile % per_group) // group_rows) * BLOCK_N
        if APPEND:
            # The rows' page slots, looked up here so that the chain of dependent loads
            # (cu_seqlens' binary search, then the page table) runs under the K loop, not
            # after it. Slots u, v, q, k: only v (1) and k (3) are appended (a mask, not an
            # `if`: the flattened tile/K loop does not compile around a branch).
            rows = off_m + tl.arange(0, BLOCK_M)
            cache_off, is_new = cache_slots(
                tl.where((off_n // inner) % 2 == 1, rows, M), M, CU, NUM_TARGETS, PAGE_IDS,
                PAGE_INDPTR, LAST_LEN, batch, stride_page, stride_slot, PAGE_SIZE,
                SEARCH_STEPS,
            )  # fmt: skip
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = h_desc.load([off_m, ki * BLOCK_K])
            b = w_desc.load([ki * BLOCK_K, off_n])
            acc = tl.dot(a, b, acc)

        tile_c += NUM_SMS
        first_m = (tile_c // per_group) * GROUP_M
        group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
        off_m = (first_m + (tile_c % per_group) % group_rows) * BLOCK_M
        off_n = ((tile_c % per_group) // group_rows) * BLOCK_N
        slot = off_n // inner  # the tile lies inside one column group
        col = off_n - slot * inner
        # two halves: half the store buffer, and the first store runs during the
        # second half's SiLU
        halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF_N)), (0, 2, 1))
        acc0, acc1 = tl.split(halves)
        y0 = silu_f32(acc0, FAST_SILU).to(out_desc.dtype)  # on the fp32 accumulator
        out_desc.store([slot, off_m, col], tl.reshape(y0, (1, BLOCK_M, HALF_N)))
        y1 = silu_f32(acc1, FAST_SILU).to(out_desc.dtype)
        out_desc.store([slot, off_m, col + HALF_N], tl.reshape(y1, (1, BLOCK_M, HALF_N)))
        if APPEND:  # v (slot 1) goes to plane 1, k (slot 3) to plane 0
            kv_dst = (
                KV + ((3 - slot) // 2) * stride_kv + cache_off[:, None]
                + (col + tl.arange(0, HALF_N))[None, :]
            )  # fmt: skip
            tl.store(kv_dst, y0, mask=is_new[:, None])
            tl.store(kv_dst + HALF_N, y1, mask=is_new[:, None])
