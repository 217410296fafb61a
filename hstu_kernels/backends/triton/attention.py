"""Triton HSTU attention forward: jagged (no cache) and paged (delta) in one kernel.

One program computes a ``BLOCK_M`` tile of one sequence's query rows for one head (and, when
the grid is too small to fill the GPU, one of ``splits`` contiguous chunks of its KV range).
Sequence ``b`` has ``Lq`` query rows: ``N`` new history rows (positions ``H-N .. H-1``) then
``T`` targets (positions ``H .. H+T-1``); the jagged case is ``N = H``. Keys come in two parts:

- history keys ``0 .. H-1``: from ``k``/``v`` rows (jagged) or from the pages (paged); a query
  tile visits only keys up to its last position (never past ``H``), and only the tiles that
  straddle the causal edge apply a mask;
- target keys: each target sees only itself among the targets, so a tile visits only the
  diagonal block of its own target rows (from ``k``/``v`` rows, never cached).

HSTU needs no softmax rescaling, so the partial sums of KV chunks simply add. Two ways to
combine them (both deterministic and CUDA-graph capturable: sizes come from shapes only):

- paged (every tile alike, split evenly into ``splits`` chunks): each program writes its fp32
  partial into a workspace and a second kernel sums them in a fixed order;
- jagged (tiles of very different lengths): chunks have a fixed length, so only the long
  tiles are split; a short tile's single program stores its output directly, and the chunks
  of a long one take tickets from the tile's counter after writing their partials: the
  program with the last ticket sums the partials in chunk order and stores the output. No
  second kernel and no workspace traffic for the short tiles. (On the even paged split this
  "last ticket" combine measured slower than the second kernel: 59 against 37 us at B=1,
  where each tile's 11 partials are summed by one SM instead of by all of them.)
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from hstu_kernels import split_kv
from hstu_kernels.backends.triton.config import Config
from hstu_kernels.backends.triton.launcher import FixedLaunch, cdiv
from hstu_kernels.dispatch import sm_count
from hstu_kernels.validation import is_capturing

LOG2E = math.log2(math.e)


@triton.jit
def _silu_weight(s, alpha, neg_alpha_log2e, FAST_SILU: tl.constexpr):
    """``silu(alpha * s)`` (``1 / scaling_seqlen`` comes at the end).

    It is this weight that is rounded to the input dtype before the second matmul, as the
    reference rounds it (DESIGN.md §5): rounding ``silu(alpha * s) / alpha`` instead, with an
    alpha that is not a power of two (head dim 128), gave errors up to 1.07x the tolerance in
    ~1 % of small random cases (H100, and the CPU interpreter in fp16).

    ``FAST_SILU`` (GPU, 16-bit inputs) writes the sigmoid as ``(1 + tanh(x/2)) / 2`` with one
    ``tanh.approx`` instruction: one special-function op per score instead of two (exp2 and a
    reciprocal), which bounds the kernel at small head dims. Its error (~2^-11) is below the
    bf16 rounding of the weights before the second matmul.
    """
    x = s * alpha
    if FAST_SILU:
        half = 0.5 * x
        t = tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=r,r", [half], dtype=tl.float32, is_pure=True, pack=1,
        )  # fmt: skip
        return half + half * t
    else:
        return tl.fdiv(x, 1.0 + tl.exp2(s * neg_alpha_log2e))


@triton.jit
def _window_start(p, H, num_contexts, max_attn_len):
    """The first history key a row at position ``p`` sees (DESIGN.md §1 on clamped ids): at
    ``P = min(p, H)``, ``P - W``, or 0 while its window still reaches the contexts (``P - W <
    C``, or no window). It grows with ``p``."""
    start = tl.minimum(p, H) - max_attn_len
    return tl.where((max_attn_len > 0) & (start >= num_contexts), start, 0)


@triton.jit
def _key_rows(
    PAGE_IDS,
    page_start,
    n,
    H,
    row_base,
    offs_n,
    stride_tok,
    stride_page,
    stride_slot,
    PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TMA: tl.constexpr,
):
    """Element offsets (int64 ``[BLOCK_N]``) of history keys ``n .. n+BLOCK_N-1``' rows.

    Paged: relative to ``KV + h*D`` through the page table (keys past ``H`` get offset 0, so
    a prefetch past the end reads nothing out of the table); jagged: relative to ``K``/``V``.
    ``TMA`` (paged, ``BLOCK_N <= PAGE_SIZE``): the first K row of the tile in the cache seen
    as ``[pages * 2 * PAGE_SIZE, heads * D]`` rows (a scalar; its V rows are PAGE_SIZE on).
    """
    j = n + offs_n
    if PAGED and TMA:
        page = tl.load(PAGE_IDS + page_start + n // PAGE_SIZE, mask=n < H, other=0)
        rows = page * (2 * PAGE_SIZE) + n % PAGE_SIZE
    elif PAGED:
        if BLOCK_N <= PAGE_SIZE:
            # The whole tile lies in one page (n is a multiple of BLOCK_N): one lookup.
            page = tl.load(PAGE_IDS + page_start + n // PAGE_SIZE, mask=n < H, other=0)
            rows = page.to(tl.int64) * stride_page + ((n % PAGE_SIZE) + offs_n) * stride_slot
        elif BLOCK_N // PAGE_SIZE <= 8:
            # The tile spans a few whole pages: one scalar lookup per page, selected per row
            # (a gather of one page id per key costs ~8 % at BN=64, 32-token pages).
            first = n // PAGE_SIZE
            page = tl.zeros([BLOCK_N], dtype=tl.int64)
            for i in tl.static_range(BLOCK_N // PAGE_SIZE):
                p_i = tl.load(
                    PAGE_IDS + page_start + first + i, mask=n + i * PAGE_SIZE < H, other=0
                )
                page = tl.where(offs_n // PAGE_SIZE == i, p_i.to(tl.int64), page)
            rows = page * stride_page + (offs_n % PAGE_SIZE) * stride_slot
        else:
            # Many small pages per tile: one lookup per key (cached; pages repeat).
            pages = tl.load(PAGE_IDS + page_start + j // PAGE_SIZE, mask=j < H, other=0)
            rows = pages.to(tl.int64) * stride_page + (j % PAGE_SIZE) * stride_slot
    else:
        rows = row_base + j.to(tl.int64) * stride_tok
    return rows


@triton.jit
def _history_tile(
    acc,
    q,
    n,
    rows,
    pos,
    H,
    K_BASE,
    V_BASE,
    KV_DESC,
    desc_col,
    alpha,
    neg_alpha_log2e,
    offs_n,
    offs_d,
    row_lo,
    row_ctx,
    S_BASE,
    stride_kv,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FAST_SILU: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    TMA: tl.constexpr,
    WINDOWED: tl.constexpr,
    KV_FP8: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Accumulate one tile of history keys ``n .. n+BLOCK_N-1`` (at ``rows``) into ``acc``.
    ``WINDOWED``: each row sees keys from ``row_lo`` on, and a context row (``row_ctx``) the
    whole history. ``KV_FP8``: the pages are e4m3 with one fp32 scale per token and head at
    ``S_BASE + rows // HEAD_DIM`` (K; V ``stride_kv`` elements on), which factor out of the
    dot products: ``q . k_j = s_j (q . k8_j)``, ``sum_j w_j v_j = sum_j (w_j t_j) v8_j``."""
    j = n + offs_n
    if TMA:
        # One tensor-memory copy per operand. Past the history, the key's weight is masked
        # below, and its V row (it may hold NaN) is zeroed so that 0 * NaN does not occur.
        k = KV_DESC.load([rows, desc_col])
        v = KV_DESC.load([rows + PAGE_SIZE, desc_col])
        if MASKED:
            v = tl.where((j < H)[:, None], v, 0.0)
    else:
        k_ptrs = K_BASE + rows[:, None] + offs_d[None, :]
        v_ptrs = V_BASE + rows[:, None] + offs_d[None, :]
        if MASKED:
            # Slots past the history (the tail of the last page) may hold anything, NaN too.
            k = tl.load(k_ptrs, mask=(j < H)[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=(j < H)[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
    if KV_FP8:
        # e4m3 fits 16-bit floats exactly: the matmuls see the stored codes, the scales are
        # applied in fp32. Past the history a scale may be NaN: masked to 0 like the V rows.
        k_scale = tl.load(S_BASE + rows // HEAD_DIM, mask=j < H, other=0.0)
        v_scale = tl.load(S_BASE + (rows + stride_kv) // HEAD_DIM, mask=j < H, other=0.0)
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if KV_FP8:
        s = s * k_scale[None, :]
    w = _silu_weight(s, alpha, neg_alpha_log2e, FAST_SILU)
    if MASKED:
        if WINDOWED:
            valid = (j[None, :] <= pos[:, None]) | row_ctx[:, None]
            valid = valid & (j[None, :] >= row_lo[:, None]) & (j < H)[None, :]
        else:
            valid = (j[None, :] <= pos[:, None]) & (j < H)[None, :]
        w = tl.where(valid, w, 0.0)
    if KV_FP8:
        w = w * v_scale[None, :]
    return tl.dot(w.to(v.dtype), v, acc, input_precision=DOT_PRECISION)


@triton.jit
def _history_range(
    acc,
    q,
    lo,
    hi,
    pos,
    H,
    K_BASE,
    V_BASE,
    KV_DESC,
    desc_col,
    PAGE_IDS,
    page_start,
    row_base,
    stride_tok,
    stride_page,
    stride_slot,
    alpha,
    neg_alpha_log2e,
    offs_n,
    offs_d,
    row_lo,
    row_ctx,
    S_BASE,
    stride_kv,
    MASKED: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FAST_SILU: tl.constexpr,
    PREFETCH: tl.constexpr,
    TMA: tl.constexpr,
    WINDOWED: tl.constexpr,
    KV_FP8: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Accumulate history key tiles ``lo, lo+BLOCK_N, .. < hi``.

    ``PREFETCH`` looks up the next tile's pages one iteration ahead, so the K/V loads never
    wait on a page-table load.
    """
    if PREFETCH:
        rows = _key_rows(
            PAGE_IDS, page_start, lo, H, row_base, offs_n, stride_tok, stride_page, stride_slot,
            PAGED, PAGE_SIZE, BLOCK_N, TMA,
        )  # fmt: skip
        for n in range(lo, hi, BLOCK_N):
            rows_next = _key_rows(
                PAGE_IDS, page_start, n + BLOCK_N, H, row_base, offs_n, stride_tok,
                stride_page, stride_slot, PAGED, PAGE_SIZE, BLOCK_N, TMA,
            )  # fmt: skip
            acc = _history_tile(
                acc, q, n, rows, pos, H, K_BASE, V_BASE, KV_DESC, desc_col, alpha,
                neg_alpha_log2e, offs_n, offs_d, row_lo, row_ctx, S_BASE, stride_kv, MASKED,
                DOT_PRECISION, FAST_SILU, PAGE_SIZE, TMA, WINDOWED, KV_FP8, HEAD_DIM,
            )  # fmt: skip
            rows = rows_next
    else:
        for n in range(lo, hi, BLOCK_N):
            rows = _key_rows(
                PAGE_IDS, page_start, n, H, row_base, offs_n, stride_tok, stride_page,
                stride_slot, PAGED, PAGE_SIZE, BLOCK_N, TMA,
            )  # fmt: skip
            acc = _history_tile(
                acc, q, n, rows, pos, H, K_BASE, V_BASE, KV_DESC, desc_col, alpha,
                neg_alpha_log2e, offs_n, offs_d, row_lo, row_ctx, S_BASE, stride_kv, MASKED,
                DOT_PRECISION, FAST_SILU, PAGE_SIZE, TMA, WINDOWED, KV_FP8, HEAD_DIM,
            )  # fmt: skip
    return acc


@triton.jit
def _attend_tile(
    pid_hb,
    m_tile,
    split,
    splits,
    unit_lo,
    unit_hi,
    units,
    Q,
    K,
    V,
    KV,
    KV_DESC,
    PAGE_IDS,
    PAGE_INDPTR,
    LAST_LEN,
    CU,
    NUM_TARGETS,
    OUT,
    WS,
    TICKETS,
    stride_tok,
    stride_page,
    stride_kv,
    stride_slot,
    ws_stride_split,
    alpha,
    neg_alpha_log2e,
    out_scale,
    num_heads,
    num_m_tiles,
    chunk_tiles,
    num_contexts,
    max_attn_len,
    KV_SCALES,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    PAGED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FAST_SILU: tl.constexpr,
    PREFETCH: tl.constexpr,
    FIXUP: tl.constexpr,
    FIXUP_ROWS: tl.constexpr,
    STREAM_K: tl.constexpr,
    TMA: tl.constexpr,
    WINDOWED: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    """Query tile ``m_tile`` of (sequence, head) ``pid_hb``: piece ``split`` of ``splits``.

    The piece's keys: ``STREAM_K``, units ``unit_lo .. unit_hi`` of the tile's ``units``
    (scaled onto its key tiles); ``FIXUP``, chunk ``split`` of ``chunk_tiles`` key tiles;
    otherwise the ``split``-th of ``splits`` even chunks. A tile in several pieces is combined
    by the last ticket's holder (``STREAM_K``, ``FIXUP``; it leaves its ticket at 0) or by the
    sum kernel.
    """
    b = pid_hb // num_heads
    h = pid_hb % num_heads

    seq_start = tl.load(CU + b)
    Lq = tl.load(CU + b + 1) - seq_start
    m0 = m_tile * BLOCK_M
    if m0 >= Lq:
        return
    N = Lq - tl.load(NUM_TARGETS + b)
    page_start = 0
    if PAGED:
        page_start = tl.load(PAGE_INDPTR + b)
        num_pages = tl.load(PAGE_INDPTR + b + 1) - page_start
        H = (num_pages - 1) * PAGE_SIZE + tl.load(LAST_LEN + b)
    else:
        H = N
    shift = H - N  # position of query row 0

    # History keys [k0, hi): up to the tile's last position, never past the history.
    hi = tl.minimum(shift + m0 + BLOCK_M, H)
    k0 = 0
    lo_full = 0
    if WINDOWED:
        # A row's keys start at its window start and a context row (p < C) sees the whole
        # history. Window starts grow with the row, so the tile's first row sets its range's
        # start and its last row where every row's window has begun.
        lo_first = _window_start(shift + m0, H, num_contexts, max_attn_len)
        p_last = shift + tl.minimum(m0 + BLOCK_M, Lq) - 1
        lo_last = _window_start(p_last, H, num_contexts, max_attn_len)
        k0 = (lo_first // BLOCK_N) * BLOCK_N
        lo_full = tl.cdiv(lo_last, BLOCK_N) * BLOCK_N
        hi = tl.where(shift + m0 < num_contexts, H, hi)
    # Tiles in [lo_full, full_end) are valid for every row of the tile: no mask needed.
    full_end = (tl.minimum(shift + m0 + 1, H) // BLOCK_N) * BLOCK_N
    n_tiles = tl.cdiv(hi - k0, BLOCK_N)
    if STREAM_K:
        # The piece's share of the tile's units, scaled onto its real key tiles (the host
        # sized every tile alike; a longer or shorter history just scales).
        n_chunks = splits
        lo = k0 + ((unit_lo * n_tiles) // units) * BLOCK_N
        end = k0 + ((unit_hi * n_tiles) // units) * BLOCK_N
        last_piece = unit_hi == units
    else:
        if FIXUP:
            # Chunks of chunk_tiles key tiles: a short tile has one chunk (one with no history
            # keys at all still has one, for its targets); programs past its last chunk exit.
            per_split = chunk_tiles
            n_chunks = tl.maximum(tl.cdiv(n_tiles, per_split), 1)
            if split >= n_chunks:
                return
        else:
            # Even chunks (paged); every split writes its partial (zeros when its chunk is
            # empty), summed by the sum kernel: a last piece summing ten partials of its tile
            # alone was measured slower (B=1 delta, 11 splits: 54.2 against 34.7 us, H200).
            per_split = tl.cdiv(n_tiles, splits)
            n_chunks = splits
        lo = k0 + split * per_split * BLOCK_N
        end = k0 + tl.minimum((split + 1) * per_split, n_tiles) * BLOCK_N
        last_piece = split == n_chunks - 1

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_base = seq_start.to(tl.int64) * stride_tok + h * HEAD_DIM
    row_ok = offs_m < Lq
    q = tl.load(
        Q + row_base + offs_m[:, None] * stride_tok + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    pos = shift + offs_m
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    row_ctx = pos < 0  # no context rows
    row_lo = pos * 0
    if WINDOWED:
        row_lo = _window_start(pos, H, num_contexts, max_attn_len)
        row_ctx = pos < num_contexts

    if PAGED:
        k_base = KV + h * HEAD_DIM
        v_base = k_base + stride_kv
    else:
        k_base = K
        v_base = V
    desc_col = h * HEAD_DIM
    s_base = KV_SCALES + h  # (FP8 pools) the scales' [pages, 2, page_size, heads] at head h
    if WINDOWED:
        # Keys below every row's window start: masked.
        acc = _history_range(
            acc, q, lo, tl.minimum(end, lo_full), pos, H, k_base, v_base, KV_DESC, desc_col,
            PAGE_IDS, page_start, row_base, stride_tok, stride_page, stride_slot, alpha,
            neg_alpha_log2e, offs_n, offs_d, row_lo, row_ctx, s_base, stride_kv, True, PAGED,
            PAGE_SIZE, BLOCK_N, DOT_PRECISION, FAST_SILU, PREFETCH, TMA, WINDOWED, KV_FP8,
            HEAD_DIM,
        )  # fmt: skip
        lo = tl.maximum(lo, lo_full)
    acc = _history_range(
        acc, q, lo, tl.minimum(end, full_end), pos, H, k_base, v_base, KV_DESC, desc_col,
        PAGE_IDS, page_start, row_base, stride_tok, stride_page, stride_slot, alpha,
        neg_alpha_log2e, offs_n, offs_d, row_lo, row_ctx, s_base, stride_kv, False, PAGED,
        PAGE_SIZE, BLOCK_N, DOT_PRECISION, FAST_SILU, PREFETCH, TMA, WINDOWED, KV_FP8, HEAD_DIM,
    )  # fmt: skip
    acc = _history_range(
        acc, q, tl.maximum(lo, full_end), end, pos, H, k_base, v_base, KV_DESC, desc_col,
        PAGE_IDS, page_start, row_base, stride_tok, stride_page, stride_slot, alpha,
        neg_alpha_log2e, offs_n, offs_d, row_lo, row_ctx, s_base, stride_kv, True, PAGED,
        PAGE_SIZE, BLOCK_N, DOT_PRECISION, FAST_SILU, PREFETCH, TMA, WINDOWED, KV_FP8, HEAD_DIM,
    )  # fmt: skip

    # Target keys: each target row sees only itself, so visit only this tile's own targets.
    if last_piece:
        t_lo = tl.maximum(m0, N)
        t_hi = tl.minimum(m0 + BLOCK_M, Lq)
        for n in range(t_lo, t_hi, BLOCK_N):
            j = n + offs_n
            k_ok = j < t_hi
            kv_off = row_base + j[:, None] * stride_tok + offs_d[None, :]
            k = tl.load(K + kv_off, mask=k_ok[:, None], other=0.0)
            v = tl.load(V + kv_off, mask=k_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            w = _silu_weight(s, alpha, neg_alpha_log2e, FAST_SILU)
            w = tl.where((j[None, :] == offs_m[:, None]) & k_ok[None, :], w, 0.0)
            acc = tl.dot(w.to(v.dtype), v, acc, input_precision=DOT_PRECISION)

    acc = acc * out_scale
    o_off = row_base + offs_m[:, None] * stride_tok + offs_d[None, :]
    if n_chunks == 1:
        tl.store(OUT + o_off, acc.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(WS + split * ws_stride_split + o_off, acc, mask=row_ok[:, None])
    if (FIXUP or STREAM_K) and n_chunks > 1:
        # Every thread's partial is written before the ticket is taken (release, gpu scope);
        # the last ticket's holder acquires, so it sees every other chunk's partial.
        tl.debug_barrier()
        tile = pid_hb * num_m_tiles + m_tile
        ticket = tl.atomic_add(TICKETS + tile, 1, sem="acq_rel", scope="gpu")
        if ticket == n_chunks - 1:
            # In slices of rows: a whole fp32 tile plus its running sum would not fit the
            # registers the main loop leaves.
            for r0 in tl.static_range(0, BLOCK_M, FIXUP_ROWS):
                rows_r = m0 + r0 + tl.arange(0, FIXUP_ROWS)
                off_r = row_base + rows_r[:, None] * stride_tok + offs_d[None, :]
                ok_r = (rows_r < Lq)[:, None]
                total = tl.zeros([FIXUP_ROWS, HEAD_DIM], dtype=tl.float32)
                for c in range(0, n_chunks):
                    total += tl.load(
                        WS + c * ws_stride_split + off_r,
                        mask=ok_r,
                        other=0.0,
                        cache_modifier=".cg",  # written by other SMs: read from L2, not L1
                    )
                tl.store(OUT + off_r, total.to(OUT.dtype.element_ty), mask=ok_r)
            # Every piece has taken its ticket: reset it for the next launch, so the counters
            # are zeroed once, not before every launch.
            tl.atomic_xchg(TICKETS + tile, 0, sem="relaxed", scope="gpu")


@triton.jit
def _hstu_fwd_kernel(
    Q,
    K,
    V,
    KV,
    KV_DESC,
    PAGE_IDS,
    PAGE_INDPTR,
    LAST_LEN,
    CU,
    NUM_TARGETS,
    OUT,
    WS,
    TICKETS,
    stride_tok,
    stride_page,
    stride_kv,
    stride_slot,
    ws_stride_split,
    alpha,
    neg_alpha_log2e,
    out_scale,
    num_heads,
    num_m_tiles,
    chunk_tiles,
    num_tiles,
    units,
    num_contexts,
    max_attn_len,
    KV_SCALES,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    PAGED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FAST_SILU: tl.constexpr,
    PREFETCH: tl.constexpr,
    FIXUP: tl.constexpr,
    FIXUP_ROWS: tl.constexpr,
    STREAM_K: tl.constexpr,
    TMA: tl.constexpr,
    WINDOWED: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    if STREAM_K:
        # A 1-d grid of P programs shares the num_tiles * units work units evenly: program p
        # takes units [p*W/P, (p+1)*W/P), so a tile is cut where a program's share ends and
        # no SM idles while a wave's last tiles finish (96 tiles on 132 SMs, say).
        n_prog = tl.num_programs(0)
        p = tl.program_id(0).to(tl.int64)
        work = num_tiles.to(tl.int64) * units
        u0 = p * work // n_prog
        u1 = (p + 1) * work // n_prog
        t_first = u0 // units
        t_last = tl.where(u1 > u0, (u1 - 1) // units, t_first - 1)
    else:
        t_first = 0
        t_last = 0  # one tile, from the grid's coordinates
    for t in range(t_first, t_last + 1):
        if STREAM_K:
            batch_heads = num_tiles // num_m_tiles
            pid_hb = (t % batch_heads).to(tl.int32)
            m_tile = (t // batch_heads).to(tl.int32)
            # Programs owning the tile's first and last units: the pieces of the tile.
            first = ((t * units + 1) * n_prog - 1) // work
            last = ((t + 1) * units * n_prog - 1) // work
            split = (p - first).to(tl.int32)
            splits = (last - first + 1).to(tl.int32)
            unit_lo = tl.maximum(u0 - t * units, 0)
            unit_hi = tl.minimum(u1 - t * units, units)
        else:
            # The grid's slow axis runs over query tiles from the last (the longest KV range)
            # down, so the longest programs start first and the short ones fill the tail.
            pid_hb = tl.program_id(0)
            m_tile = num_m_tiles - 1 - tl.program_id(1)
            if WINDOWED:
                # Context rows see the whole history, so tile 0 is among the longest: it
                # starts first (then the others, last down).
                pid1 = tl.program_id(1)
                m_tile = tl.where(
                    num_contexts > 0, tl.where(pid1 == 0, 0, num_m_tiles - pid1), m_tile
                )
            split = tl.program_id(2)
            splits = tl.num_programs(2)  # a launch value: no recompile per split count
            unit_lo = 0
            unit_hi = 0
        _attend_tile(
            pid_hb, m_tile, split, splits, unit_lo, unit_hi, units,
            Q, K, V, KV, KV_DESC, PAGE_IDS, PAGE_INDPTR, LAST_LEN, CU, NUM_TARGETS, OUT, WS,
            TICKETS,
            stride_tok, stride_page, stride_kv, stride_slot, ws_stride_split, alpha,
            neg_alpha_log2e, out_scale, num_heads, num_m_tiles, chunk_tiles, num_contexts,
            max_attn_len, KV_SCALES, HEAD_DIM, BLOCK_M, BLOCK_N, PAGE_SIZE, PAGED, DOT_PRECISION,
            FAST_SILU, PREFETCH, FIXUP, FIXUP_ROWS, STREAM_K, TMA, WINDOWED, KV_FP8,
        )  # fmt: skip


@triton.jit
def _sum_splits_kernel(WS, OUT, numel, splits, BLOCK: tl.constexpr):
    """``OUT = sum_s WS[s]`` in a fixed order, cast to OUT's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(splits):
        total += tl.load(WS + s * numel + offs, mask=ok, other=0.0)
    tl.store(OUT + offs, total.to(OUT.dtype.element_ty), mask=ok)


def grid_programs(batch: int, heads: int, max_seqlen: int, block_m: int) -> int:
    """Programs of one split of the grid (some exit at once for short sequences)."""
    return batch * heads * cdiv(max(max_seqlen, 1), block_m)


def choose_splits(programs: int, kv_tiles: int, device: torch.device, causal: bool) -> int:
    """KV splits of this kernel's grid (:func:`hstu_kernels.split_kv.choose_splits`, rule
    ``"fill"``): ``programs`` query tiles, the longest visiting ``kv_tiles`` key tiles. Paged:
    a grid of fewer than half as many programs as SMs, into as many chunks as fill one wave
    (96 tiles on 132 SMs measured slower split). Jagged: B=1 over 4352 keys takes 2 chunks,
    144 -> 116 us on an H100. 1 on the interpreter."""
    return split_kv.choose_splits(programs, kv_tiles, sm_count(device), causal=causal, rule="fill")


def _kv_descriptor(kv_cache: torch.Tensor, block_n: int):
    """A TMA descriptor of the paged cache seen as ``[pages * 2 * page_size, heads * D]`` rows
    with ``[block_n, D]`` boxes (the plan decided, by :func:`tma_possible`, that its shapes
    allow one), or ``None`` for a pool that is not one contiguous block on a 16-byte base."""
    if kv_cache.data_ptr() % 16 or not kv_cache.is_contiguous():
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    pages, _, page_size, heads, head_dim = kv_cache.shape
    rows = kv_cache.view(pages * 2 * page_size, heads * head_dim)
    return TensorDescriptor.from_tensor(rows, [block_n, head_dim])


def tma_possible(config: Config, page_size: int, heads: int, head_dim: int, item: int) -> bool:
    """Whether ``config`` may load this cache's pages by TMA (from shapes alone)."""
    if not config.tma or config.block_n > page_size or head_dim > 256:
        return False
    if (heads * head_dim * item) % 16:
        return False
    return _has_tensor_descriptors()


@functools.cache
def _has_tensor_descriptors() -> bool:
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True


class AttentionLaunch:
    """One planned launch of the attention kernel (and of the split sum, where the grid splits
    the KV range): grid, split count, scalars and compile-time constants fixed from shapes and
    the batch's metadata tensors, which it holds. Call it with the per-call tensors."""

    def __init__(
        self,
        config: Config,
        *,
        rows: int | None,
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        cu_seqlens: torch.Tensor,
        num_targets: torch.Tensor,
        max_seqlen: int,
        alpha: float,
        scaling_seqlen: int,
        page_table=None,
        page_size: int | None = None,
        fast_silu: bool | None = None,
        num_contexts: int = 0,
        max_attn_len: int = 0,
        kv_fp8: bool = False,
    ) -> None:
        if head_dim & (head_dim - 1) or head_dim < 16:
            raise ValueError(f"q: head_dim must be a power of two >= 16 for Triton, got {head_dim}")
        batch = cu_seqlens.shape[0] - 1
        paged = page_table is not None
        self.config = config
        self.empty = rows == 0 or batch == 0
        if paged:
            if page_size & (page_size - 1) or page_size < 16:
                raise ValueError(
                    f"kv_cache: page size must be a power of two >= 16, got {page_size}"
                )
            if page_table.page_ids.numel() == 0:
                raise ValueError("page_table.page_ids: expected at least one page per sequence")
            meta = (page_table.page_ids, page_table.page_indptr, page_table.last_page_len)
            slot = heads * head_dim
            strides = (2 * page_size * slot, page_size * slot, slot)
        else:
            page_size = 16  # unused
            meta = (cu_seqlens, cu_seqlens, cu_seqlens)
            strides = (0, 0, 0)
        num_m_tiles = cdiv(max(max_seqlen, 1), config.block_m)
        programs = batch * heads * num_m_tiles
        # The longest KV range in key tiles, from shapes only (no sync): the mean paged
        # history, or the longest jagged sequence.
        keys = page_table.page_ids.numel() * page_size // max(batch, 1) if paged else max_seqlen
        kv_tiles = cdiv(max(keys, 1), config.block_n)
        windowed = bool(num_contexts or max_attn_len)
        # The jagged split's fixed chunks rely on this bound of a windowed tile's range.
        kv_tiles = split_kv.window_kv_tiles(
            kv_tiles, num_contexts, max_attn_len, config.block_m, config.block_n
        )
        if config.stream_k:
            # One program per SM over programs * kv_tiles work units; a tile's pieces are at
            # most the programs a run of kv_tiles units can touch.
            work = programs * kv_tiles
            n_prog = max(1, min(sm_count(device), work))
            splits = min(n_prog, kv_tiles // max(work // n_prog, 1) + 2)
            fixup, chunk_tiles = False, 1
            grid = (n_prog, 1, 1)
        else:
            splits = config.splits or choose_splits(programs, kv_tiles, device, causal=not paged)
            fixup = splits > 1 and not paged
            # Fixed-length chunks (jagged): as many as the longest tile needs.
            chunk_tiles = cdiv(kv_tiles, splits)
            if fixup:
                splits = cdiv(kv_tiles, chunk_tiles)
            grid = (batch * heads, num_m_tiles, splits)
        self.splits = splits
        # A split tile is summed by its last piece (tickets: jagged, stream-K) or by the sum
        # kernel, unless the caller takes the partials (paged even splits).
        self._ticketed = (fixup or config.stream_k) and splits > 1
        self._summed = splits > 1 and not fixup and not config.stream_k
        self._programs = programs
        if fast_silu is None:
            fast_silu = device.type == "cuda" and dtype != torch.float32
        item = dtype.itemsize
        self._fp8 = paged and kv_fp8
        # (FP8 pages load through pointers: a TMA box of e4m3 rows was not measured)
        self._tma = paged and not kv_fp8 and tma_possible(config, page_size, heads, head_dim, item)
        precision = "ieee" if dtype == torch.float32 else "tf32"
        # Q K V KV KV_DESC | PAGE_IDS PAGE_INDPTR LAST_LEN CU NUM_TARGETS | OUT WS TICKETS |
        # strides | ws_stride_split (per row count: _launcher) | scalars
        args = [
            None, None, None, None, None, *meta, cu_seqlens, num_targets, None, None, None,
            heads * head_dim, *strides, None, alpha, -alpha * LOG2E, 1.0 / scaling_seqlen,
            heads, num_m_tiles, chunk_tiles, programs, kv_tiles, num_contexts, max_attn_len,
            None if self._fp8 else cu_seqlens,  # KV_SCALES: a slot (FP8), else any pointer
        ]  # fmt: skip
        constexprs = dict(
            HEAD_DIM=head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            PAGE_SIZE=page_size, PAGED=paged, DOT_PRECISION=precision, FAST_SILU=fast_silu,
            PREFETCH=config.prefetch, FIXUP=fixup, FIXUP_ROWS=min(config.block_m, 32),
            STREAM_K=config.stream_k, TMA=self._tma, WINDOWED=windowed, KV_FP8=self._fp8,
        )  # fmt: skip
        self._fixed = (args, constexprs, config.num_warps, config.num_stages, grid)
        # Each tile's ticket counter, zeroed once: the last piece of a tile resets it. (Made
        # per call while a CUDA graph is captured: a zeroing captured is not run until replay.)
        self._tickets = None
        if self._ticketed and not is_capturing(device):
            self._tickets = torch.zeros(programs, dtype=torch.int32, device=device)
        # (main, sum) launches by row count, made on first use: one per plan (its rows), more
        # only for a plan that did not know its rows.
        self._by_rows: dict[int, tuple[FixedLaunch, FixedLaunch | None]] = {}
        self._descriptors: dict[tuple, object] = {}  # (base, shape, strides) -> descriptor

    @property
    def ticket_counters(self) -> torch.Tensor | None:
        """The tiles' ticket counters of a launch whose split tiles are summed by their last
        piece (each launch leaves them at 0), else ``None``."""
        return self._tickets

    def _launches(self, numel: int) -> tuple[FixedLaunch, FixedLaunch | None]:
        found = self._by_rows.get(numel)
        if found is None:
            found = (self._launcher(numel), self._sum_launcher(numel) if self._summed else None)
            self._by_rows[numel] = found
        return found

    def _launcher(self, numel: int) -> FixedLaunch:
        args, constexprs, warps, stages, grid = self._fixed
        args = list(args)
        args[17] = numel  # ws_stride_split
        slots = (0, 1, 2, 3, 4, 10, 11, 12) + ((28,) if self._fp8 else ())
        # (the plan's run checks its tensors' devices; the workspace is made on q's)
        return FixedLaunch(
            _hstu_fwd_kernel, grid, args, slots, constexprs, devices_checked=True,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip

    def _sum_launcher(self, numel: int) -> FixedLaunch:
        block = 1024
        return FixedLaunch(
            _sum_splits_kernel, (cdiv(numel, block),), [None, None, numel, self.splits],
            (0, 1), {"BLOCK": block}, devices_checked=True, num_warps=4,
        )  # fmt: skip

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor | None,
        out: torch.Tensor,
        sum_splits: bool = True,
        kv_scales: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Launch on ``q, k, v`` (whole sequences, or the paged call's new rows), the cache
        (paged; an FP8 one with its ``kv_scales``) and ``out``. Returns ``None`` once ``out``
        holds the result; with ``sum_splits=False`` a paged launch that splits the KV range
        evenly returns the fp32 partials ``[S, *q.shape]`` instead, ``out`` unwritten (sum
        them in order ``0 .. S-1`` and round to ``out``'s dtype). Launches of one plan must be
        ordered on one stream: they share the tiles' ticket counters."""
        if self.empty or q.shape[0] == 0:
            return None
        main, total = self._launches(q.numel())
        ws = tickets = out  # unused unless split
        if self.splits > 1:
            ws = torch.empty((self.splits, *q.shape), dtype=torch.float32, device=q.device)
        if self._ticketed:
            tickets = self._tickets
            if tickets is None:
                tickets = torch.zeros(self._programs, dtype=torch.int32, device=q.device)
        kv = q if kv_cache is None else kv_cache
        desc = kv
        if self._tma:
            # A descriptor holds only the pool's base, shape and strides: one per pool (the
            # layers of a batch share the plan, each with its own pool).
            key = (kv_cache.data_ptr(), kv_cache.shape, kv_cache.stride())
            desc = self._descriptors.get(key)
            if desc is None:
                desc = _kv_descriptor(kv_cache, self.config.block_n)
                if len(self._descriptors) >= 64:
                    self._descriptors.clear()
                self._descriptors[key] = desc
            if desc is None:
                raise ValueError(
                    "kv_cache: the planned TMA loads need a contiguous pool with a 16-byte "
                    "aligned base (got a view with an odd offset?)"
                )
        if self._fp8:
            main(q, k, v, kv, desc, out, ws, tickets, kv_scales)
        else:
            main(q, k, v, kv, desc, out, ws, tickets)
        if self._summed:
            if not sum_splits:
                return ws
            total(ws, out)
        return None


def launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    num_targets: torch.Tensor,
    max_seqlen: int,
    alpha: float,
    scaling_seqlen: int,
    out: torch.Tensor,
    config: Config,
    kv_cache: torch.Tensor | None = None,
    page_table=None,
    fast_silu: bool | None = None,
    sum_splits: bool = True,
    num_contexts: int = 0,
    max_attn_len: int = 0,
    kv_scales: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Plan and run one attention launch with ``config`` (see :class:`AttentionLaunch`; its
    tensors on one CUDA device, or the interpreter's CPU, unchecked: the plans check them);
    paged when ``kv_cache`` is given (an FP8 pool with ``kv_scales``). ``k``/``v`` are the whole sequences (jagged) or
    ``k_new``/``v_new`` (paged; only their target rows are read). Raises ``ValueError`` for a
    shape the kernel cannot tile."""
    total, heads, head_dim = q.shape
    planned = AttentionLaunch(
        config, rows=total, heads=heads, head_dim=head_dim, dtype=q.dtype, device=q.device,
        cu_seqlens=cu_seqlens, num_targets=num_targets, max_seqlen=max_seqlen, alpha=alpha,
        scaling_seqlen=scaling_seqlen, page_table=page_table,
        page_size=None if kv_cache is None else kv_cache.shape[2], fast_silu=fast_silu,
        num_contexts=num_contexts, max_attn_len=max_attn_len, kv_fp8=kv_scales is not None,
    )  # fmt: skip
    return planned(q, k, v, kv_cache, out, sum_splits, kv_scales)
