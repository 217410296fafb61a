"""HSTU block: cached inference over a history split into chunks equals uncached inference
over the whole history, for every layer (DESIGN.md §5 tolerance); the graph runner's replay
equals eager and leaves the cache and other users alone.

CPU tests use fp32 and the reference backend; ``gpu`` tests use bf16 and whatever backend the
dispatcher picks on the card (the graph tests need a capturable ``append_kv``: Triton).
"""

from __future__ import annotations

import contextlib

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given

import hstu_kernels as hk
from hstu_kernels.kvcache import KVCacheError, build_jagged_metadata
from hstu_kernels.model import HSTUBlock
from hstu_kernels.testing import assert_hstu_close

SMALL = dict(num_layers=2, hidden=24, heads=2, head_dim=16)


def _assert_interpreter() -> None:
    """The Triton kernels run in the interpreter on the CPU (conftest sets TRITON_INTERPRET
    before anything imports Triton); ``backend="triton"`` then reaches them."""
    import triton.language as tl

    assert type(tl.sum).__name__ == "InterpretedFunction", "Triton imported before conftest"


def make_block(dtype=torch.float32, device="cpu", scaling_seqlen=64, **kw):
    return HSTUBlock(
        **{**SMALL, **kw}, scaling_seqlen=scaling_seqlen, dtype=dtype, device=device, seed=3
    )


def split_points(history: int, chunks: list[int]) -> list[int]:
    """Chunk boundaries ``0 = c_0 < c_1 < ... < c_k = history`` from raw draws."""
    cuts = sorted({min(max(c, 1), history - 1) for c in chunks if history > 1})
    return [0, *cuts, history]


def run_chunked(block, cache, x_full, histories, targets, splits, *, runner=None, alone=False):
    """Feed every user's history chunk by chunk (targets only with the last chunk); all users
    in one batch per step, or (``alone``) one user per request, taking turns.

    Returns ``outs[layer]`` in the row order of ``x_full`` (whole sequences packed), filled
    with each row's output from the request that computed it.
    """
    starts = [0]
    for h, t in zip(histories, targets, strict=True):
        starts.append(starts[-1] + h + t)
    outs = [torch.full_like(x_full, float("nan")) for _ in range(block.num_layers)]
    users = list(range(100, 100 + len(histories)))
    steps = max(len(s) - 1 for s in splits)
    groups = [[b] for b in range(len(users))] if alone else [list(range(len(users)))]
    for i, group in ((i, g) for i in range(steps) for g in groups):
        ids, cached, new, tgt, rows = [], [], [], [], []
        for b in group:
            uid = users[b]
            if i >= len(splits[b]) - 1:
                continue  # this user's history is done
            lo, hi = splits[b][i], splits[b][i + 1]
            last = i == len(splits[b]) - 2
            t = targets[b] if last else 0
            ids.append(uid)
            cached.append(lo)
            new.append(hi - lo)
            tgt.append(t)
            s, h = starts[b], histories[b]
            rows.append(torch.arange(s + lo, s + hi))
            rows.append(torch.arange(s + h, s + h + t))
        if not ids:
            continue
        meta = cache.prepare(ids, cached, new, tgt)
        r = torch.cat(rows).to(x_full.device)
        if runner is None:
            got = block.forward_cached(x_full[r], meta, cache, return_all=True)
        else:
            got = [runner(x_full[r], meta)]
        for layer, o in enumerate(got):
            outs[layer - len(got) + block.num_layers][r] = o
    return outs


