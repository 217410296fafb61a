"""HSTU attention forward for Blackwell (sm_100a / sm_103a): tcgen05 MMA + TMA, CuTe DSL.

One CTA owns two 128-row query tiles of one (sequence, head) and walks the sequence's history
keys in 128-token tiles. For the paged op one key tile is exactly one cache page (page size
128), so the load warp reads one page id per tile and TMA-copies that page's K and V.

Warp roles (10 warps, 320 threads):

- warps 0-3 / 4-7: the SiLU warpgroups of query tile 0 / 1. Each thread owns one query row
  (one TMEM lane): it loads its row of S = Q K^T from tensor memory, applies the HSTU mask on
  the tiles that need one, ``silu(alpha * s) / scaling_seqlen``, writes P back to tensor
  memory (16-bit, aliasing S), and at the end runs the epilogue: O from tensor memory, plus the
  target rows' self term, stored to global memory.
- warp 8: MMA. Allocates tensor memory; issues ``S_t = Q_t K_i^T`` (both operands in shared
  memory) and ``O_t += P_t V_i`` (P from tensor memory) for both query tiles, interleaved so
  that one tile's SiLU overlaps the other tile's MMAs.
- warp 9: load. TMA copies of Q (two tiles) and K/V tiles (a ring of ``KV_STAGES`` buffers).

HSTU has no running max, so the softmax-correction role of a FlashAttention-style Blackwell
kernel disappears: O accumulates in tensor memory across all key tiles, untouched.

The MMA loop reads only history keys (``j < H``); the mask there is the shared
:func:`hstu_common.keep`. A target row's only other key is itself, which the epilogue adds
as the rank-1 term ``silu(alpha q_p.k_p) / S * v_p`` from ``k_new``/``v_new`` (jagged:
``k``/``v``) in fp32. So target keys never enter shared memory.

Arch-neutral pieces come from :mod:`hstu_common` (sequence metadata, tile walk, page walk,
tile classification, mask, SiLU/scale), the same functions the warp-MMA kernel runs on GPUs.

Status: compiled for sm_100a/sm_103a in CI (tests/test_cutedsl_blackwell.py) for every variant
the dispatcher selects; never run (no B200 was available): see docs/blackwell.md.
"""

from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cutlass.memory
import cutlass.pipeline as pipeline
import cutlass.utils.blackwell_helpers as sm100_utils
from cutlass.cute.nvgpu import cpasync, tcgen05
from cutlass.cute.typing import Float32, Int32, Int64

from hstu_kernels.backends.cutedsl import hstu_common as hc
from hstu_kernels.backends.cutedsl import tma_variants, tma_views
from hstu_kernels.backends.cutedsl.tma_views import jagged_window

__all__ = ["PAGE_SIZE", "TILE_M", "TILE_N", "BlackwellHstuForward"]

TILE_M = 128  # query rows per tile (one TMEM lane each)
TILE_N = tma_variants.BLACKWELL_PAGE_SIZE  # history keys per tile (= one page for the paged op)
PAGE_SIZE = TILE_N
Q_TILES = 2  # query tiles in flight per CTA
BLOCK_M = TILE_M * Q_TILES  # query rows per CTA
KV_STAGES = 3  # K/V shared-memory ring (each stage holds one K or one V tile)
TMEM_COLS = 512

# warp roles: warps 4t..4t+3 are query tile t's SiLU warpgroup
MMA_WARP = 8
LOAD_WARP = 9
THREADS = 32 * 10
SILU_THREADS = 128

# tensor-memory columns (fp32 words): S_t and O_t per query tile; P_t (16-bit, two per column)
# aliases the upper part of S_t and is written only after S_t has been read into registers.
TMEM_S = (0, 128)
TMEM_P_IN_S = 32
TMEM_O = (256, 384)


