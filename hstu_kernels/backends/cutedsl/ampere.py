"""HSTU attention forward on warp-level MMA (mma.sync m16n8k16, cp.async, ldmatrix), CuTe DSL.

One source for sm_80, sm_86, sm_89, sm_90, sm_100 and sm_120; each arch compiles its own
cubin. One CTA computes one (q-tile of BM rows, head, sequence):

1. Q tile -> shared memory (cp.async), once.
2. For each KV tile that is not empty for this q-tile (``hstu_common.kv_tile_range``): K tile
   -> smem (prefetched during the previous tile's P@V), V tile -> smem (during this tile's
   Q@K^T); ``S = Q K^T`` (ldmatrix + mma.sync, fp32); ``P = silu(alpha S) / scaling_seqlen``
   (zeroed where the HSTU mask drops a pair, only on partial tiles); ``O += P V``.
3. O -> smem -> global, rows past the sequence not written. Split-KV variant (``split=True``):
   the CTA walks only its chunk of the KV tiles and writes its fp32 partial O to a workspace
   that the caller sums (no softmax normaliser in HSTU: partials simply add).

KV rows are gathered row by row: history keys through the page table (one page lookup per
tile when a page covers the tile, else one per row), target keys (paged) or all keys (jagged)
from the packed ``k``/``v`` rows. Keys past the sequence are zero-filled in smem: they then
contribute ``silu(0) * 0 = 0`` without a mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
import torch
from cutlass.cute.nvgpu import cpasync, warp

from hstu_kernels import settings
from hstu_kernels.backends.cutedsl import hstu_common as hc

__all__ = ["HstuFwdConfig", "HstuFwdSm80", "pick_config"]

# Usable shared memory per CTA (bytes) by compute capability.
_SMEM = {
    80: 163 * 1024,
    86: 99 * 1024,
    87: 163 * 1024,
    89: 99 * 1024,
    90: 227 * 1024,
    100: 227 * 1024,
    103: 227 * 1024,
    120: 99 * 1024,
    121: 99 * 1024,
}


@dataclass(frozen=True)
class HstuFwdConfig:
    """Tile shape of one variant: BM query rows x BN keys per step, ``num_threads`` threads
    (one warp per 16 rows of an MMA row block)."""

    block_m: int
    block_n: int
    num_threads: int


def smem_bytes(cfg: HstuFwdConfig, head_dim: int, elem_bytes: int = 2) -> int:
    return (cfg.block_m + 2 * cfg.block_n) * head_dim * elem_bytes


def pick_config(arch: str, head_dim: int, paged: bool = False) -> HstuFwdConfig:
    """The tile shape for ``head_dim`` on ``arch`` (``sm_XY`` or ``sm_XYa``), bounded by the
    arch's shared memory and by registers (the fp32 O accumulator is BM*D/threads per thread,
    kept at <= 128)."""
    cc = int(arch[3:].rstrip("a"))
    override = settings.get().cutedsl_tile  # (BM, BN, threads): for tuning runs
    if override:
        return HstuFwdConfig(*override)
    # Measured on H100 (docs/cutedsl.md): the same tiles serve jagged and delta best.
    cfg = HstuFwdConfig(128, 64, 128 if head_dim <= 128 else 256)
    if smem_bytes(cfg, head_dim) > _SMEM.get(cc, 99 * 1024):
        cfg = HstuFwdConfig(64, 64, 128)
    return cfg


class HstuFwdSm80:
    """The kernel for one compile-time variant.

    Args:
        dtype: ``cutlass.BFloat16`` or ``cutlass.Float16``.
        head_dim: 64, 128 or 256.
        page_size: tokens per page (power of two, 16..256); ignored when ``paged`` is False.
        paged: True for the delta case (history K/V from the paged cache).
        config: tile shape (:func:`pick_config`).
    """

    def __init__(
        self,
        dtype,
        head_dim: int,
        page_size: int,
        paged: bool,
        config: HstuFwdConfig,
        fast_tanh: bool = False,
        split: bool = False,
    ):
        if head_dim % 64 != 0:
            raise ValueError(f"head_dim: expected a multiple of 64, got {head_dim}")
        if config.block_m % (config.num_threads // 32 * 16) != 0:
            raise ValueError("block_m must be a multiple of 16 rows per warp")
        self.dtype = dtype
        self.head_dim = head_dim
        self.page_size = page_size if paged else 0
        self.paged = paged
        self.bm = config.block_m
        self.bn = config.block_n
        self.num_threads = config.num_threads
        self.fast_tanh = fast_tanh  # SiLU through tanh.approx (one MUFU op instead of two)
        # Split-KV: each CTA takes one of num_splits chunks of its q-tile's KV tiles and writes
        # its fp32 partial O to a workspace; the host sums the chunks (HSTU has no softmax
        # normaliser, so partial outputs simply add up).
        self.split = split
        if paged and (page_size < 16 or page_size & (page_size - 1)):
            raise ValueError(f"page_size: expected a power of two >= 16, got {page_size}")

    # ------------------------------------------------------------------ host side
    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,  # [rows, heads, D]
        mK: cute.Tensor,  # [rows, heads, D] (k or k_new)
        mV: cute.Tensor,  # [rows, heads, D] (v or v_new)
        mO: cute.Tensor,  # [rows, heads, D]
        mKV: cute.Tensor,  # [pages, 2, page_size, heads, D] (paged) / any tensor (jagged)
        mCuQ: cute.Tensor,  # int32 [B+1]
        mNumTargets: cute.Tensor,  # int32 [B]
        mPageIndptr: cute.Tensor,  # int32 [B+1] (paged) / any int32 tensor
        mPageIds: cute.Tensor,  # int32 [n] (paged) / any int32 tensor
        mLastPageLen: cute.Tensor,  # int32 [B] (paged) / any int32 tensor
        alpha: cutlass.Float32,
        inv_scaling: cutlass.Float32,
        num_m_blocks: cutlass.Int32,
        mWs: cute.Tensor,  # fp32 [splits, rows, heads, D] (split variant) / [1, 1, 1, D]
        num_splits: cutlass.Int32,
        stream,
    ):
        dtype = self.dtype
        D = self.head_dim
        # Swizzled smem rows of 64 elements (128 B): ldmatrix and cp.async are conflict-free.
        s_atom = cute.make_composed_layout(
            cute.make_swizzle(3, 3, 3), 0, cute.make_layout((8, 64), stride=(64, 1))
        )
        sQ_layout = cute.tile_to_shape(s_atom, (self.bm, D), (0, 1))
        sKV_layout = cute.tile_to_shape(s_atom, (self.bn, D), (0, 1))

        @cute.struct
        class SharedStorage:
            sQ: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sQ_layout)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sKV_layout)], 1024]
            sV: cute.struct.Align[cute.struct.MemRange[dtype, cute.cosize(sKV_layout)], 1024]

        elems = 128 // dtype.width  # 8 elements per 128-bit copy
        threads_per_row = 64 // elems
        thr_layout = cute.make_layout(
            (self.num_threads // threads_per_row, threads_per_row), stride=(threads_per_row, 1)
        )
        val_layout = cute.make_layout((1, elems))
        g2s = cute.make_copy_atom(
            cpasync.CopyG2SOp(cache_mode=cpasync.LoadCacheMode.GLOBAL),
            dtype,
            num_bits_per_copy=128,
        )
        gmem_copy_in = cute.make_tiled_copy_tv(g2s, thr_layout, val_layout)
        r2g = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), dtype, num_bits_per_copy=128)
        gmem_copy_out = cute.make_tiled_copy_tv(r2g, thr_layout, val_layout)

        warps = self.num_threads // 32
        tiled_mma = cute.make_tiled_mma(
            warp.MmaF16BF16Op(dtype, cutlass.Float32, (16, 8, 16)),
            (warps, 1, 1),
            permutation_mnk=(warps * 16, 16, 16),
        )
        grid = (num_m_blocks * num_splits, mQ.shape[1], mNumTargets.shape[0])
        self.kernel(
            mQ,
            mK,
            mV,
            mO,
            mKV,
            mCuQ,
            mNumTargets,
            mPageIndptr,
            mPageIds,
            mLastPageLen,
            alpha,
            inv_scaling,
            num_m_blocks,
            mWs,
            num_splits,
            sQ_layout,
            sKV_layout,
            gmem_copy_in,
            gmem_copy_out,
            tiled_mma,
            SharedStorage,
        ).launch(grid=grid, block=[self.num_threads, 1, 1], stream=stream)

    # ------------------------------------------------------------------ device side
    @cute.kernel
    def kernel(
        self,
        mQ: cute.Tensor,
        mK: cute.Tensor,
        mV: cute.Tensor,
        mO: cute.Tensor,
        mKV: cute.Tensor,
        mCuQ: cute.Tensor,
        mNumTargets: cute.Tensor,
        mPageIndptr: cute.Tensor,
        mPageIds: cute.Tensor,
        mLastPageLen: cute.Tensor,
        alpha: cutlass.Float32,
        inv_scaling: cutlass.Float32,
        num_m_blocks: cutlass.Int32,
        mWs: cute.Tensor,
        num_splits: cutlass.Int32,
        sQ_layout: cute.ComposedLayout,
        sKV_layout: cute.ComposedLayout,
        gmem_copy_in: cute.TiledCopy,
        gmem_copy_out: cute.TiledCopy,
        tiled_mma: cute.TiledMma,
        SharedStorage: cutlass.Constexpr,
    ):
        tidx, _, _ = cute.arch.thread_idx()
        bx, by, bz = cute.arch.block_idx()
        split = bx % num_splits
        m_block, head, b = hc.schedule_tile(bx // num_splits, by, bz, num_m_blocks)
        info = hc.sequence_info(
            b,
            mCuQ,
            mNumTargets,
            mPageIndptr,
            mLastPageLen,
            page_size=self.page_size,
            paged=self.paged,
        )
        row0 = m_block * self.bm
        if row0 < info.q_len:
            self.tile(
                mQ,
                mK,
                mV,
                mO,
                mKV,
                mPageIds,
                alpha,
                inv_scaling,
                info,
                m_block,
                head,
                tidx,
                mWs,
                split,
                num_splits,
                sQ_layout,
                sKV_layout,
                gmem_copy_in,
                gmem_copy_out,
                tiled_mma,
                SharedStorage,
            )

    @cute.jit
    def tile(
        self,
        mQ,
        mK,
        mV,
        mO,
        mKV,
        mPageIds,
        alpha,
        inv_scaling,
        info,
        m_block,
        head,
        tidx,
        mWs,
        split,
        num_splits,
        sQ_layout,
        sKV_layout,
        gmem_copy_in,
        gmem_copy_out,
        tiled_mma,
        SharedStorage,
    ):
        BM, BN, D = self.bm, self.bn, self.head_dim
        dtype = self.dtype
        barrier = pipeline.NamedBarrier(barrier_id=1, num_threads=self.num_threads)
        row0 = m_block * BM
        rows_here = cutlass.min(info.q_len - row0, BM)
        p0 = info.q_pos0 + row0
        p1 = p0 + rows_here
        count, n_a, n_b_start = hc.kv_tile_range(p0, p1, info.history, info.total, BN)
        i_begin, i_end = hc.split_range(count, split, num_splits)

        smem = cutlass.memory.SmemAllocator()
        storage = smem.allocate(SharedStorage)
        sQ = storage.sQ.get_tensor(sQ_layout)
        sK = storage.sK.get_tensor(sKV_layout)
        sV = storage.sV.get_tensor(sKV_layout)
        sVt = cute.composition(sV, cute.make_layout((D, BN), stride=(BN, 1)))

        # ---- Q tile -> smem (rows past the sequence zero-filled)
        gQ = cute.local_tile(
            cute.domain_offset((info.q_start, 0, 0), mQ)[None, head, None], (BM, D), (m_block, 0)
        )
        thr_in = gmem_copy_in.get_slice(tidx)
        tQgQ = thr_in.partition_S(gQ)
        tQsQ = thr_in.partition_D(sQ)
        cQ = cute.make_identity_tensor((BM, D))
        tQcQ = thr_in.partition_S(cQ)
        for m in cutlass.range_constexpr(cute.size(tQsQ.shape[1])):
            if tQcQ[0, m, 0][0] < rows_here:
                cute.copy(gmem_copy_in, tQgQ[None, m, None], tQsQ[None, m, None])
            else:
                tQsQ[None, m, None].fill(0)

        # ---- KV gather setup
        tKsK = thr_in.partition_D(sK)
        tVsV = thr_in.partition_D(sV)
        cKV = cute.make_identity_tensor((BN, D))
        tKVcKV = thr_in.partition_S(cKV)

        # Row addresses of the KV tiles (K rows; V rows derive from them), computed one tile
        # ahead so that the page-table loads hide behind the previous tile's Q@K^T.
        slots = cute.size(tKsK.shape[1])
        ptr_cur = cute.make_rmem_tensor((slots,), cutlass.Int64)
        ptr_next = cute.make_rmem_tensor((slots,), cutlass.Int64)
        v_minus_k = mV.iterator.toint() - mK.iterator.toint()
        kv_stride = cutlass.Int64(0)
        if cutlass.const_expr(self.paged):
            kv_stride = cutlass.Int64(mKV.layout.stride[1]) * (dtype.width // 8)
        self.kv_row_ptrs(
            mK, mKV, mPageIds, info, head, hc.kv_tile_at(i_begin, n_a, n_b_start), tKVcKV, ptr_cur
        )
        self.issue_kv(ptr_cur, False, 0, info, v_minus_k, kv_stride, tKsK, tKVcKV, gmem_copy_in)
        cute.arch.cp_async_commit_group()

        # ---- MMA partitions
        thr_mma = tiled_mma.get_slice(tidx)
        tSrQ = thr_mma.make_fragment_A(thr_mma.partition_A(sQ))
        tSrK = thr_mma.make_fragment_B(thr_mma.partition_B(sK))
        tOrVt = thr_mma.make_fragment_B(thr_mma.partition_B(sVt))
        acc_O = cute.make_rmem_tensor(thr_mma.partition_shape_C((BM, D)), cutlass.Float32)
        acc_O.fill(0.0)

        ldsm = cute.make_copy_atom(warp.LdMatrix8x8x16bOp(transpose=False, num_matrices=4), dtype)
        ldsm_t = cute.make_copy_atom(warp.LdMatrix8x8x16bOp(transpose=True, num_matrices=4), dtype)
        s2r_Q = cute.make_tiled_copy_A(ldsm, tiled_mma).get_slice(tidx)
        s2r_K = cute.make_tiled_copy_B(ldsm, tiled_mma).get_slice(tidx)
        s2r_V = cute.make_tiled_copy_B(ldsm_t, tiled_mma).get_slice(tidx)
        tSsQ = s2r_Q.partition_S(sQ)
        tSrQ_v = s2r_Q.retile(tSrQ)
        tSsK = s2r_K.partition_S(sK)
        tSrK_v = s2r_K.retile(tSrK)
        tOsVt = s2r_V.partition_S(sVt)
        tOrVt_v = s2r_V.retile(tOrVt)

        cS = cute.make_identity_tensor((BM, BN))
        tScS_mn = self._mn_view(thr_mma.partition_C(cS))

        for i in range(i_begin, i_end):
            n_block = hc.kv_tile_at(i, n_a, n_b_start)
            cute.arch.cp_async_wait_group(0)  # K(i) (and Q) landed
            barrier.arrive_and_wait()  # ... for every thread; all done with V(i-1)
            self.issue_kv(
                ptr_cur, True, n_block, info, v_minus_k, kv_stride, tVsV, tKVcKV, gmem_copy_in
            )
            cute.arch.cp_async_commit_group()
            if i + 1 < i_end:
                n_next = hc.kv_tile_at(i + 1, n_a, n_b_start)
                self.kv_row_ptrs(mK, mKV, mPageIds, info, head, n_next, tKVcKV, ptr_next)

            acc_S = cute.make_rmem_tensor(thr_mma.partition_shape_C((BM, BN)), cutlass.Float32)
            acc_S.fill(0.0)
            n_k = cute.size(tSsQ.shape[2])
            cute.copy(s2r_Q, tSsQ[None, None, 0], tSrQ_v[None, None, 0])
            cute.copy(s2r_K, tSsK[None, None, 0], tSrK_v[None, None, 0])
            for k in cutlass.range_constexpr(n_k):
                if k + 1 < n_k:
                    cute.copy(s2r_Q, tSsQ[None, None, k + 1], tSrQ_v[None, None, k + 1])
                    cute.copy(s2r_K, tSsK[None, None, k + 1], tSrK_v[None, None, k + 1])
                cute.gemm(tiled_mma, acc_S, tSrQ[None, None, k], tSrK[None, None, k], acc_S)

            cute.arch.cp_async_wait_group(0)  # V(i) landed
            barrier.arrive_and_wait()  # ... for every thread; all done with K(i)
            if i + 1 < i_end:
                self.issue_kv(
                    ptr_next, False, 0, info, v_minus_k, kv_stride, tKsK, tKVcKV, gmem_copy_in
                )
                cute.arch.cp_async_commit_group()

            if not hc.tile_is_full(n_block, BN, p0, info.history):
                self._mask(acc_S, tScS_mn, p0, n_block * BN, info.history)
            hc.silu_scale_(acc_S, alpha, inv_scaling, self.fast_tanh)

            rP = cute.make_fragment_like(acc_S, dtype)
            rP.store(acc_S.load().to(dtype))
            tOrP = self._as_a_operand(rP)
            n_kv = cute.size(tOrP.shape[2])
            cute.copy(s2r_V, tOsVt[None, None, 0], tOrVt_v[None, None, 0])
            for k in cutlass.range_constexpr(n_kv):
                if k + 1 < n_kv:
                    cute.copy(s2r_V, tOsVt[None, None, k + 1], tOrVt_v[None, None, k + 1])
                cute.gemm(tiled_mma, acc_O, tOrP[None, None, k], tOrVt[None, None, k], acc_O)
            for m in cutlass.range_constexpr(slots):
                ptr_cur[m] = ptr_next[m]

        cute.arch.cp_async_wait_group(0)  # an empty split still has its prologue K load
        if cutlass.const_expr(self.split):
            self.store_partial(mWs, acc_O, thr_mma, info, split, head, m_block, rows_here)
        else:
            self.store_out(mO, acc_O, sQ, sQ_layout, tiled_mma, gmem_copy_out, barrier, info,
                           head, m_block, rows_here, tidx)  # fmt: skip

    @cute.jit
    def store_partial(self, mWs, acc_O, thr_mma, info, split, head, m_block, rows_here):
        """Split-KV epilogue: the fp32 partial O straight from registers to the workspace."""
        BM, D = self.bm, self.head_dim
        gW = cute.local_tile(
            cute.domain_offset((info.q_start, 0, 0), mWs[split, None, None, None])[
                None, head, None
            ],
            (BM, D),
            (m_block, 0),
        )
        tWgW = self._mn_view(thr_mma.partition_C(gW))
        tWcW = self._mn_view(thr_mma.partition_C(cute.make_identity_tensor((BM, D))))
        acc_mn = self._mn_view(acc_O)
        for r in cutlass.range_constexpr(cute.size(acc_mn, mode=[0])):
            if tWcW[r, 0][0] < rows_here:
                for c in cutlass.range_constexpr(cute.size(acc_mn, mode=[1])):
                    tWgW[r, c] = acc_mn[r, c]

    @cute.jit
    def store_out(self, mO, acc_O, sQ, sQ_layout, tiled_mma, gmem_copy_out, barrier, info, head,
                  m_block, rows_here, tidx):  # fmt: skip
        """O -> smem (reusing sQ: every thread is past its last Q@K^T) -> global."""
        BM, D = self.bm, self.head_dim
        dtype = self.dtype
        rO = cute.make_fragment_like(acc_O, dtype)
        rO.store(acc_O.load().to(dtype))
        r2s = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), dtype)
        r2s_thr = cute.make_tiled_copy_C(r2s, tiled_mma).get_slice(tidx)
        sO = cute.make_tensor(sQ.iterator, sQ_layout)
        cute.copy(r2s, r2s_thr.retile(rO), r2s_thr.partition_D(sO))
        barrier.arrive_and_wait()
        gO = cute.local_tile(
            cute.domain_offset((info.q_start, 0, 0), mO)[None, head, None], (BM, D), (m_block, 0)
        )
        thr_out = gmem_copy_out.get_slice(tidx)
        tOsO = thr_out.partition_S(sO)
        tOgO = thr_out.partition_D(gO)
        tOrO = cute.make_fragment_like(tOgO, dtype)
        cute.copy(gmem_copy_out, tOsO, tOrO)
        tOcO = thr_out.partition_D(cute.make_identity_tensor((BM, D)))
        for m in cutlass.range_constexpr(cute.size(tOgO.shape[1])):
            if tOcO[0, m, 0][0] < rows_here:
                cute.copy(gmem_copy_out, tOrO[None, m, None], tOgO[None, m, None])

    @cute.jit
    def kv_row_ptrs(self, mK, mKV, mPageIds, info, head, n_block, tXcX, ptrs):
        """Byte addresses of the K rows this thread copies for KV tile ``n_block`` (0 for keys
        past the sequence): history keys through the page table (one lookup per tile when a
        page covers the tile), the others from the packed rows of ``k``/``k_new``."""
        BN = self.bn
        j0 = n_block * BN
        tile_page = 0
        if cutlass.const_expr(self.paged and self.page_size >= BN):
            slot, _ = hc.page_slot(cutlass.min(j0, info.history - 1), self.page_size)
            tile_page = mPageIds[info.page_base + slot]
        for m in cutlass.range_constexpr(cute.size(ptrs)):
            j = j0 + tXcX[0, m, 0][0]
            from_cache, in_range, row = hc.kv_key_source(j, info, self.paged)
            ptr = (mK.iterator + cute.crd2idx((row, head, 0), mK.layout)).toint()
            if cutlass.const_expr(self.paged):
                slot, offset = hc.page_slot(cutlass.min(j, info.history - 1), self.page_size)
                page = tile_page
                if cutlass.const_expr(self.page_size < BN):
                    page = mPageIds[info.page_base + slot]
                cache_ptr = (
                    mKV.iterator + cute.crd2idx((page, 0, offset, head, 0), mKV.layout)
                ).toint()
                ptr = cutlass.Int64(cutlass.select_(from_cache, cache_ptr, ptr))
            ptrs[m] = cutlass.Int64(cutlass.select_(in_range, ptr, cutlass.Int64(0)))

    @cute.jit
    def issue_kv(
        self,
        ptrs,
        is_v: cutlass.Constexpr,
        n_block,
        info,
        v_minus_k,
        kv_stride,
        tXsX,
        tXcX,
        gmem_copy_in,
    ):
        """cp.async one KV tile into smem from the row addresses of :meth:`kv_row_ptrs`, one
        128-bit chunk per thread, row slot and chunk; rows with address 0 are zero-filled. V
        rows sit ``kv_stride`` bytes after K rows in the cache, ``v_minus_k`` after them in the
        packed tensors."""
        elems = 128 // self.dtype.width
        for m in cutlass.range_constexpr(cute.size(ptrs)):
            ptr = ptrs[m]
            if ptr != 0:
                if cutlass.const_expr(is_v):
                    if cutlass.const_expr(self.paged):
                        j = n_block * self.bn + tXcX[0, m, 0][0]
                        ptr = ptr + cutlass.Int64(
                            cutlass.select_(j < info.history, kv_stride, v_minus_k)
                        )
                    else:
                        ptr = ptr + v_minus_k
                gptr = cute.make_ptr(self.dtype, ptr, cute.AddressSpace.gmem, assumed_align=16)
                row_chunks = cute.tiled_divide(
                    cute.make_tensor(gptr, cute.make_layout((self.head_dim,))), (elems,)
                )
                for k in cutlass.range_constexpr(cute.size(tXsX.shape[2])):
                    dst = tXsX[None, m, k]
                    src = cute.make_tensor(row_chunks[None, tXcX[0, 0, k][1] // elems].iterator,
                                           dst.layout)  # fmt: skip
                    cute.copy(gmem_copy_in, src, dst)
            else:
                tXsX[None, m, None].fill(0)

    @cute.jit
    def _mask(self, acc_S, tScS_mn, p0, j0, history):
        acc_mn = self._mn_view(acc_S)
        for r in cutlass.range_constexpr(cute.size(acc_mn, mode=[0])):
            p = p0 + tScS_mn[r, 0][0]
            for c in cutlass.range_constexpr(cute.size(acc_mn, mode=[1])):
                j = j0 + tScS_mn[0, c][1]
                if not hc.keep(p, j, history):
                    acc_mn[r, c] = 0.0

    @staticmethod
    def _mn_view(acc):
        """View an MMA C fragment ``((2, 2), MMA_M, MMA_N)`` as ``(rows, cols)``."""
        lay = cute.make_layout(acc.layout.shape)
        mn = cute.make_layout(
            ((lay.shape[0][1], lay.shape[1]), (lay.shape[0][0], lay.shape[2])),
            stride=((lay.stride[0][1], lay.stride[1]), (lay.stride[0][0], lay.stride[2])),
        )
        return cute.make_tensor(acc.iterator, cute.composition(acc.layout, mn))

    @staticmethod
    def _as_a_operand(rP):
        """Reinterpret the P fragment (C layout of m16n8) as the A operand of m16n8k16:
        ``(4, MMA_M, MMA_N) -> ((4, 2), MMA_M, MMA_N / 2)``."""
        div = cute.logical_divide(rP.layout, (None, None, 2))
        lay = cute.make_layout(
            ((div.shape[0], div.shape[2][0]), div.shape[1], div.shape[2][1]),
            stride=((div.stride[0], div.stride[2][0]), div.stride[1], div.stride[2][1]),
        )
        return cute.make_tensor(rP.iterator, lay)


_ELEMS = 8  # 128-bit copies of 16-bit elements


def build_variant(
    arch: str, torch_dtype, head_dim: int, page_size: int, paged: bool, split: bool = False
):
    """``(kernel, variant, fake_args, config)`` of one variant, for :func:`get_kernel` and for
    compile-only tests (``compile.ptx_of(kernel, fake_args(), arch=...)``)."""
    from hstu_kernels.backends.cutedsl import compile as cc

    dtype = cc.cutlass_dtype(torch_dtype)
    cfg = pick_config(arch, head_dim, paged)
    ps = page_size if paged else 0
    # SiLU: tanh.approx for bf16 (its error is far below bf16 rounding), exp2+rcp for fp16;
    # settings.cutedsl_silu (HSTU_CUTEDSL_SILU=tanh|exp) overrides (tuning runs).
    silu = settings.get().cutedsl_silu or ("tanh" if torch_dtype == torch.bfloat16 else "exp")
    kernel = HstuFwdSm80(dtype, head_dim, ps, paged, cfg, silu == "tanh", split)
    variant = {
        "split": split,
        "silu": silu,
        "dtype": str(torch_dtype),
        "head_dim": head_dim,
        "page_size": ps,
        "paged": paged,
        "block_m": cfg.block_m,
        "block_n": cfg.block_n,
        "threads": cfg.num_threads,
    }

    def fake_args():
        i32 = cutlass.Int32
        row = (None, None, head_dim)
        kv = (None, 2, ps, None, head_dim) if paged else (None,)
        meta = [cc.fake_tensor(i32, (None,), align=4) for _ in range(5)]
        return (
            *(cc.fake_tensor(dtype, row) for _ in range(4)),
            cc.fake_tensor(dtype, kv),
            *meta,
            cutlass.Float32(1.0),
            cutlass.Float32(1.0),
            cutlass.Int32(1),
            cc.fake_tensor(cutlass.Float32, (None, None, None, head_dim)),
            cutlass.Int32(1),
            cc.env_stream(),
        )

    return kernel, variant, fake_args, cfg


def get_kernel(
    arch: str, torch_dtype, head_dim: int, page_size: int, paged: bool, split: bool = False
):
    """The compiled kernel of one variant (compiled once per process, cached on disk), and its
    tile config.

    The returned function takes ``(q, k, v, out, kv_cache, cu_seqlens_q, num_targets,
    page_indptr, page_ids, last_page_len, alpha, inv_scaling, num_m_blocks, ws, num_splits)``
    -- torch tensors and Python scalars -- and launches on the current torch stream. ``ws`` is
    the fp32 ``[num_splits, rows, heads, D]`` split-KV workspace (``split=True``; the caller
    sums it over dim 0), else any fp32 ``[1, 1, 1, D]`` tensor with ``num_splits=1``. For the jagged variant
    pass any tensor of the right dtype for ``kv_cache`` and any int32 tensors for the page
    table: they are not read.
    """
    from hstu_kernels.backends.cutedsl import compile as cc

    kernel, variant, fake_args, cfg = build_variant(
        arch, torch_dtype, head_dim, page_size, paged, split
    )
    name = "hstu_fwd_mma_" + cc.dsl_arch(arch).replace("sm_", "sm")
    fn = cc.compile_cached(
        name, variant, lambda: (kernel, fake_args()), arch=arch, sources=[__file__, hc.__file__]
    )
    return fn, cfg