@given(
    data=st.lists(
        st.tuples(
            st.integers(1, 70),  # history
            st.integers(0, 5),  # targets
            st.lists(st.integers(1, 69), max_size=3),  # chunk boundaries
        ),
        min_size=1,
        max_size=3,
    ),
    page_size=st.sampled_from([16, 32]),
    seed=st.integers(0, 2**16),
)
def test_chunked_cached_equals_uncached_cpu(data, page_size, seed):
    histories = [h for h, _, _ in data]
    targets = [t for _, t, _ in data]
    splits = [split_points(h, c) for h, _, c in data]
    block = make_block(scaling_seqlen=80)
    cache = block.make_cache(
        num_pages=1 + sum(-(-h // page_size) for h in histories), page_size=page_size
    )
    meta = build_jagged_metadata(histories, targets, "cpu")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(meta.num_tokens, block.hidden, generator=gen)
    full = block.forward_uncached(x, meta, return_all=True)
    outs = run_chunked(block, cache, x, histories, targets, splits)
    for layer in range(block.num_layers):
        # fp32 both ways: the tolerance is the eps term of the §5 rule
        assert_hstu_close(outs[layer], full[layer], full[layer], eps=1e-5)
    cache.check_invariants()


def test_parity_survives_offload_and_onload_cpu():
    """Two users take turns in a pool that holds one of them: every request offloads the
    other user and onloads this one, and the outputs still match the uncached ones."""
    histories, targets = [40, 33], [3, 2]
    block = make_block(scaling_seqlen=64)
    cache = block.make_cache(num_pages=4, page_size=16, host_pages=8)  # 3 usable pages
    meta = build_jagged_metadata(histories, targets, "cpu")
    x = torch.randn(meta.num_tokens, block.hidden, generator=torch.Generator().manual_seed(1))
    full = block.forward_uncached(x, meta, return_all=True)
    starts = [0, histories[0] + targets[0]]
    out = [torch.full_like(x, float("nan")) for _ in range(block.num_layers)]
    cuts = [[0, 10, 20, 30, 40], [0, 7, 17, 27, 33]]
    for i in range(4):
        for b in (0, 1):
            lo, hi = cuts[b][i], cuts[b][i + 1]
            t = targets[b] if i == 3 else 0
            s = starts[b]
            r = torch.cat(
                [torch.arange(s + lo, s + hi), torch.arange(s + histories[b], s + histories[b] + t)]
            )
            m = cache.prepare([b], [lo], [hi - lo], [t])
            for layer, o in enumerate(block.forward_cached(x[r], m, cache, return_all=True)):
                out[layer][r] = o
    assert cache.stats["offloaded"] >= 3 and cache.stats["onloaded"] >= 3
    for layer in range(block.num_layers):
        assert_hstu_close(out[layer], full[layer], full[layer], eps=1e-5)


def test_overwrite_x_cpu():
    """``overwrite_x=True``: the first layer's residual goes into ``x`` too, so the output is
    ``x`` itself, with the values of the call that leaves ``x`` alone."""
    block = make_block(scaling_seqlen=64)
    outs = []
    for overwrite in (False, True):
        cache = block.make_cache(num_pages=8, page_size=16)
        assert not cache.transfers_pending()  # the CPU copies synchronously
        meta = cache.prepare([1, 2], [0, 0], [9, 17], [2, 0])
        x = torch.randn(28, block.hidden, generator=torch.Generator().manual_seed(4))
        x0 = x.clone()
        out = block.forward_cached(x, meta, cache, overwrite_x=overwrite)
        assert (out is x) == overwrite
        assert overwrite or torch.equal(x, x0)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


def test_block_errors():
    block = make_block()
    cache = block.make_cache(num_pages=4, page_size=16)
    meta = cache.prepare([1], [0], [5], [1])
    with pytest.raises(ValueError, match=r"x: expected shape \(6, 24\)"):
        block.forward_cached(torch.randn(5, 24), meta, cache)
    with pytest.raises(TypeError, match="x: expected dtype"):
        block.forward_cached(torch.randn(6, 24, dtype=torch.float64), meta, cache)
    other = HSTUBlock(3, 24, 2, 16, scaling_seqlen=64, dtype=torch.float32).make_cache(4, 16)
    with pytest.raises(ValueError, match="cache: has 3 layers"):
        block.forward_cached(torch.randn(6, 24), meta, other)
    with pytest.raises(KVCacheError, match="pool too small"):
        cache.prepare([2], [0], [64], [0])
    with pytest.raises(ValueError, match="scaling_seqlen"):
        HSTUBlock(1, 8, 1, 8, scaling_seqlen=0)


# --- GPU -------------------------------------------------------------------------------


def _bf16_case(histories, targets, splits, seed=0):
    """bf16 block outputs (cached, chunked) against the uncached block in fp32 and bf16."""
    block = make_block(
        torch.bfloat16, "cuda", scaling_seqlen=512, hidden=256, heads=2, head_dim=128
    )
    block32 = make_block(
        torch.float32, "cuda", scaling_seqlen=512, hidden=256, heads=2, head_dim=128
    )
    block32.load_state_dict({k: v.float() for k, v in block.state_dict().items()})
    block32.backend = "reference"  # the fp32 yardstick: no kernel compile needed
    meta = build_jagged_metadata(histories, targets, "cuda")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(meta.num_tokens, block.hidden, generator=gen).cuda()
    ref32 = block32.forward_uncached(x, meta, return_all=True)
    ref_lowp = block.forward_uncached(x.bfloat16(), meta, return_all=True)
    return block, x.bfloat16(), ref32, ref_lowp


@pytest.mark.gpu
def test_chunked_cached_equals_uncached_gpu():
    histories, targets = [300, 33, 1, 129], [17, 0, 5, 64]
    splits = [[0, 100, 290, 300], [0, 1, 33], [0, 1], [0, 128, 129]]
    block, x, ref32, ref_lowp = _bf16_case(histories, targets, splits)
    cache = block.make_cache(num_pages=64, page_size=32)
    outs = run_chunked(block, cache, x, histories, targets, splits)
    for layer in range(block.num_layers):
        # the uncached bf16 run sets the tolerance; a second bf16 path may differ from fp32
        # by as much again, so the cached output gets twice the §5 allowance
        assert_hstu_close(outs[layer], ref32[layer], ref_lowp[layer], eps=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("how", ["forced", "env"])
def test_an_attention_only_backend_runs_the_cached_block_gpu(knobs, how):
    """A DSL backend (attention kernels only), forced on the block or named by the env
    override, runs its attention; the K/V append and the layer ops take the dispatcher's own
    choice, and the output matches the uncached block."""
    histories, targets = [300, 33, 1, 129], [17, 0, 5, 64]
    splits = [[0, 100, 290, 300], [0, 1, 33], [0, 1], [0, 128, 129]]
    block, x, ref32, ref_lowp = _bf16_case(histories, targets, splits)
    if how == "forced":
        block.backend = "cutedsl-hopper"
    else:
        knobs(backend="cutedsl-hopper")
    if hk.explain("paged", head_dim=128, page_size=32, backend="cutedsl-hopper").choice is None:
        pytest.skip("cutedsl-hopper does not run here")
    cache = block.make_cache(num_pages=64, page_size=32)
    outs = run_chunked(block, cache, x, histories, targets, splits)
    for layer in range(block.num_layers):
        assert_hstu_close(outs[layer], ref32[layer], ref_lowp[layer], eps=1e-3)


# --- CUDA-graph runner --------------------------------------------------------------------


def test_graph_buckets_and_cpu_fallback():
    from hstu_kernels.kvcache import build_paged_metadata
    from hstu_kernels.model.graphs import CachedBlockGraphs, default_token_buckets

    assert default_token_buckets(1000)[-1] == 1024
    block = make_block()
    cache = block.make_cache(num_pages=8, page_size=16)
    runner = CachedBlockGraphs(block, cache, batch_buckets=(1, 2, 4), token_buckets=(64, 256))
    assert runner.bucket_for(3, 65) == (4, 256)
    assert runner.bucket_for(5, 10) is None and runner.bucket_for(1, 257) is None
    assert not runner.use_graphs  # no graphs on the CPU: eager, unpadded
    meta = cache.prepare([1], [0], [20], [2])
    # the batch fills its bucket but not the tokens: the padding rows get a slot of their own
    assert runner._key(meta) == (1, 64, 64, True)
    meta3 = build_paged_metadata(
        [[1], [2, 4, 5, 6, 7], [3]], [0, 0, 0], [5, 70, 9], [0, 0, 0], page_size=16, device="cpu"
    )
    assert runner._key(meta3) == (4, 256, 256, False)  # 172 padding rows in slot 3
    exact = build_paged_metadata([[1]] * 4, [0] * 4, [16] * 4, [0] * 4, page_size=16, device="cpu")
    assert runner._key(exact) == (4, 64, 64, False)
    x = torch.randn(22, block.hidden)
    got = runner(x, meta)
    cache2 = block.make_cache(num_pages=8, page_size=16)
    want = block.forward_cached(x, cache2.prepare([1], [0], [20], [2]), cache2)
    assert torch.equal(got, want)


def _graph_run(
    use_graphs, histories, targets, splits, host_pages=0, num_pages=64, alone=False,
    skip_idle_waits=True,
):  # fmt: skip
    from hstu_kernels.model.graphs import CachedBlockGraphs

    block, x, ref32, ref_lowp = _bf16_case(histories, targets, splits)
    cache = block.make_cache(num_pages=num_pages, page_size=32, host_pages=host_pages)
    # a bystander user whose pages no batch may touch
    cache.prepare([7], [0], [70], [0])
    cache.pool[:, cache.user_pages(7)] = torch.randn_like(cache.pool[:, cache.user_pages(7)])
    bystander = cache.pool[:, cache.user_pages(7)].clone()
    runner = CachedBlockGraphs(
        block, cache, batch_buckets=(1, 2, 4, 8), use_graphs=use_graphs,
        skip_idle_waits=skip_idle_waits,
    )  # fmt: skip
    out = run_chunked(block, cache, x, histories, targets, splits, runner=runner, alone=alone)[-1]
    torch.cuda.synchronize()
    return block, cache, runner, out, ref32[-1], ref_lowp[-1], bystander


@pytest.mark.gpu
@pytest.mark.parametrize("fused_input", ["timed", "forced"])
def test_graph_replay_equals_eager_and_spares_the_cache(
    fused_input, monkeypatch, knobs, tmp_path, request
):
    """``forced``: the projection with the input LayerNorm and the append fused in, whatever
    the timing says (at these small shapes the separate path may win it)."""
    from hstu_kernels.backends.triton import fusion
    from hstu_kernels.backends.triton import projection as P

    knobs(tuning_cache=tmp_path)  # no fusion choices from earlier tests or processes
    if fused_input == "forced":
        stack = contextlib.ExitStack()
        request.addfinalizer(stack.close)
        stack.enter_context(fusion.CHOICES.pin(P.GemmConfig(64, 64, 64, 8, 4, 4)))
    histories, targets = [300, 33, 1, 129], [17, 0, 5, 64]
    splits = [[0, 100, 290, 300], [0, 1, 33], [0, 1], [0, 128, 129]]
    _, c_e, _, eager, ref32, ref_lowp, by_e = _graph_run(False, histories, targets, splits)
    _, c_g, runner, graph, _, _, by_g = _graph_run(True, histories, targets, splits)
    assert runner.captured, "no graph was captured"
    assert sum(b.replays for b in runner._buckets.values()) >= 3
    # no copy was ever issued: the graphs without the page waits ran
    assert not c_g.transfers_pending()
    assert sum(b.waiting_replays for b in runner._buckets.values()) == 0
    assert_hstu_close(graph, ref32, ref_lowp, eps=1e-3)
    assert_hstu_close(eager, ref32, ref_lowp, eps=1e-3)
    # the padding rows appended nothing: same pages, same contents as eager (same kernels)
    for uid in range(100, 104):
        pe, pg = c_e.user_pages(uid), c_g.user_pages(uid)
        assert pe == pg
        torch.testing.assert_close(c_g.pool[:, pg], c_e.pool[:, pe], atol=0.05, rtol=0.05)
    assert torch.equal(c_g.pool[:, c_g.user_pages(7)], by_g)
    assert torch.equal(c_e.pool[:, c_e.user_pages(7)], by_e)
    assert torch.equal(c_g.pool[:, c_g.dummy_page], torch.zeros_like(c_g.pool[:, 0]))
    free = [p for p in range(1, 64) if c_g.allocator.is_free(p)]
    assert torch.equal(c_g.pool[:, free], torch.zeros_like(c_g.pool[:, free]))


@pytest.mark.gpu
@pytest.mark.parametrize("skip_idle_waits", [False, True])
def test_graph_replay_waits_for_onloaded_pages(skip_idle_waits):
    """A pool that holds about one user: every request offloads others and onloads its user
    asynchronously; the graph's per-layer waits must see the pages in place. ``False``: every
    replay is of the graph with the waits; ``True``: the runner picks by
    ``cache.transfers_pending()``."""
    histories, targets = [200, 190], [9, 4]
    splits = [[0, 40, 80, 120, 160, 200], [0, 38, 76, 114, 152, 190]]
    _, cache, runner, out, ref32, ref_lowp, _ = _graph_run(
        True, histories, targets, splits, host_pages=64, num_pages=9, alone=True,
        skip_idle_waits=skip_idle_waits,
    )  # fmt: skip
    assert cache.stats["onloaded"] >= 2, cache.stats
    assert runner.captured
    replays = sum(b.replays for b in runner._buckets.values())
    waiting = sum(b.waiting_replays for b in runner._buckets.values())
    print("graph_waits", runner.graph_waits, cache.stats, "replays", replays, "waiting", waiting)
    if not skip_idle_waits and runner.graph_waits:
        assert waiting == replays
    assert_hstu_close(out, ref32, ref_lowp, eps=1e-3)


def test_padded_bucket_rows_change_nothing_cpu():
    """The padding a graph bucket adds (empty slots, a padding sequence of target rows on the
    dummy page), run eagerly: real rows and the cache come out as without padding."""
    from hstu_kernels.kvcache import build_paged_metadata

    block = make_block()
    runs = []
    for pad in (False, True, "no slot"):
        cache = block.make_cache(num_pages=12, page_size=16)
        meta0 = cache.prepare([5, 6], [0, 0], [20, 9], [0, 0])
        x0 = torch.randn(29, block.hidden, generator=torch.Generator().manual_seed(0))
        block.forward_cached(x0, meta0, cache)
        meta = cache.prepare([6, 5], [9, 20], [7, 0], [2, 3])
        x = torch.randn(12, block.hidden, generator=torch.Generator().manual_seed(1))
        if pad:
            meta = build_paged_metadata(
                meta.page_lists, meta.cached_lengths, meta.new_lengths, meta.target_lengths,
                page_size=16, device="cpu", pad_batch=4, pad_tokens=32, dummy_page=0,
                page_capacity=40, pad_slot=pad is True,
            )  # fmt: skip
            xp = torch.cat([x, torch.randn(20, block.hidden)])
            out = block.forward_cached(xp, meta, cache, max_seqlen_q=32)[:12]
        else:
            out = block.forward_cached(x, meta, cache)
        runs.append((out, cache.pool.clone()))
    (out0, pool0), *padded = runs
    for out1, pool1 in padded:
        assert torch.equal(out0, out1)
        assert torch.equal(pool0, pool1)
        assert torch.equal(pool1[:, 0], torch.zeros_like(pool1[:, 0]))  # the dummy page


@pytest.mark.parametrize("per_program", [1, 2])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_layer_row_kernels(device, per_program, monkeypatch):
    """The Triton row kernels of the layer (the interpreter on the CPU) against torch ops:
    odd row counts (not a multiple of the rows per program) and widths (not a power of 2)."""
    from hstu_kernels import reference
    from hstu_kernels.backends.triton import rows as L

    if device == "cpu":
        _assert_interpreter()
    monkeypatch.setattr(L, "SMALL_GRID_ROWS", 2048 if per_program == 1 else 4)
    assert L.rows_per_program(7) == per_program
    gen = torch.Generator().manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    rows, n = 7, 200

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    a, w, b, uvqk = rand(rows, n), rand(n), rand(n), rand(rows, 4 * n)
    u = uvqk[:, :n]  # strided (the layer passes a contiguous slot; any row stride works)
    # A split attention's fp32 partials, summed by the kernel: as if summed first, bit for bit.
    parts = torch.randn(3, rows, n, generator=gen).to(device)
    summed = reference.sum_partials(parts, dtype)
    fused = L.layernorm_mul(parts, u, w, b, 1e-6)
    assert torch.equal(fused, L.layernorm_mul(summed, u, w, b, 1e-6))
    cases = [
        (
            L.layernorm_mul(a, u, w, b, 1e-6),
            lambda t: F.layer_norm(t(a), (n,), t(w), t(b), 1e-6) * t(u),
        ),
        (fused, lambda t: F.layer_norm(t(summed), (n,), t(w), t(b), 1e-6) * t(u)),
        (L.layernorm(a, w, b, 1e-6), lambda t: F.layer_norm(t(a), (n,), t(w), t(b), 1e-6)),
    ]
    assert not L._BROKEN, L._BROKEN  # the kernels ran (no fallback to torch ops)
    for got, ref in cases:
        assert got.is_contiguous()
        ref32, ref_lowp = ref(lambda t: t.float()), ref(lambda t: t)
        assert_hstu_close(got, ref32, ref_lowp, eps=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_planned_rows_equal_the_row_ops(device):
    """A batch's planned row launches (``layer_ops.PlannedRows``: the eager block's path)
    compute what the row ops do, bit for bit, for plain rows and a split attention's fp32
    partials, and each call overwrites the op's one output buffer."""
    from hstu_kernels import layer_ops

    if device == "cpu":
        _assert_interpreter()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    ops = layer_ops.kernels("triton", torch.device(device), dtype)
    assert ops.plan_rows is not None
    rows = layer_ops.PlannedRows(ops)
    gen = torch.Generator().manual_seed(3)

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen).to(device, dt)

    n, tokens = 96, 37  # width not a power of two, rows not a multiple of a program's
    w, b = rand(n), rand(n)
    uvqk = rand(4, tokens, n)
    outs = []
    for _ in range(2):  # fresh inputs each call, as layer after layer
        x, parts = rand(tokens, n), rand(3, tokens, n, dt=torch.float32)
        single = rand(tokens, n)
        h = rows.layernorm(x, w, b, 1e-6)
        assert torch.equal(h, ops.layernorm(x, w, b, 1e-6))
        y = rows.layernorm_mul(parts, uvqk[0], w, b, 1e-6)
        assert y.dtype == dtype
        assert torch.equal(y, ops.layernorm_mul(parts, uvqk[0], w, b, 1e-6))
        y1 = rows.layernorm_mul(single, uvqk[0], w, b, 1e-6)
        assert torch.equal(y1, ops.layernorm_mul(single, uvqk[0], w, b, 1e-6))
        outs.append(h)
    assert outs[0] is outs[1]  # one buffer per op and shape


@pytest.mark.parametrize("page_size", [16])
def test_cached_block_on_triton_equals_the_reference_cpu(page_size):
    """The eager cached block on ``backend="triton"`` (the interpreter: planned row launches,
    projection with the fused append, paged attention) computes what the reference does,
    layer by layer, and leaves the same K/V in its pages."""
    _assert_interpreter()
    block, triton_block = make_block(head_dim=64), make_block(head_dim=64, backend="triton")
    caches = [blk.make_cache(16, page_size) for blk in (block, triton_block)]
    histories, new, targets = [21, 6], [9, 5], [3, 0]  # a one-token cached history
    gen = torch.Generator().manual_seed(4)
    for cache in caches:
        cache.prepare([0, 1], [0, 0], [h - n for h, n in zip(histories, new)], [0, 0])
        for layer in range(block.num_layers):
            pool = cache.layer_cache(layer)
            pool.copy_(torch.randn(pool.shape, generator=torch.Generator().manual_seed(layer)))
    metas = [c.prepare([0, 1], [h - n for h, n in zip(histories, new)], new, targets)
             for c in caches]  # fmt: skip
    x = torch.randn(metas[0].num_tokens, block.hidden, generator=gen)
    want = block.forward_cached(x, metas[0], caches[0], return_all=True)
    got = triton_block.forward_cached(x.clone(), metas[1], caches[1], return_all=True)
    for g, w in zip(got, want, strict=True):
        assert_hstu_close(g, w, w, eps=1e-5)
    torch.testing.assert_close(caches[1].pool, caches[0].pool, rtol=1e-5, atol=1e-5)


def test_block_on_triton_equals_the_reference_cpu():
    """``backend="triton"`` runs every layer op in Triton (the interpreter), and computes what
    the reference's torch ops do (``backend="auto"`` on the CPU)."""
    from hstu_kernels import layer_ops

    _assert_interpreter()
    block, triton_block = make_block(head_dim=64), make_block(head_dim=64, backend="triton")
    assert layer_ops.kernels("auto", torch.device("cpu"), torch.float32).backend == "reference"
    assert layer_ops.kernels("triton", torch.device("cpu"), torch.float32).backend == "triton"
    meta = build_jagged_metadata([9, 20], [3, 0], "cpu")
    x = torch.randn(meta.num_tokens, block.hidden, generator=torch.Generator().manual_seed(2))
    want = block.forward_uncached(x, meta, return_all=True)
    got = triton_block.forward_uncached(x, meta, return_all=True)
    for g, w in zip(got, want, strict=True):
        assert_hstu_close(g, w, w, eps=1e-5)


def test_a_switched_off_fast_path_shows_in_explain(monkeypatch, request):
    """A Triton LayerNorm that did not build (here: injected) switches its kernels off for
    the process, with one warning, and explain() says so for the layer ops."""
    import hstu_kernels as hk
    from hstu_kernels.backends.triton import rows

    _assert_interpreter()
    request.addfinalizer(rows.reset)  # the kernels back on for the tests after this one

    from hstu_kernels.backends.triton.launcher import LaunchCache

    class Broken(LaunchCache):
        def keyed(self, *args, **kwargs):
            from triton.compiler.errors import CompilationError

            raise CompilationError("src", None, "injected")

    monkeypatch.setattr(rows, "LAUNCHES", Broken())
    x, w, b = torch.randn(5, 24), torch.randn(24), torch.randn(24)
    with pytest.warns(RuntimeWarning, match="row kernels disabled"):
        got = rows.layernorm(x, w, b, 1e-6)
    torch.testing.assert_close(got, F.layer_norm(x, (24,), w, b, 1e-6))
    exp = hk.explain("layernorm", dtype=torch.float32, head_dim=64, backend="triton")
    assert "LayerNorm kernels are off" in exp.reasons["triton"]


def test_an_attention_only_backend_leaves_the_layer_ops_to_auto(knobs):
    """A backend without layer ops (the DSL kernels), forced or named by the env override,
    runs the attention; the layer ops take the dispatcher's own choice."""
    from hstu_kernels import layer_ops

    cpu = torch.device("cpu")
    assert layer_ops.kernels("cutedsl-hopper", cpu, torch.float32).backend == "reference"
    knobs(backend="cutedsl-ampere")
    assert layer_ops.kernels("auto", cpu, torch.float32).backend == "reference"
    with pytest.raises(ValueError, match="no backend can serve"):
        layer_ops.kernels("no-such-backend", cpu, torch.float32)
