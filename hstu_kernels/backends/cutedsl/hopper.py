"""HSTU attention forward for Hopper (sm_90a): warpgroup MMA (wgmma) + TMA, CuTe DSL.

Status: the sm_90 default (backends/cutedsl_hopper.py), run and measured on H100s
(tests/test_cutedsl_hopper.py; each step's prediction and measurement in
docs/hopper.md).

One CTA owns 128 query rows of one (sequence, head), or a split of their key range, and walks
the sequence's history keys in ``tile_n``-key tiles (paged: 32, one cache page per tile;
jagged: 64). Warp roles (12 warps, 384 threads):

- warpgroups 0 and 1 (consumers): query rows 0-63 and 64-127 of the tile. Each issues
  ``S_{i+1} = Q K_{i+1}^T`` (wgmma, both operands in shared memory) together with
  ``O += P_i V_i`` (P as the register A operand), waits for S only, masks the tiles that need
  it and applies ``silu(alpha s) / scaling_seqlen`` in registers while ``P_i V_i`` runs
  (intra-warpgroup overlap); the two warpgroups take turns issuing (named barriers,
  ``pingpong``), so one's SiLU also runs under the other's MMAs.
- warpgroup 2 (producer; its first warp issues TMA): Q once, then K_i and V_i into two rings of
  ``kv_stages`` buffers. It gives its registers to the consumers (``setmaxnreg``).

As in ``blackwell.py``: only history keys enter the loop; a target row's own key (the only other
key it sees) is added in the epilogue as ``silu(alpha q.k) / scaling_seqlen * v`` from
``k_new``/``v_new`` (jagged: ``k``/``v``). Jagged TMA windows read rows past the history as
zeros; the last page of a paged sequence may hold anything past the history, so the consumers
zero those K and V rows in shared memory before they enter an MMA. Split-KV (small or lopsided
grids): each split writes an fp32 partial and the last one of a query tile sums them, or
(``unsummed``) leaves them for the caller to sum.
"""

from __future__ import annotations

from typing import NamedTuple

import cutlass
import cutlass.cute as cute
import cutlass.memory
import cutlass.pipeline as pipeline
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.cute.typing import Float32, Int32, Int64
from cutlass.tensor_utils import LayoutEnum

from hstu_kernels.backends.cutedsl import hstu_common as hc
from hstu_kernels.backends.cutedsl import tma_variants, tma_views
from hstu_kernels.backends.cutedsl.split_kv import JAGGED_TILE_N
from hstu_kernels.backends.cutedsl.tma_views import jagged_window

__all__ = ["PAGE_SIZE", "TILE_M", "HopperHstuForward"]

TILE_M = 128  # query rows per CTA: two consumer warpgroups of 64 (the wgmma M)
PAGE_SIZE = tma_variants.HOPPER_PAGE_SIZE  # the paged op's pages: one page is one key tile
# The jagged op's tiles are JAGGED_TILE_N = 64 keys (fewer waits per key, m64n64
# wgmmas for S); its K/V rings then hold 2 stages at D = 256.
SMEM_BYTES = 227 * 1024  # per CTA on sm_90
CONSUMER_WARPGROUPS = 2
CONSUMER_THREADS = 128 * CONSUMER_WARPGROUPS
THREADS = CONSUMER_THREADS + 128
PRODUCER_WARP = CONSUMER_THREADS // 32
CONSUMER_REGS = 240  # setmaxnreg: 2 x 128 x 240 + 128 x 24 <= 64 Ki registers
PRODUCER_REGS = 24
ZERO_TAIL_BARRIER = 1  # named barrier of the consumers (0 is __syncthreads)
TURN_BARRIER = 2  # pingpong: barrier 2 + w is consumer warpgroup w's turn to issue
EPILOGUE_BARRIER = 4  # split-KV: the consumers' partial stores before / after the ticket


class SplitKV(NamedTuple):
    """A CTA's part of its query tile's key range (``HopperHstuForward._launch``)."""

    split: Int32  # this CTA's split
    pieces: Int32  # splits with keys of this query tile (1: no partials, ``out`` directly)
    partials: cute.Tensor  # fp32 [splits, rows, heads, D]
    tickets: cute.Tensor  # int32, one per query tile: its splits done so far
    ticket: Int32  # this query tile's index into ``tickets``
    unsummed: Int32  # nonzero: every split writes its partial, nobody sums (the caller does)


class Window(NamedTuple):
    """Contexts/window of a ``windowed`` variant: what a q-tile's masks need beyond ``seq``."""

    num_contexts: Int32  # C
    max_attn_len: Int32  # W
    p_last: Int32  # position of the q-tile's last query row (the latest window start)