class BlackwellHstuForward(tma_views.TmaAttentionHost):
    """One compiled variant: dtype (``cutlass.BFloat16``/``Float16``), head dim, jagged/paged.

    Compile :meth:`jagged` or :meth:`paged` once per variant: :func:`get_kernel` does, through
    ``compile.compile_cached`` (the backend module ``backends/cutedsl_blackwell.py`` calls it).
    """

    def __init__(self, dtype: type, head_dim: int, paged: bool, fast_tanh: bool = False) -> None:
        if head_dim not in (64, 128):
            raise ValueError(f"head_dim: expected 64 or 128, got {head_dim}")
        if dtype not in (cutlass.BFloat16, cutlass.Float16):
            raise TypeError(f"dtype: expected BFloat16 or Float16, got {dtype}")
        self.dtype = dtype
        self.head_dim = head_dim
        self.is_paged = paged
        # SiLU through tanh.approx (one MUFU op per score instead of ex2 + rcp): the SFU, not
        # the tensor core, is expected to bound this kernel at D=128 (docs/blackwell.md).
        self.fast_tanh = fast_tanh
        self.acc_dtype = Float32
        self.qk_tiler = (TILE_M, TILE_N, head_dim)  # (M, N, K) of S = Q K^T
        self.pv_tiler = (TILE_M, head_dim, TILE_N)  # (M, N, K) of O = P V

    # ------------------------------------------------------------------ host side

    def _mmas(self):
        cta_group = tcgen05.CtaGroup.ONE
        k_major = cute.nvgpu.OperandMajorMode.K
        qk = sm100_utils.make_trivial_tiled_mma(
            self.dtype, self.dtype, k_major, k_major, self.acc_dtype, cta_group, self.qk_tiler[:2]
        )
        # P comes from tensor memory (K-major); V is read MN-major (head dim contiguous).
        pv = sm100_utils.make_trivial_tiled_mma(
            self.dtype,
            self.dtype,
            k_major,
            cute.nvgpu.OperandMajorMode.MN,
            self.acc_dtype,
            cta_group,
            self.pv_tiler[:2],
            tcgen05.OperandSource.TMEM,
        )
        return qk, pv

    @cute.jit
    def _launch(
        self,
        q: cute.Tensor,
        q_view: cute.Tensor,
        k_view: cute.Tensor,
        v_view: cute.Tensor,
        k_self: cute.Tensor,
        v_self: cute.Tensor,
        out: cute.Tensor,
        cu_seqlens_q: cute.Tensor,
        num_targets: cute.Tensor,
        page_indptr,
        page_ids,
        last_page_len,
        pad: Int32,
        alpha: Float32,
        inv_scaling: Float32,
        stream,
    ):
        qk_mma, pv_mma = self._mmas()
        q_smem = sm100_utils.make_smem_layout_a(qk_mma, self.qk_tiler, self.dtype, Q_TILES)
        k_smem = sm100_utils.make_smem_layout_b(qk_mma, self.qk_tiler, self.dtype, KV_STAGES)
        v_smem = sm100_utils.make_smem_layout_b(pv_mma, self.pv_tiler, self.dtype, KV_STAGES)
        p_tmem = sm100_utils.make_smem_layout_a(pv_mma, self.pv_tiler, self.dtype, 1)

        load_op = cpasync.CopyBulkTensorTileG2SOp(tcgen05.CtaGroup.ONE)
        one_cta = (1, 1, 1, 1)  # (V, M, N, K) cluster shape: no cluster, no multicast
        q_one = cute.select(q_smem, mode=[0, 1, 2])
        k_one = cute.select(k_smem, mode=[0, 1, 2])
        v_one = cute.select(v_smem, mode=[0, 1, 2])
        tma_q, q_tma = cute.nvgpu.make_tiled_tma_atom_A(
            load_op, q_view, q_one, self.qk_tiler, qk_mma, one_cta
        )
        tma_k, k_tma = cute.nvgpu.make_tiled_tma_atom_B(
            load_op, k_view, k_one, self.qk_tiler, qk_mma, one_cta
        )
        tma_v, v_tma = cute.nvgpu.make_tiled_tma_atom_B(
            load_op, v_view, v_one, self.pv_tiler, pv_mma, one_cta
        )
        self.q_bytes = cute.size_in_bytes(self.dtype, q_one)
        self.kv_bytes = cute.size_in_bytes(self.dtype, k_one)

        @cute.struct
        class SharedStorage:
            q_bars: cute.struct.MemRange[Int64, Q_TILES * 2]
            kv_bars: cute.struct.MemRange[Int64, KV_STAGES * 2]
            s0_bars: cute.struct.MemRange[Int64, 2]
            s1_bars: cute.struct.MemRange[Int64, 2]
            o0_bars: cute.struct.MemRange[Int64, 2]
            o1_bars: cute.struct.MemRange[Int64, 2]
            dealloc_bar: cute.struct.MemRange[Int64, 1]
            tmem_holding: Int32
            sQ: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(q_smem)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(k_smem)], 1024]

        self.shared_storage = SharedStorage

        batch = cu_seqlens_q.shape[0] - 1
        heads = out.shape[1]
        # (query blocks, heads, batch), as hc.grid_shape but from a run-time max_seqlen_q.
        grid = ((pad + BLOCK_M - 1) // BLOCK_M, heads, batch)
        self.kernel(
            qk_mma, pv_mma, tma_q, q_tma, tma_k, k_tma, tma_v, v_tma,
            q, k_self, v_self, out, cu_seqlens_q, num_targets,
            page_indptr, page_ids, last_page_len, pad, alpha, inv_scaling,
            q_smem, k_smem, v_smem, p_tmem,
        ).launch(grid=grid, block=[THREADS, 1, 1], stream=stream, min_blocks_per_mp=1)  # fmt: skip

    # ------------------------------------------------------------------ device side

    @cute.kernel
    def kernel(
        self,
        qk_mma: cute.TiledMma,
        pv_mma: cute.TiledMma,
        tma_q: cute.CopyAtom,
        mQ: cute.Tensor,
        tma_k: cute.CopyAtom,
        mK: cute.Tensor,
        tma_v: cute.CopyAtom,
        mV: cute.Tensor,
        q: cute.Tensor,
        k_self: cute.Tensor,
        v_self: cute.Tensor,
        out: cute.Tensor,
        cu_seqlens_q: cute.Tensor,
        num_targets: cute.Tensor,
        page_indptr,
        page_ids,
        last_page_len,
        pad: Int32,
        alpha: Float32,
        inv_scaling: Float32,
        q_smem: cute.ComposedLayout,
        k_smem: cute.ComposedLayout,
        v_smem: cute.ComposedLayout,
        p_tmem: cute.ComposedLayout,
    ):
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        bx, head, b = cute.arch.block_idx()
        gx, _, _ = cute.arch.grid_dim()
        m_block, head, b = hc.schedule_tile(bx, head, b, gx)

        # ---- which rows and keys this CTA owns (computed identically by every role) -------
        seq = hc.sequence_info(
            b, cu_seqlens_q, num_targets, page_indptr, last_page_len,
            page_size=PAGE_SIZE, paged=self.is_paged,
        )  # fmt: skip
        row0 = m_block * BLOCK_M  # first local query row of tile 0
        if row0 < seq.q_len:
            p0 = seq.q_pos0 + row0
            p1 = seq.q_pos0 + cutlass.min(seq.q_len, row0 + BLOCK_M)
            # History tiles only (n_a): target keys enter through the epilogue's self term.
            _, n_kv, _ = hc.kv_tile_range(p0, p1, seq.history, seq.total, TILE_N)

            if warp == LOAD_WARP:
                cpasync.prefetch_descriptor(tma_q)
                cpasync.prefetch_descriptor(tma_k)
                cpasync.prefetch_descriptor(tma_v)

            storage = cutlass.memory.SmemAllocator().allocate(self.shared_storage)
            q_prod, q_cons = pipeline.PipelineTmaUmma.create(
                num_stages=Q_TILES,
                producer_group=_group(1),
                consumer_group=_group(1),
                tx_count=self.q_bytes,
                barrier_storage=storage.q_bars.data_ptr(),
            ).make_participants()
            kv_prod, kv_cons = pipeline.PipelineTmaUmma.create(
                num_stages=KV_STAGES,
                producer_group=_group(1),
                consumer_group=_group(1),
                tx_count=self.kv_bytes,
                barrier_storage=storage.kv_bars.data_ptr(),
            ).make_participants()
            s0_prod, s0_cons = _umma_pipe(storage.s0_bars.data_ptr())
            s1_prod, s1_cons = _umma_pipe(storage.s1_bars.data_ptr())
            o0_prod, o0_cons = _umma_pipe(storage.o0_bars.data_ptr())
            o1_prod, o1_cons = _umma_pipe(storage.o1_bars.data_ptr())
            dealloc_bar = storage.dealloc_bar.data_ptr()
            if warp == MMA_WARP:
                cute.arch.mbarrier_init(dealloc_bar, SILU_THREADS * Q_TILES)
            cute.arch.mbarrier_init_fence()

            sQ = storage.sQ.get_tensor(q_smem.outer, swizzle=q_smem.inner)
            sK = storage.sK.get_tensor(k_smem.outer, swizzle=k_smem.inner)
            # V tiles share the K ring (a stage holds either): same bytes, V's own layout.
            sV = cute.make_tensor(cute.recast_ptr(sK.iterator, v_smem.inner), v_smem.outer)

            qk_thr = qk_mma.get_slice(0)
            pv_thr = pv_mma.get_slice(0)
            tStS = qk_thr.make_fragment_C(qk_thr.partition_shape_C(self.qk_tiler[:2]))
            tOtO = pv_thr.make_fragment_C(pv_thr.partition_shape_C(self.pv_tiler[:2]))
            tS0 = cute.make_tensor(tStS.iterator + TMEM_S[0], tStS.layout)
            tS1 = cute.make_tensor(tStS.iterator + TMEM_S[1], tStS.layout)
            tO0 = cute.make_tensor(tOtO.iterator + TMEM_O[0], tOtO.layout)
            tO1 = cute.make_tensor(tOtO.iterator + TMEM_O[1], tOtO.layout)

            cute.arch.sync_threads()

            if warp == LOAD_WARP and n_kv > 0:
                self.load_role(
                    qk_thr, pv_thr, tma_q, mQ, tma_k, mK, tma_v, mV, sQ, sK, sV,
                    q_prod, kv_prod, seq, page_ids, m_block, pad, head, n_kv,
                )  # fmt: skip

            if warp == MMA_WARP:
                cute.arch.alloc_tmem(Int32(TMEM_COLS), storage.tmem_holding)
                cute.arch.sync_warp()  # the whole warp sees the allocation before issuing MMAs
                if n_kv > 0:
                    self.mma_role(
                        sQ, sK, sV, tStS, tS0, tS1, tO0, tO1, p_tmem,
                        q_cons, kv_cons, s0_prod, s1_prod, o0_prod, o1_prod, seq, n_kv,
                    )  # fmt: skip
                cute.arch.relinquish_tmem_alloc_permit()
                cute.arch.mbarrier_wait(dealloc_bar, 0)
                tmem_ptr = cute.arch.retrieve_tmem_ptr(
                    Float32, alignment=16, ptr_to_buffer_holding_addr=storage.tmem_holding
                )
                cute.arch.dealloc_tmem(tmem_ptr, Int32(TMEM_COLS))

            if warp < 4:
                self.silu_role(
                    qk_thr, pv_thr, tS0, tO0, s0_cons, o0_cons, q, k_self, v_self, out,
                    seq, row0, head, n_kv, alpha, inv_scaling,
                )  # fmt: skip
                cute.arch.mbarrier_arrive(dealloc_bar)
            if warp >= 4 and warp < 8:
                self.silu_role(
                    qk_thr, pv_thr, tS1, tO1, s1_cons, o1_cons, q, k_self, v_self, out,
                    seq, row0 + TILE_M, head, n_kv, alpha, inv_scaling,
                )  # fmt: skip
                cute.arch.mbarrier_arrive(dealloc_bar)

    # ------------------------------------------------------------------ roles

    @cute.jit
    def load_role(
        self, qk_thr, pv_thr, tma_q, mQ, tma_k, mK, tma_v, mV, sQ, sK, sV,
        q_prod, kv_prod, seq, page_ids, m_block, pad, head, n_kv,
    ):  # fmt: skip
        """TMA producer: Q tiles 0 and 1, then K_i, V_i for every history tile i."""
        # The sequence's rows as a window whose out-of-window rows read as zeros.
        mQ_b = jagged_window(mQ, pad, seq.q_start, seq.q_len, mn_major=False)
        gQ = cute.flat_divide(mQ_b, cute.select(self.qk_tiler, mode=[0, 2]))
        tQsQ, tQgQ = cpasync.tma_partition(
            tma_q,
            0,
            cute.make_layout(1),
            cute.group_modes(sQ, 0, 3),
            cute.group_modes(qk_thr.partition_A(gQ), 0, 3),
        )
        mK_b, mV_b = tma_views.history_windows(mK, mV, pad, seq, self.is_paged)
        gK = cute.flat_divide(mK_b, cute.select(self.qk_tiler, mode=[1, 2]))
        tKsK, tKgK = cpasync.tma_partition(
            tma_k,
            0,
            cute.make_layout(1),
            cute.group_modes(sK, 0, 3),
            cute.group_modes(qk_thr.partition_B(gK), 0, 3),
        )
        gV = cute.flat_divide(mV_b, cute.select(self.pv_tiler, mode=[1, 2]))
        tVsV, tVgV = cpasync.tma_partition(
            tma_v,
            0,
            cute.make_layout(1),
            cute.group_modes(sV, 0, 3),
            cute.group_modes(pv_thr.partition_B(gV), 0, 3),
        )
        for t in cutlass.range_constexpr(Q_TILES):
            h = q_prod.acquire_and_advance()
            cute.copy(
                tma_q,
                tQgQ[None, m_block * Q_TILES + t, 0, (head, 0)],
                tQsQ[None, h.index],
                tma_bar_ptr=h.barrier,
            )
        for i in cutlass.range(n_kv, unroll=1):
            k_src, v_src = tma_views.history_tile_sources(
                tKgK, tVgV, i, seq, page_ids, head, self.is_paged
            )
            h = kv_prod.acquire_and_advance()
            cute.copy(tma_k, k_src, tKsK[None, h.index], tma_bar_ptr=h.barrier)
            h = kv_prod.acquire_and_advance()
            cute.copy(tma_v, v_src, tVsV[None, h.index], tma_bar_ptr=h.barrier)

    @cute.jit
    def _gemm(self, tiled_mma, acc, a, b, accumulate):
        """acc = a @ b (``accumulate``: acc += a @ b) over the K phases of one tile."""
        for kp in cutlass.range_constexpr(cute.size(a, mode=[2])):
            if cutlass.const_expr(kp == 0):
                tiled_mma.set(tcgen05.Field.ACCUMULATE, accumulate)
            else:
                tiled_mma.set(tcgen05.Field.ACCUMULATE, True)
            cute.gemm(tiled_mma, acc, a[None, None, kp], b[None, None, kp], acc)
        # .set() rebinds the atom's IR value: hand it back so that the caller's loop carries it
        return tiled_mma

    @cute.jit
    def mma_role(
        self, sQ, sK, sV, tStS, tS0, tS1, tO0, tO1, p_tmem,
        q_cons, kv_cons, s0_prod, s1_prod, o0_prod, o1_prod, seq, n_kv,
    ):  # fmt: skip
        """tcgen05 issuer. Per key tile i >= 1, for t = 0 then 1: wait until SiLU_t has written
        P_t(i-1) -> O_t += P_t V_(i-1) -> S_t = Q_t K_i^T -> hand S_t to SiLU_t."""
        # Fresh MMA atoms: .set(ACCUMULATE) below rebinds their IR values inside this role's
        # branch, which must not leak into the objects the other roles use.
        qk_mma, pv_mma = self._mmas()
        qk_thr = qk_mma.get_slice(0)
        pv_thr = pv_mma.get_slice(0)
        tSrQ = qk_thr.make_fragment_A(sQ)
        tSrK = qk_thr.make_fragment_B(sK)
        tOrV = pv_thr.make_fragment_B(sV)
        tP = pv_thr.make_fragment_A(cute.make_tensor(tStS.iterator, p_tmem.outer))
        tP = tP[None, None, None, 0]
        per_col = self.acc_dtype.width // self.dtype.width  # 16-bit values per TMEM column
        tP0 = cute.make_tensor(tP.iterator + per_col * (TMEM_S[0] + TMEM_P_IN_S), tP.layout)
        tP1 = cute.make_tensor(tP.iterator + per_col * (TMEM_S[1] + TMEM_P_IN_S), tP.layout)

        q0 = q_cons.wait_and_advance()
        q1 = q_cons.wait_and_advance()
        rQ0 = tSrQ[None, None, None, q0.index]
        rQ1 = tSrQ[None, None, None, q1.index]

        k_h = kv_cons.wait_and_advance()
        self._zero_tail(sK[None, None, None, k_h.index], False, seq, 0)
        rK = tSrK[None, None, None, k_h.index]
        s0 = s0_prod.acquire_and_advance()
        qk_mma = self._gemm(qk_mma, tS0, rQ0, rK, False)
        s0.commit()
        s1 = s1_prod.acquire_and_advance()
        qk_mma = self._gemm(qk_mma, tS1, rQ1, rK, False)
        s1.commit()
        k_h.release()
        v_h = kv_cons.wait_and_advance()
        self._zero_tail(sV[None, None, None, v_h.index], True, seq, 0)

        for i in cutlass.range(1, n_kv, unroll=1):
            k_h = kv_cons.wait_and_advance()
            self._zero_tail(sK[None, None, None, k_h.index], False, seq, i)
            rK = tSrK[None, None, None, k_h.index]
            rV = tOrV[None, None, None, v_h.index]
            s0 = s0_prod.acquire_and_advance()  # P_0(i-1) is in TMEM
            pv_mma = self._gemm(pv_mma, tO0, tP0, rV, i > 1)
            qk_mma = self._gemm(qk_mma, tS0, rQ0, rK, False)
            s0.commit()
            s1 = s1_prod.acquire_and_advance()  # P_1(i-1) is in TMEM
            pv_mma = self._gemm(pv_mma, tO1, tP1, rV, i > 1)
            qk_mma = self._gemm(qk_mma, tS1, rQ1, rK, False)
            s1.commit()
            k_h.release()
            v_h.release()
            v_h = kv_cons.wait_and_advance()
            self._zero_tail(sV[None, None, None, v_h.index], True, seq, i)

        rV = tOrV[None, None, None, v_h.index]
        s0_prod.acquire_and_advance()  # last P_0
        o0 = o0_prod.acquire_and_advance()
        pv_mma = self._gemm(pv_mma, tO0, tP0, rV, n_kv > 1)
        o0.commit()  # arrives when these MMAs retire: O_0 is final
        s1_prod.acquire_and_advance()  # last P_1
        o1 = o1_prod.acquire_and_advance()
        pv_mma = self._gemm(pv_mma, tO1, tP1, rV, n_kv > 1)
        o1.commit()
        v_h.release()
        q0.release()
        q1.release()

    @cute.jit
    def _zero_tail(self, s_tile, is_v: bool, seq, i):
        """Paged only: zero the K or V rows of history tile ``i`` that lie past the history.

        A cache page's unused tail holds anything (NaN in the tests). P is 0 there, but
        0 * NaN = NaN, and the shared mask keeps ``j == p`` (a target row's own position can
        fall in the tail), so the rows themselves must be 0 before they enter an MMA. Jagged
        views put those rows outside the TMA window instead, which reads them as zeros.
        """
        if cutlass.const_expr(self.is_paged):
            valid = seq.history - i * TILE_N
            if valid < TILE_N:
                for r in cutlass.range(valid + cute.arch.lane_idx(), TILE_N, 32, unroll=1):
                    if cutlass.const_expr(is_v):
                        # V stage: ((d, key % 16), 1, key // 16), d contiguous
                        s_tile[((None, r % 16), 0, r // 16)].fill(0.0)
                    else:
                        # K stage: ((key, d % 16), 1, d // 16)
                        s_tile[((r, None), 0, None)].fill(0.0)
                # generic-proxy stores -> visible to the tensor core's async-proxy reads
                cute.arch.fence_proxy("async.shared", space="cta")
                cute.arch.sync_warp()

    @cute.jit
    def silu_role(
        self, qk_thr, pv_thr, tS, tO, s_cons, o_cons, q, k_self, v_self, out,
        seq, tile_row0, head, n_kv, alpha, inv_scaling,
    ):  # fmt: skip
        """S -> P for every history tile, then the epilogue of this query tile."""
        tidx, _, _ = cute.arch.thread_idx()
        thr = tidx % SILU_THREADS
        n = TILE_N

        # TMEM -> registers: one query row (all 128 keys of the tile) per thread.
        ld_atom = cute.make_copy_atom(
            tcgen05.copy.Ld32x32bOp(tcgen05.copy.Repetition(32)), self.acc_dtype
        )
        tmem_ld = tcgen05.make_tmem_copy(ld_atom, tS)
        thr_ld = tmem_ld.get_slice(thr)
        tLtS = thr_ld.partition_S(tS)
        tLcS = thr_ld.partition_D(qk_thr.partition_C(cute.make_identity_tensor((TILE_M, n))))
        # (1, N) views of the thread's fragment for the shared mask helper
        row_layout = cute.make_layout((1, n))
        cS_mn = cute.make_tensor(tLcS.iterator, cute.composition(tLcS.layout, row_layout))

        # registers -> TMEM: P as 16-bit pairs packed into fp32 columns, aliasing S.
        p_cols = n * self.dtype.width // 32
        tP_cols = cute.make_tensor(
            tS.iterator + TMEM_P_IN_S,
            cute.composition(tS.layout, cute.make_layout((TILE_M, p_cols))),
        )
        st_atom = cute.make_copy_atom(
            tcgen05.copy.St32x32bOp(tcgen05.copy.Repetition(32)), self.acc_dtype
        )
        tmem_st = tcgen05.make_tmem_copy(st_atom, tP_cols)
        thr_st = tmem_st.get_slice(thr)
        tStP = thr_st.partition_D(tP_cols)
        cS_all = qk_thr.partition_C(cute.make_identity_tensor((TILE_M, n)))
        cP = cute.make_tensor(
            cS_all.iterator, cute.composition(cS_all.layout, cute.make_layout((TILE_M, p_cols)))
        )
        tPcP = thr_st.partition_S(cP)

        p_tile0 = seq.q_pos0 + tile_row0  # position of the tile's first query row
        for i in cutlass.range(n_kv, unroll=1):
            h = s_cons.wait_and_advance()
            rS = cute.make_rmem_tensor(tLcS.shape, self.acc_dtype)
            cute.copy(tmem_ld, tLtS, rS)
            if not hc.tile_is_full(i, n, p_tile0, seq.history):
                rS_mn = cute.make_tensor(rS.iterator, row_layout)
                hc.mask_tile_(rS_mn, cS_mn, p_tile0, i * n, seq.history)
            hc.silu_scale_(rS, alpha, inv_scaling, self.fast_tanh)
            rP = cute.make_rmem_tensor(tPcP.shape, self.acc_dtype)
            rP_lowp = cute.make_tensor(cute.recast_ptr(rP.iterator, dtype=self.dtype), rS.layout)
            rP_lowp.store(rS.load().to(self.dtype))
            cute.copy(tmem_st, rP, tStP)
            cute.arch.fence_view_async_tmem_store()
            h.release()  # P is in TMEM; S's columns are free again

        # ---- epilogue: O (+ the self term of target rows) -> global memory ---------------
        o_atom = cute.make_copy_atom(
            tcgen05.copy.Ld32x32bOp(tcgen05.copy.Repetition(32)), self.acc_dtype
        )
        tmem_ld_o = tcgen05.make_tmem_copy(o_atom, tO)
        thr_ld_o = tmem_ld_o.get_slice(thr)
        tLtO = thr_ld_o.partition_S(tO)
        tLcO = thr_ld_o.partition_D(
            pv_thr.partition_C(cute.make_identity_tensor(self.pv_tiler[:2]))
        )
        rO = cute.make_rmem_tensor(tLcO.shape, self.acc_dtype)
        rO.fill(0.0)
        if n_kv > 0:
            h = o_cons.wait_and_advance()
            cute.copy(tmem_ld_o, tLtO, rO)
            cute.arch.fence_view_async_tmem_load()
            h.release()

        row = tile_row0 + tLcO[0][0]
        if row < seq.q_len:
            g = seq.q_start + row
            if seq.q_pos0 + row >= seq.history:
                rq = self._row_fragment(q, g, head, thr_ld_o, pv_thr).load().to(Float32)
                rk = self._row_fragment(k_self, g, head, thr_ld_o, pv_thr).load().to(Float32)
                rv = self._row_fragment(v_self, g, head, thr_ld_o, pv_thr).load().to(Float32)
                w = cute.make_rmem_tensor((1,), Float32)
                w[0] = (rq * rk).reduce(cute.ReductionOp.ADD, Float32(0.0), 0)
                hc.silu_scale_(w, alpha, inv_scaling)
                rO.store(rO.load() + w[0] * rv)
            gO = self._row_fragment(out, g, head, thr_ld_o, pv_thr)
            gO.store(rO.load().to(self.dtype))

    @cute.jit
    def _row_fragment(self, t: cute.Tensor, g, head, thr_copy, thr_mma) -> cute.Tensor:
        """Row ``g``, head ``head`` of ``t [rows, heads, D]`` in the element order of this
        thread's TMEM-load fragment of O (a tile view with row stride 0: every row is ``g``)."""
        # Rows are whole head-dim vectors: tell the compiler, so that it emits 16-byte accesses.
        offset = cute.assume(
            Int64(g) * t.stride[0] + Int64(head) * t.stride[1], divby=self.head_dim
        )
        tile = cute.make_tensor(
            t.iterator + offset, cute.make_layout(self.pv_tiler[:2], stride=(0, 1))
        )
        return thr_copy.partition_D(thr_mma.partition_C(tile))


def _group(n: int) -> pipeline.CooperativeGroup:
    return pipeline.CooperativeGroup(pipeline.Agent.Thread, n)


def _umma_pipe(barriers):
    """One-stage MMA -> SiLU-warpgroup handoff (S ready / O ready)."""
    return pipeline.PipelineUmmaAsync.create(
        num_stages=1,
        producer_group=_group(1),
        consumer_group=_group(SILU_THREADS),
        barrier_storage=barriers,
    ).make_participants()


def build_variant(arch: str, torch_dtype, head_dim: int, paged: bool):
    """``(host_fn, variant, fake_args)`` of one variant (:func:`tma_variants.variant`), for
    :func:`tma_variants.get_kernel` and for compile-only tests
    (``compile.ptx_of(host_fn, fake_args(), arch=...)``).

    Argument order of the compiled function (torch tensors and Python scalars, no stream):

    - paged: ``(q, k_new, v_new, kv_cache, out, cu_seqlens_q, num_targets, page_indptr,
      page_ids, last_page_len, max_seqlen_q, alpha, inv_scaling)``;
    - jagged: ``(q, k, v, out, cu_seqlens, num_targets, max_seqlen, alpha, inv_scaling)``.
    """
    from hstu_kernels.backends.cutedsl import compile as cc

    dtype = cc.cutlass_dtype(torch_dtype)
    variant = tma_variants.variant("blackwell", torch_dtype, head_dim, paged)
    kernel = BlackwellHstuForward(dtype, head_dim, paged, fast_tanh=variant["silu"] == "tanh")

    def fake_args():
        return cc.fake_attention_args(dtype, head_dim, paged=paged, page_size=PAGE_SIZE)

    host_fn = kernel.paged if paged else kernel.jagged
    return host_fn, variant, fake_args