class HopperHstuForward:
    """One compiled variant: dtype (``cutlass.BFloat16``/``Float16``), head dim, jagged/paged,
    with or without contexts/window (``windowed``)."""

    def __init__(
        self,
        dtype: type,
        head_dim: int,
        paged: bool,
        fast_tanh: bool = False,
        pingpong: bool = True,
        tile_n: int | None = None,
        windowed: bool = False,
    ) -> None:
        if head_dim not in (64, 128, 256):
            raise ValueError(f"head_dim: expected 64, 128 or 256, got {head_dim}")
        if dtype not in (cutlass.BFloat16, cutlass.Float16):
            raise TypeError(f"dtype: expected BFloat16 or Float16, got {dtype}")
        self.dtype = dtype
        self.head_dim = head_dim
        self.is_paged = paged
        self.fast_tanh = fast_tanh  # SiLU through tanh.approx (one MUFU op per score)
        # The consumer warpgroups take turns issuing their GEMMs (named barriers); off: they
        # run freely (2 % slower on an H100, docs/hopper.md).
        self.pingpong = pingpong
        self.tile_n = tile_n or (PAGE_SIZE if paged else JAGGED_TILE_N)
        # Contexts/window (the kernel's num_contexts and max_attn_len arguments): each q-tile
        # walks only the history tiles of its rows' windows, and masks by the window rule.
        # Off: those arguments are ignored and the kernel is the plain causal one.
        self.windowed = windowed
        if paged and self.tile_n != PAGE_SIZE:
            raise ValueError(f"tile_n: the paged op's key tile is one page ({PAGE_SIZE})")
        self.qk_tiler = (TILE_M, self.tile_n, head_dim)  # (M, N, K) of S = Q K^T
        self.pv_tiler = (TILE_M, head_dim, self.tile_n)  # (M, N, K) of O = P V
        # K and V rings as deep as shared memory allows beside Q, at most 4 stages (D = 256:
        # 64 KiB of Q + 4 x 32 KiB of 32-key K/V stages, or 2 x 64 KiB of 64-key stages).
        stage = 2 * self.tile_n * head_dim * 2
        self.kv_stages = min(4, (SMEM_BYTES - TILE_M * head_dim * 2 - 1024) // stage)

    # ------------------------------------------------------------------ host side

    @cute.jit
    def jagged(
        self, q: cute.Tensor, k: cute.Tensor, v: cute.Tensor, out: cute.Tensor,
        cu_seqlens: cute.Tensor, num_targets: cute.Tensor, max_seqlen: Int32, alpha: Float32,
        inv_scaling: Float32, partials: cute.Tensor, tickets: cute.Tensor, chunk_tiles: Int32,
        unsummed: Int32, num_contexts: Int32, max_attn_len: Int32, stream,
    ):  # fmt: skip
        """Whole sequences: ``q, k, v, out [sum L_b, heads, D]``. Split-KV arguments: see
        :meth:`_launch`; ``num_contexts``/``max_attn_len``: read by a ``windowed`` variant
        only."""
        self._launch(
            q,
            tma_views.jagged_tma_view(q, max_seqlen, mn_major=False),
            tma_views.jagged_tma_view(k, max_seqlen, mn_major=False),
            tma_views.jagged_tma_view(v, max_seqlen, mn_major=True),
            k, v, out, cu_seqlens, num_targets, None, None, None, max_seqlen, alpha,
            inv_scaling, partials, tickets, chunk_tiles, unsummed, num_contexts, max_attn_len,
            stream,
        )  # fmt: skip

    @cute.jit
    def paged(
        self, q: cute.Tensor, k_new: cute.Tensor, v_new: cute.Tensor, kv_cache: cute.Tensor,
        out: cute.Tensor, cu_seqlens_q: cute.Tensor, num_targets: cute.Tensor,
        page_indptr: cute.Tensor, page_ids: cute.Tensor, last_page_len: cute.Tensor,
        max_seqlen_q: Int32, alpha: Float32, inv_scaling: Float32, partials: cute.Tensor,
        tickets: cute.Tensor, chunk_tiles: Int32, unsummed: Int32, num_contexts: Int32,
        max_attn_len: Int32, stream,
    ):  # fmt: skip
        """New history + target rows over a paged cache ``kv_cache [pages, 2, 32, heads, D]``
        (one page per key tile). Split-KV arguments: see :meth:`_launch`; ``num_contexts``/
        ``max_attn_len``: read by a ``windowed`` variant only."""
        self._launch(
            q,
            tma_views.jagged_tma_view(q, max_seqlen_q, mn_major=False),
            tma_views.page_tma_view(kv_cache, 0, mn_major=False),
            tma_views.page_tma_view(kv_cache, 1, mn_major=True),
            k_new, v_new, out, cu_seqlens_q, num_targets, page_indptr, page_ids, last_page_len,
            max_seqlen_q, alpha, inv_scaling, partials, tickets, chunk_tiles, unsummed,
            num_contexts, max_attn_len, stream,
        )  # fmt: skip

    def _mmas(self):
        k_major = cute.nvgpu.OperandMajorMode.K
        # Two warpgroups along M: each issues m64nN wgmmas for its 64 rows.
        qk = sm90_utils.make_trivial_tiled_mma(
            self.dtype, self.dtype, k_major, k_major, Float32, (CONSUMER_WARPGROUPS, 1, 1),
            (64, self.tile_n),
        )  # fmt: skip
        # P from registers; V read MN-major (head dim contiguous).
        pv = sm90_utils.make_trivial_tiled_mma(
            self.dtype, self.dtype, k_major, cute.nvgpu.OperandMajorMode.MN, Float32,
            (CONSUMER_WARPGROUPS, 1, 1), (64, self.head_dim), warpgroup.OperandSource.RMEM,
        )  # fmt: skip
        return qk, pv

    @cute.jit
    def _launch(
        self, q, q_view, k_view, v_view, k_self, v_self, out, cu_seqlens_q, num_targets,
        page_indptr, page_ids, last_page_len, pad: Int32, alpha: Float32, inv_scaling: Float32,
        partials, tickets, chunk_tiles: Int32, unsummed: Int32, num_contexts: Int32,
        max_attn_len: Int32, stream,
    ):  # fmt: skip
        """Split-KV: the grid has ``S = partials.shape[0]`` CTAs per query tile; split ``s``
        walks the tile's history key tiles ``[f + s c, f + (s + 1) c)`` (``f``: the tile's first
        history key tile, 0 unless ``windowed``) with ``c = max(chunk_tiles,
        ceil(n / S))`` for a tile of ``n`` key tiles (``chunk_tiles = 0``: equal parts). A
        tile walked by more than one split writes fp32 ``partials [S, rows, heads, D]``, and
        the split that finishes last (``tickets``: int32, one per query tile, zero before the
        call and after it) sums them in split order into ``out``. ``S = 1``: ``partials`` and
        ``tickets`` are not touched. ``unsummed`` (nonzero, with ``S > 1``): split ``s`` of
        every query tile writes its partial into ``partials[s]`` (zeros where it has no keys)
        and nothing is summed nor written to ``out``; ``tickets`` are not touched.

        The grid is one-dimensional in longest-first order over all sequences and heads
        (:func:`hc.lpt_tile`), so that a grid of several waves starts its long tiles first."""
        qk_mma, pv_mma = self._mmas()
        q_smem = sm90_utils.make_smem_layout_a(LayoutEnum.ROW_MAJOR, self.qk_tiler, self.dtype, 1)
        k_smem = sm90_utils.make_smem_layout_b(
            LayoutEnum.ROW_MAJOR, self.qk_tiler, self.dtype, self.kv_stages
        )
        v_smem = sm90_utils.make_smem_layout_b(
            LayoutEnum.COL_MAJOR, self.pv_tiler, self.dtype, self.kv_stages
        )
        load_op = cpasync.CopyBulkTensorTileG2SOp()
        q_one = cute.select(q_smem, mode=[0, 1])
        k_one = cute.select(k_smem, mode=[0, 1])
        v_one = cute.select(v_smem, mode=[0, 1])
        tma_q, q_tma = cpasync.make_tiled_tma_atom(load_op, q_view, q_one, (TILE_M, self.head_dim))
        tma_k, k_tma = cpasync.make_tiled_tma_atom(
            load_op, k_view, k_one, (self.tile_n, self.head_dim)
        )
        tma_v, v_tma = cpasync.make_tiled_tma_atom(
            load_op, v_view, v_one, (self.head_dim, self.tile_n)
        )
        self.q_bytes = cute.size_in_bytes(self.dtype, q_one)
        self.kv_bytes = cute.size_in_bytes(self.dtype, k_one)

        @cute.struct
        class SharedStorage:
            q_bars: cute.struct.MemRange[Int64, 2]
            k_bars: cute.struct.MemRange[Int64, self.kv_stages * 2]
            v_bars: cute.struct.MemRange[Int64, self.kv_stages * 2]
            ticket: cute.struct.MemRange[Int32, 1]  # split-KV: this split's arrival order
            sQ: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(q_smem)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(k_smem)], 1024]
            sV: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(v_smem)], 1024]

        self.shared_storage = SharedStorage
        batch = cu_seqlens_q.shape[0] - 1
        heads = out.shape[1]
        grid = ((pad + TILE_M - 1) // TILE_M * batch * heads * partials.shape[0], 1, 1)
        self.kernel(
            qk_mma, pv_mma, tma_q, q_tma, tma_k, k_tma, tma_v, v_tma,
            q, k_self, v_self, out, cu_seqlens_q, num_targets,
            page_indptr, page_ids, last_page_len, pad, alpha, inv_scaling,
            partials, tickets, chunk_tiles, unsummed, num_contexts, max_attn_len,
            q_smem, k_smem, v_smem,
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
        partials: cute.Tensor,
        tickets: cute.Tensor,
        chunk_tiles: Int32,
        unsummed: Int32,
        num_contexts: Int32,
        max_attn_len: Int32,
        q_smem: cute.ComposedLayout,
        k_smem: cute.ComposedLayout,
        v_smem: cute.ComposedLayout,
    ):
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        bx, _, _ = cute.arch.block_idx()
        num_splits = partials.shape[0]
        batch, heads, m_blocks = (
            cu_seqlens_q.shape[0] - 1,
            out.shape[1],
            (pad + TILE_M - 1) // TILE_M,
        )
        m_block, head, b, split = hc.lpt_tile(bx, batch, heads, num_splits, m_blocks)
        if cutlass.const_expr(self.windowed):
            m_block = hc.contexts_first(m_block, m_blocks, num_contexts, TILE_M)

        seq = hc.sequence_info(
            b, cu_seqlens_q, num_targets, page_indptr, last_page_len,
            page_size=PAGE_SIZE, paged=self.is_paged,
        )  # fmt: skip
        row0 = m_block * TILE_M
        if row0 < seq.q_len:
            p0 = seq.q_pos0 + row0
            p1 = seq.q_pos0 + cutlass.min(seq.q_len, row0 + TILE_M)
            # History tiles only: target keys enter through the epilogue's self term.
            window = None
            if cutlass.const_expr(self.windowed):
                kv_first, n_kv = hc.window_tile_range(
                    p0, p1, seq.history, num_contexts, max_attn_len, self.tile_n
                )
                window = Window(num_contexts, max_attn_len, p1 - 1)
            else:
                kv_first = 0
                _, n_kv, _ = hc.kv_tile_range(p0, p1, seq.history, seq.total, self.tile_n)
            span = n_kv - kv_first
            chunk = cutlass.max(cutlass.max(chunk_tiles, (span + num_splits - 1) // num_splits), 1)
            pieces = cutlass.max((span + chunk - 1) // chunk, 1)  # splits with work here
            kv_begin = kv_first + split * chunk
            kv_end = cutlass.min(n_kv, kv_begin + chunk)
            ticket = (b * heads + head) * m_blocks + m_block
            split_kv = SplitKV(split, pieces, partials, tickets, ticket, unsummed)
            if split < pieces:
                self._tile(
                    warp, tma_q, mQ, tma_k, mK, tma_v, mV, qk_mma, pv_mma, q, k_self, v_self,
                    out, seq, page_ids, m_block, row0, p0, pad, head, kv_begin, kv_end, alpha,
                    inv_scaling, split_kv, window, q_smem, k_smem, v_smem,
                )  # fmt: skip
            elif unsummed != 0:
                # No keys for this split here, but the caller sums every split's partial.
                tidx, _, _ = cute.arch.thread_idx()
                rows = cutlass.min(seq.q_len - row0, TILE_M)
                for e in cutlass.range(tidx, rows * self.head_dim, THREADS, unroll=1):
                    row = seq.q_start + row0 + e // self.head_dim
                    partials[split, row, head, e % self.head_dim] = Float32(0.0)

    @cute.jit
    def _tile(
        self, warp, tma_q, mQ, tma_k, mK, tma_v, mV, qk_mma, pv_mma, q, k_self, v_self, out, seq,
        page_ids, m_block, row0, p0, pad, head, kv_begin, kv_end, alpha, inv_scaling, split_kv,
        window, q_smem, k_smem, v_smem,
    ):  # fmt: skip
        """One CTA's work: the query tile's history key tiles ``[kv_begin, kv_end)``."""
        if warp == PRODUCER_WARP:
            cpasync.prefetch_descriptor(tma_q)
            cpasync.prefetch_descriptor(tma_k)
            cpasync.prefetch_descriptor(tma_v)

        storage = cutlass.memory.SmemAllocator().allocate(self.shared_storage)
        consumer_warps = pipeline.CooperativeGroup(pipeline.Agent.Thread, CONSUMER_THREADS // 32)
        one = pipeline.CooperativeGroup(pipeline.Agent.Thread, 1)
        q_prod, q_cons = pipeline.PipelineTmaAsync.create(
            num_stages=1, producer_group=one, consumer_group=consumer_warps,
            tx_count=self.q_bytes, barrier_storage=storage.q_bars.data_ptr(),
        ).make_participants()  # fmt: skip
        k_prod, k_cons = pipeline.PipelineTmaAsync.create(
            num_stages=self.kv_stages, producer_group=one, consumer_group=consumer_warps,
            tx_count=self.kv_bytes, barrier_storage=storage.k_bars.data_ptr(),
        ).make_participants()  # fmt: skip
        v_prod, v_cons = pipeline.PipelineTmaAsync.create(
            num_stages=self.kv_stages, producer_group=one, consumer_group=consumer_warps,
            tx_count=self.kv_bytes, barrier_storage=storage.v_bars.data_ptr(),
        ).make_participants()  # fmt: skip

        sTicket = storage.ticket.get_tensor(cute.make_layout(1))
        sQ = storage.sQ.get_tensor(q_smem.outer, swizzle=q_smem.inner)
        sK = storage.sK.get_tensor(k_smem.outer, swizzle=k_smem.inner)
        sV = storage.sV.get_tensor(v_smem.outer, swizzle=v_smem.inner)

        if warp >= PRODUCER_WARP:
            cute.arch.setmaxregister_decrease(PRODUCER_REGS)
            if warp == PRODUCER_WARP and kv_end > kv_begin:
                self.load_role(
                    tma_q, mQ, tma_k, mK, tma_v, mV, sQ, sK, sV, q_prod, k_prod, v_prod,
                    seq, page_ids, m_block, pad, head, kv_begin, kv_end,
                )  # fmt: skip
        else:
            cute.arch.setmaxregister_increase(CONSUMER_REGS)
            self.consumer_role(
                qk_mma, pv_mma, sQ, sK, sV, q_cons, k_cons, v_cons, q, k_self, v_self, out,
                seq, row0, p0, head, kv_begin, kv_end, alpha, inv_scaling, split_kv, sTicket,
                window,
            )  # fmt: skip

    # ------------------------------------------------------------------ roles

    @cute.jit
    def load_role(
        self, tma_q, mQ, tma_k, mK, tma_v, mV, sQ, sK, sV, q_prod, k_prod, v_prod,
        seq, page_ids, m_block, pad, head, kv_begin, kv_end,
    ):  # fmt: skip
        """TMA producer: the Q tile, then K_i and V_i for history tiles ``kv_begin <= i <
        kv_end``."""
        mQ_b = jagged_window(mQ, pad, seq.q_start, seq.q_len, mn_major=False)
        gQ = cute.flat_divide(mQ_b, (TILE_M, self.head_dim))
        tQsQ, tQgQ = cpasync.tma_partition(
            tma_q, 0, cute.make_layout(1), cute.group_modes(sQ, 0, 2), cute.group_modes(gQ, 0, 2)
        )
        mK_b, mV_b = tma_views.history_windows(mK, mV, pad, seq, self.is_paged)
        gK = cute.flat_divide(mK_b, (self.tile_n, self.head_dim))
        tKsK, tKgK = cpasync.tma_partition(
            tma_k, 0, cute.make_layout(1), cute.group_modes(sK, 0, 2), cute.group_modes(gK, 0, 2)
        )
        gV = cute.flat_divide(mV_b, (self.head_dim, self.tile_n))
        tVsV, tVgV = cpasync.tma_partition(
            tma_v, 0, cute.make_layout(1), cute.group_modes(sV, 0, 2), cute.group_modes(gV, 0, 2)
        )
        h = q_prod.acquire_and_advance()
        cute.copy(tma_q, tQgQ[None, m_block, 0, (head, 0)], tQsQ[None, 0], tma_bar_ptr=h.barrier)
        for i in cutlass.range(kv_begin, kv_end, unroll=1):
            k_src, v_src = tma_views.history_tile_sources(
                tKgK, tVgV, i, seq, page_ids, head, self.is_paged
            )
            h = k_prod.acquire_and_advance()
            cute.copy(tma_k, k_src, tKsK[None, h.index], tma_bar_ptr=h.barrier)
            h = v_prod.acquire_and_advance()
            cute.copy(tma_v, v_src, tVsV[None, h.index], tma_bar_ptr=h.barrier)

    @cute.jit
    def consumer_role(
        self, qk_mma, pv_mma, sQ, sK, sV, q_cons, k_cons, v_cons, q, k_self, v_self, out,
        seq, row0, p0, head, kv_begin, kv_end, alpha, inv_scaling, split_kv, sTicket, window,
    ):  # fmt: skip
        """One warpgroup's 64 rows: the key-tile loop over ``[kv_begin, kv_end)``, then the
        epilogue."""
        tidx, _, _ = cute.arch.thread_idx()
        wg = tidx // 128  # this thread's consumer warpgroup
        wg_qk = qk_mma.get_slice(wg * 128)
        wg_pv = pv_mma.get_slice(wg * 128)
        thr_qk = qk_mma.get_slice(tidx)
        thr_pv = pv_mma.get_slice(tidx)
        tSrQ = wg_qk.make_fragment_A(wg_qk.partition_A(sQ))
        tSrK = wg_qk.make_fragment_B(wg_qk.partition_B(sK))
        tOrV = wg_pv.make_fragment_B(wg_pv.partition_B(sV))
        acc_O = cute.make_rmem_tensor(wg_pv.partition_shape_C(self.pv_tiler[:2]), Float32)
        acc_O.fill(0.0)
        cS_mn = _mn_view(thr_qk.partition_C(cute.make_identity_tensor(self.qk_tiler[:2])))

        if kv_end > kv_begin:
            q_h = q_cons.wait_and_advance()
            rQ = tSrQ[None, None, None, 0]
            if cutlass.const_expr(self.pingpong):  # noqa: SIM102 (compile-time)
                if wg == 1:
                    self._hand_over(0)  # warpgroup 0 issues first
            acc_S = cute.make_rmem_tensor(wg_qk.partition_shape_C(self.qk_tiler[:2]), Float32)
            rP = cute.make_fragment_like(acc_S, self.dtype)
            tOrP = cute.make_tensor(rP.iterator, _acc_to_a_operand(rP.layout))
            # P_i V_i is issued with S_{i+1} = Q K_{i+1}^T, so SiLU(S_{i+1}) runs while the
            # tensor cores do P_i V_i (FlashAttention-3's intra-warpgroup overlap). rP is
            # rewritten only once P_i V_i, its reader, is done.
            k_h = k_cons.wait_and_advance()
            self._zero_tail(sK, k_h.index, None, 0, seq, kv_begin, tidx)
            self._take_turn(wg)
            _wgmma(qk_mma, acc_S, rQ, tSrK[None, None, None, k_h.index], True, wait=False)
            self._hand_over(1 - wg)
            warpgroup.wait_group(0)
            k_h.release()
            self._scores_to_p(acc_S, rP, cS_mn, seq, p0, kv_begin, alpha, inv_scaling, window)
            for i in cutlass.range(kv_begin + 1, kv_end, unroll=1):
                k_h = k_cons.wait_and_advance()
                self._zero_tail(sK, k_h.index, None, 0, seq, i, tidx)
                v_h = v_cons.wait_and_advance()
                self._take_turn(wg)
                _wgmma(qk_mma, acc_S, rQ, tSrK[None, None, None, k_h.index], True, wait=False)
                _wgmma(pv_mma, acc_O, tOrP, tOrV[None, None, None, v_h.index], False, wait=False)
                self._hand_over(1 - wg)
                warpgroup.wait_group(1)  # S_i is ready; P_{i-1} V_{i-1} may still run
                k_h.release()
                self._scores_to_p(
                    acc_S, rP, cS_mn, seq, p0, i, alpha, inv_scaling, window, wait=True
                )
                v_h.release()
            v_h = v_cons.wait_and_advance()
            self._zero_tail(None, 0, sV, v_h.index, seq, kv_end - 1, tidx)
            self._take_turn(wg)
            _wgmma(pv_mma, acc_O, tOrP, tOrV[None, None, None, v_h.index], False, wait=False)
            if wg == 0:  # warpgroup 1's last hand-over has no taker
                self._hand_over(1)
            warpgroup.wait_group(0)
            v_h.release()
            q_h.release()

        # ---- epilogue: O (+ the self term of target rows) -> global memory ---------------
        cO_mn = _mn_view(thr_pv.partition_C(cute.make_identity_tensor(self.pv_tiler[:2])))
        o_mn = _mn_view(acc_O)
        rows = cute.size(o_mn, mode=[0])
        cols = cute.size(o_mn, mode=[1])
        for r in cutlass.range_constexpr(rows):
            row = row0 + cO_mn[r, 0][0]
            g = seq.q_start + row
            # Split 0 adds the self term (every split sees the target row, one must add it).
            is_target = (row < seq.q_len) & (seq.q_pos0 + row >= seq.history)
            is_target = is_target & (split_kv.split == 0)
            # The four threads of a quad hold the same rows: each sums its own columns of
            # q.k and the quad adds them up (every thread runs the shuffles).
            part = Float32(0.0)
            if is_target:
                for c in cutlass.range_constexpr(cols):
                    d = cO_mn[0, c][1]
                    part += Float32(q[g, head, d]) * Float32(k_self[g, head, d])
            part += cute.arch.shuffle_sync_bfly(part, offset=1)
            part += cute.arch.shuffle_sync_bfly(part, offset=2)
            if is_target:
                w = cute.make_rmem_tensor((1,), Float32)
                w[0] = part
                hc.silu_scale_(w, alpha, inv_scaling, self.fast_tanh)
                # Rounded to the input dtype, as every history key's weight is (the P V MMA's
                # operand), so that all keys' weights carry the same rounding.
                p_self = w[0].to(self.dtype).to(Float32)
                for c in cutlass.range_constexpr(cols):
                    d = cO_mn[0, c][1]
                    o_mn[r, c] = o_mn[r, c] + p_self * Float32(v_self[g, head, d])
        if split_kv.unsummed != 0:
            self._store_partial(o_mn, cO_mn, seq, row0, head, split_kv)
        elif split_kv.pieces > 1:
            self._sum_splits(o_mn, cO_mn, out, seq, row0, head, split_kv, sTicket, tidx)
        else:
            self._store(o_mn, cO_mn, out, seq, row0, head)

    @cute.jit
    def _store(self, o_mn, cO_mn, out, seq, row0, head):
        """This thread's rows of O, cast to the output dtype, into ``out``."""
        for r in cutlass.range_constexpr(cute.size(o_mn, mode=[0])):
            row = row0 + cO_mn[r, 0][0]
            if row < seq.q_len:
                for c in cutlass.range_constexpr(cute.size(o_mn, mode=[1])):
                    out[seq.q_start + row, head, cO_mn[0, c][1]] = o_mn[r, c].to(self.dtype)

    @cute.jit
    def _store_partial(self, o_mn, cO_mn, seq, row0, head, split_kv):
        """This thread's rows of O, in fp32, into ``partials[split]``."""
        partials = split_kv.partials
        for r in cutlass.range_constexpr(cute.size(o_mn, mode=[0])):
            row = row0 + cO_mn[r, 0][0]
            if row < seq.q_len:
                for c in cutlass.range_constexpr(cute.size(o_mn, mode=[1])):
                    partials[split_kv.split, seq.q_start + row, head, cO_mn[0, c][1]] = o_mn[r, c]

    @cute.jit
    def _sum_splits(self, o_mn, cO_mn, out, seq, row0, head, split_kv, sTicket, tidx):
        """Split-KV epilogue: write this split's fp32 partial; the split of the query tile
        that finishes last (the tile's ticket counts arrivals) sums all partials in split
        order (deterministic: the same sum whichever split is last) into ``out`` and zeroes
        the ticket again."""
        rows = cute.size(o_mn, mode=[0])
        cols = cute.size(o_mn, mode=[1])
        partials = split_kv.partials
        self._store_partial(o_mn, cO_mn, seq, row0, head, split_kv)
        # Release: every thread's partial stores before the ticket (threadfence reduction).
        cute.arch.fence_acq_rel_gpu()
        cute.arch.barrier(barrier_id=EPILOGUE_BARRIER, number_of_threads=CONSUMER_THREADS)
        if tidx == 0:
            sTicket[0] = cute.arch.atomic_add(
                split_kv.tickets.iterator + split_kv.ticket, Int32(1), sem="acq_rel", scope="gpu"
            )
        cute.arch.barrier(barrier_id=EPILOGUE_BARRIER, number_of_threads=CONSUMER_THREADS)
        if sTicket[0] == split_kv.pieces - 1:  # the last split of this query tile
            if tidx == 0:
                split_kv.tickets[split_kv.ticket] = Int32(0)
            cute.arch.fence_acq_rel_gpu()  # acquire: the other splits' partials
            o_mn.fill(0.0)
            for s in cutlass.range(split_kv.pieces, unroll=1):
                for r in cutlass.range_constexpr(rows):
                    row = row0 + cO_mn[r, 0][0]
                    if row < seq.q_len:
                        for c in cutlass.range_constexpr(cols):
                            d = cO_mn[0, c][1]
                            o_mn[r, c] = o_mn[r, c] + partials[s, seq.q_start + row, head, d]
            self._store(o_mn, cO_mn, out, seq, row0, head)

    @cute.jit
    def _take_turn(self, wg):
        """``pingpong``: wait until the other consumer warpgroup has issued its last GEMM, so
        the two take turns on the tensor cores and each one's SiLU runs under the other's
        MMAs (FlashAttention-3's scheme). Nothing without ``pingpong``."""
        if cutlass.const_expr(self.pingpong):
            cute.arch.barrier(barrier_id=TURN_BARRIER + wg, number_of_threads=CONSUMER_THREADS)

    @cute.jit
    def _hand_over(self, to_wg):
        """``pingpong``: let warpgroup ``to_wg`` issue its next GEMM (see :meth:`_take_turn`)."""
        if cutlass.const_expr(self.pingpong):
            cute.arch.barrier_arrive(
                barrier_id=TURN_BARRIER + to_wg, number_of_threads=CONSUMER_THREADS
            )

    @cute.jit
    def _scores_to_p(
        self, acc_S, rP, cS_mn, seq, p0, i, alpha, inv_scaling, window,
        wait: cutlass.Constexpr = False,
    ):  # fmt: skip
        """S of history tile ``i`` -> P = silu(alpha S) / scaling_seqlen in ``rP`` (masked where
        the tile needs it; ``window``: by the contexts/window rule). ``wait``: the previous P V
        may still read ``rP``; wait for it before the conversion overwrites ``rP`` (the SiLU
        before it runs under that MMA)."""
        if cutlass.const_expr(self.windowed):
            C, W = window.num_contexts, window.max_attn_len
            full = hc.window_tile_is_full(i, self.tile_n, p0, window.p_last, seq.history, C, W)
            if not full:
                hc.mask_tile_(_mn_view(acc_S), cS_mn, p0, i * self.tile_n, seq.history, (C, W))
        elif not hc.tile_is_full(i, self.tile_n, p0, seq.history):
            hc.mask_tile_(_mn_view(acc_S), cS_mn, p0, i * self.tile_n, seq.history)
        hc.silu_scale_(acc_S, alpha, inv_scaling, self.fast_tanh)
        if cutlass.const_expr(wait):
            warpgroup.wait_group(0)
        rP.store(acc_S.load().to(self.dtype))

    @cute.jit
    def _zero_tail(self, sK, k_stage, sV, v_stage, seq, i, tidx):
        """Paged only: zero the K rows (``sK``) and/or the V rows (``sV``; ``None``: not that
        one) of history tile ``i`` that lie past the history (a last page's tail holds
        anything; see the module docstring), by all consumer threads, then make the stores
        visible to the tensor cores' async-proxy reads.

        Only the last history tile can have a tail, and both consumer warpgroups of the CTA
        walk the same tiles, so both reach the named barrier together (whatever the split).
        The loop must never visit a tile past the history: its ``valid`` would be <= 0."""
        if cutlass.const_expr(self.is_paged):
            valid = seq.history - i * self.tile_n
            if valid < self.tile_n:
                d_size = self.head_dim
                for e in cutlass.range(
                    tidx, (self.tile_n - valid) * d_size, CONSUMER_THREADS, unroll=1
                ):
                    r = valid + e // d_size
                    d = e % d_size
                    if cutlass.const_expr(sK is not None):
                        sK[r, d, k_stage] = self.dtype(0.0)
                    if cutlass.const_expr(sV is not None):
                        sV[d, r, v_stage] = self.dtype(0.0)
                cute.arch.fence_proxy("async.shared", space="cta")
                cute.arch.barrier(barrier_id=ZERO_TAIL_BARRIER, number_of_threads=CONSUMER_THREADS)


@cute.jit
def _wgmma(tiled_mma, acc, a, b, zero_init: cutlass.Constexpr, wait: cutlass.Constexpr = True):
    """``acc (+)= a @ b`` over the K blocks of one tile; ``wait``: waited for before returning
    (else the caller waits, ``warpgroup.wait_group(0)``, before it reads ``acc``)."""
    warpgroup.fence()
    # A fresh atom: setting its ACCUMULATE field must not rebind the caller's tiled MMA.
    atom = cute.make_mma_atom(tiled_mma.op)
    atom.set(warpgroup.Field.ACCUMULATE, not zero_init)
    for k in cutlass.range_constexpr(cute.size(a.shape[2])):
        cute.gemm(atom, acc, a[None, None, k], b[None, None, k], acc)
        atom.set(warpgroup.Field.ACCUMULATE, True)
    warpgroup.commit_group()
    if cutlass.const_expr(wait):
        warpgroup.wait_group(0)


def _mn_view(acc: cute.Tensor) -> cute.Tensor:
    """A wgmma accumulator fragment ``((2, 2, V), MMA_M, MMA_N)`` as ``(rows, cols)``:
    rows ``(2, MMA_M)`` (the row pair 8 apart), cols ``(2, V, MMA_N)``."""
    lay = cute.make_layout(acc.layout.shape)
    mn = cute.make_layout(
        ((lay.shape[0][1], lay.shape[1]), (lay.shape[0][0], lay.shape[0][2], lay.shape[2])),
        stride=(
            (lay.stride[0][1], lay.stride[1]),
            (lay.stride[0][0], lay.stride[0][2], lay.stride[2]),
        ),
    )
    return cute.make_tensor(acc.iterator, cute.composition(acc.layout, mn))


def _acc_to_a_operand(acc_layout: cute.Layout) -> cute.Layout:
    """The S accumulator layout ``((2, 2, N / 8), MMA_M, MMA_N)`` read as the register A
    operand of the P@V wgmma, ``((2, 2, 2), MMA_M, (N / 16, MMA_N))``: for 16-bit types a
    thread holds the same (row, key) elements in both, grouped by K blocks of 16."""
    div = cute.logical_divide(acc_layout, ((None, None, 2), None, None))
    return cute.make_layout(
        (
            (div.shape[0][0], div.shape[0][1], div.shape[0][2][0]),
            div.shape[1],
            (div.shape[0][2][1], div.shape[2]),
        ),
        stride=(
            (div.stride[0][0], div.stride[0][1], div.stride[0][2][0]),
            div.stride[1],
            (div.stride[0][2][1], div.stride[2]),
        ),
    )


def build_variant(arch: str, torch_dtype, head_dim: int, paged: bool, windowed: bool = False):
    """``(host_fn, variant, fake_args)`` of one variant (:func:`tma_variants.variant`): the
    arguments of ``compile.fake_attention_args`` with the split-KV ``partials, tickets,
    chunk_tiles, unsummed`` and the mask's ``num_contexts, max_attn_len`` before the stream
    (:meth:`HopperHstuForward._launch`). Loaded or compiled through
    :func:`tma_variants.get_kernel`."""
    from hstu_kernels.backends.cutedsl import compile as cc

    dtype = cc.cutlass_dtype(torch_dtype)
    variant = tma_variants.variant("hopper", torch_dtype, head_dim, paged, windowed)
    kernel = HopperHstuForward(
        dtype, head_dim, paged, fast_tanh=variant["silu"] == "tanh",
        pingpong=variant["pingpong"], tile_n=variant["tile_n"], windowed=variant["windowed"],
    )  # fmt: skip

    def fake_args():
        *args, stream = cc.fake_attention_args(dtype, head_dim, paged=paged, page_size=PAGE_SIZE)
        partials = cc.fake_tensor(cutlass.Float32, (None, None, None, head_dim))
        tickets = cc.fake_tensor(cutlass.Int32, (None,), align=4)
        ints = (cutlass.Int32(0) for _ in range(4))  # chunk_tiles, unsummed, C, W
        return (*args, partials, tickets, *ints, stream)

    host_fn = kernel.paged if paged else kernel.jagged
    return host_fn, variant, fake_args
