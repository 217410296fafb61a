"""A failed request leaves the KV cache as it was: ``prepare`` refuses bad arguments before it
changes anything, and a request that fails after ``prepare`` (embedding lookup, a layer, the
head) is rolled back, so that retrying it, and every later request, scores as the uncached
baseline does. Stateful: random sequences of requests, evictions and failures keep the
manager's invariants and the lengths a shadow model expects."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hstu_kernels.kvcache import KVCacheConfig, KVCacheError, KVCacheManager
from hstu_kernels.model.ranking import HSTURankingModel, RankingConfig, RankingHead, pack_requests
from hstu_kernels.model.requests import RequestBatch, SyntheticRequests
from hstu_kernels.testing import assert_hstu_close


def _state(cache: KVCacheManager) -> tuple:
    """Everything a rollback must restore: users (lengths, pages, LRU order), free pages,
    counters."""
    free = tuple(p for p in range(cache.config.num_pages) if cache.allocator.is_free(p))
    host = cache.host_allocator
    host_free = () if host is None else tuple(p for p in range(host.num_pages) if host.is_free(p))
    return cache.snapshot(), free, host_free


def _manager(num_pages=9, host_pages=0) -> KVCacheManager:
    return KVCacheManager(KVCacheConfig(num_layers=2, num_pages=num_pages, page_size=16, heads=1,
                                        head_dim=8, dtype=torch.float32, device="cpu",
                                        host_pages=host_pages))  # fmt: skip


@pytest.mark.parametrize(
    "bad,pattern",
    [
        ({"pad_batch": 1, "pad_tokens": 80}, "pad_batch, pad_tokens: expected >= the batch"),
        ({"pad_batch": 4, "pad_tokens": 10}, "pad_batch, pad_tokens: expected >= the batch"),
        ({"pad_tokens": 90}, "must be given together"),
        ({"page_capacity": 2}, "page_capacity: the batch needs"),
        ({"out": torch.zeros(3, dtype=torch.int32)}, "out: expected a contiguous 1-d int32"),
        ({"out": torch.zeros(200, dtype=torch.int64)}, "out: expected a contiguous 1-d int32"),
        ({"pad_batch": -1, "pad_tokens": 80}, "pad_batch: expected an int >= 0"),
    ],
)
def test_prepare_refuses_bad_padding_before_changing_anything(bad, pattern):
    """A batch that must evict user 1 (a pool of 8 usable pages) with wrong padding: refused,
    nothing evicted, nothing allocated."""
    cache = _manager(num_pages=9)
    cache.prepare([1], [0], [60], [0])  # 4 pages
    cache.prepare([2], [0], [40], [0])  # 3 pages
    before = _state(cache)
    with pytest.raises(ValueError, match=pattern):
        cache.prepare([3, 4], [0, 0], [30, 20], [3, 2], **bad)  # 2 + 2 pages: evicts user 1
    assert _state(cache) == before
    cache.check_invariants()


def test_rollback_forgets_the_request_and_keeps_its_evictions():
    cache = _manager(num_pages=9, host_pages=8)
    cache.prepare([1], [0], [60], [0])
    cache.prepare([2], [0], [20], [0])
    snap = cache.snapshot()
    cache.prepare([2, 3], [20, 0], [30, 40], [1, 1])  # grows 2, adds 3, evicts 1 to the host
    assert cache.location(1) == "host"
    cache.rollback(snap)
    cache.check_invariants()
    assert cache.cached_length(2) == 20 and cache.location(3) is None
    assert cache.location(1) == "host" and cache.cached_length(1) == 60  # the eviction stands
    assert cache.users == [1, 2]  # LRU order as it was
    with pytest.raises(TypeError, match="snapshot"):
        cache.rollback("before")


# --- the ranking model: fault injection at each stage of a cached request ------------------


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _model(device: str = "cpu", **kw) -> HSTURankingModel:
    """The tiny model; on the GPU in bf16, where its kernels (not the reference) serve it and
    offloads and onloads run on the copy stream, in flight while the request fails."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = RankingConfig.tiny(max_history=64, page_size=16, dtype=dtype, **kw)
    return HSTURankingModel(config, device=device)


def _assert_scores_like_baseline(model: HSTURankingModel, batch, got: torch.Tensor) -> None:
    """DESIGN.md §5 on the scores: against the uncached fp32 twin on the reference backend,
    with the uncached model in its own dtype as the low-precision reference."""
    lowp = model.score(batch, "baseline").float()
    ref32 = lowp
    if model.config.dtype != torch.float32:
        config = dataclasses.replace(model.config, dtype=torch.float32, backend="reference")
        ref32 = HSTURankingModel(config, device=model.device).score(batch, "baseline").float()
    assert_hstu_close(got.float(), ref32, lowp)


def _batches(model, users, **kw):
    c = model.config
    gen = SyntheticRequests(num_items=c.num_items, num_actions=c.num_actions, start=5, stop=53,
                            step=16, targets=3, seed=1, **kw)  # fmt: skip
    return list(gen.case(len(users), users=users))


def _fail(stage: str, model: HSTURankingModel, monkeypatch) -> None:
    """Make the next cached request raise at ``stage``."""

    def boom(*args, **kwargs):
        raise RuntimeError(f"injected failure: {stage}")

    if stage == "embedding":
        monkeypatch.setattr(model, "embed", boom)
    elif stage == "layer":
        layer = model.block.layers[1]
        real = layer._forward_planned  # (the eager block's per-layer call)

        def half(*args, **kwargs):  # the first layer appended; the second fails
            real(*args, **kwargs)
            boom()

        monkeypatch.setattr(layer, "_forward_planned", half)
    elif stage == "head":
        monkeypatch.setattr(model.head, "forward", boom)
    else:
        raise ValueError(stage)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stage", ["embedding", "layer", "head"])
@pytest.mark.parametrize("host_pages", [0, 16])
def test_a_failed_request_leaves_the_cache_unchanged(stage, host_pages, device, monkeypatch):
    """Fail request 2 of users 0 and 1 at ``stage``; the cache is as before (pages, lengths,
    LRU order). Retrying it and serving the rest gives the baseline's scores."""
    model = _model(device)
    cache = model.make_cache(host_pages=host_pages)
    batches = _batches(model, [0, 1])
    for batch in batches[:2]:
        model.score(batch, "kvcache", cache)
    before = _state(cache)
    with monkeypatch.context() as m:
        _fail(stage, model, m)
        with pytest.raises(RuntimeError, match="injected failure"):
            model.score(batches[2], "kvcache", cache)
    assert _state(cache) == before
    cache.check_invariants()
    for batch in batches[2:]:
        _assert_scores_like_baseline(model, batch, model.score(batch, "kvcache", cache))


@pytest.mark.parametrize("device", DEVICES)
def test_a_failed_request_that_evicted_keeps_every_user_correct(device, monkeypatch):
    """A full pool: user 1's request offloads user 0, then fails in a layer (on the GPU with
    the offload still in flight). User 0 stays offloaded (its pages were reused), user 1 is as
    before; both still score as the baseline afterwards."""
    model = _model(device)
    cache = model.make_cache(num_pages=1 + 4, host_pages=16)
    user0, user1 = _batches(model, [0]), _batches(model, [1])
    for batch in (user0[0], user1[0], user0[1], user0[2]):  # 3 + 1 pages: the pool is full
        model.score(batch, "kvcache", cache)
    with monkeypatch.context() as m:
        _fail("layer", model, m)
        with pytest.raises(RuntimeError, match="injected failure"):
            model.score(user1[1], "kvcache", cache)  # needs a page more: evicts user 0
    cache.check_invariants()
    assert cache.location(0) == "host" and cache.cached_length(0) == user0[2].histories[0]
    assert cache.location(1) == "device" and cache.cached_length(1) == user1[0].histories[0]
    for batch in (user1[1], user0[3], user1[2]):
        _assert_scores_like_baseline(model, batch, model.score(batch, "kvcache", cache))


@pytest.mark.parametrize(
    "field,value,pattern",
    [
        ("candidates", torch.tensor([0, 1000, 2]), r"candidates: expected ids in 0\.\.999"),
        ("history_items", None, r"history_items: expected ids in 0\.\.999"),
        ("history_actions", None, r"history_actions: expected ids in 0\.\.7"),
        ("candidates", torch.tensor([0.0, 1.0]), "candidates: expected an int64 or int32 tensor"),
        ("candidates", torch.tensor([[0, 1]]), r"candidates: expected a 1-D tensor on the CPU"),
        ("history_items", torch.zeros(3, dtype=torch.int64, device="meta"), "on the CPU"),
        ("history_actions", torch.zeros(2, dtype=torch.int64), "expected one per history item"),
    ],
)
def test_ids_outside_the_tables_are_refused_before_the_cache_changes(field, value, pattern):
    model = _model()
    cache = model.make_cache()
    batch = _batches(model, [0])[0]
    model.score(batch, "kvcache", cache)
    nxt = _batches(model, [0])[1]
    request = nxt.requests[0]
    if value is None:  # one id just past the table (the reserved candidate action, for actions)
        ids = getattr(request, field).clone()
        ids[-1] = model.config.num_items if field == "history_items" else model.config.num_actions
        value = ids
    bad = RequestBatch(nxt.index, (dataclasses.replace(request, **{field: value}),))
    before = _state(cache)
    for mode in ("kvcache", "baseline"):
        with pytest.raises((ValueError, TypeError), match=pattern):
            model.score(bad, mode, cache if mode == "kvcache" else None)
    assert _state(cache) == before
    ref = model.score(nxt, "baseline")
    assert_hstu_close(model.score(nxt, "kvcache", cache), ref, ref)


# --- stateful: the manager under random requests, evictions and failures ------------------


class CacheMachine(RuleBasedStateMachine):
    """Requests for users 0..5 with growing histories in a small pool with a host pool;
    failed requests (bad padding, or a rollback after prepare). A shadow dict holds the
    lengths the cache must report."""

    def __init__(self) -> None:
        super().__init__()
        self.cache = _manager(num_pages=13, host_pages=10)
        self.lengths: dict[int, int] = {}

    def _request(self, users, grow):
        users = list(dict.fromkeys(users))
        cached = [self.cache.cached_length(u) for u in users]
        new = [g if c + g else 1 for c, g in zip(cached, grow, strict=False)]
        return users, cached, new[: len(users)]

    @rule(users=st.lists(st.integers(0, 5), min_size=1, max_size=3),
          grow=st.lists(st.integers(0, 40), min_size=3, max_size=3),
          nt=st.integers(0, 3))  # fmt: skip
    def serve(self, users, grow, nt):
        users, cached, new = self._request(users, grow)
        try:
            self.cache.prepare(users, cached, new, [nt] * len(users))
        except ValueError:  # the pool cannot hold the batch: refused, unchanged
            return
        for u, c, n in zip(users, cached, new, strict=True):
            self.lengths[u] = c + n
        self._forget_dropped()

    @rule(users=st.lists(st.integers(0, 5), min_size=1, max_size=3),
          grow=st.lists(st.integers(0, 40), min_size=3, max_size=3))  # fmt: skip
    def fail_after_prepare(self, users, grow):
        users, cached, new = self._request(users, grow)
        snap = self.cache.snapshot()
        try:
            self.cache.prepare(users, cached, new, [1] * len(users))
        except ValueError:
            return
        self.cache.rollback(snap)
        self._forget_dropped()

    @rule(users=st.lists(st.integers(0, 5), min_size=1, max_size=3))
    def fail_in_prepare(self, users):
        users, cached, new = self._request(users, [5, 5, 5])
        before = _state(self.cache)
        with pytest.raises(ValueError):
            self.cache.prepare(users, cached, new, [0] * len(users), pad_batch=0, pad_tokens=0)
        assert _state(self.cache) == before

    @precondition(lambda self: any(self.cache.location(u) == "device" for u in self.lengths))
    @rule(data=st.data())
    def evict(self, data):
        on_device = [u for u in self.lengths if self.cache.location(u) == "device"]
        self.cache.evict(data.draw(st.sampled_from(on_device)))
        self._forget_dropped()

    def _forget_dropped(self) -> None:
        for u in list(self.lengths):
            if self.cache.location(u) is None:
                del self.lengths[u]

    @invariant()
    def consistent(self):
        self.cache.check_invariants()
        for u, n in self.lengths.items():
            assert self.cache.cached_length(u) == n
        assert set(self.cache.users) == set(self.lengths)


CacheMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=20, deadline=None)
test_cache_machine = CacheMachine.TestCase


# --- more named errors, each before anything changes --------------------------------------


def test_named_errors_for_kept_and_late_arguments():
    from hstu_kernels.kvcache import LayerIndexError
    from hstu_kernels.model import HSTUBlock

    cache = _manager()
    with pytest.raises(LayerIndexError, match=r"layer: expected an int in 0\.\.1"):
        cache.layer_cache(2)
    with pytest.raises(ValueError, match="layer"):  # a ValueError too, as other bad arguments
        cache.wait_layer(-1)
    with pytest.raises(ValueError, match="snapshot: taken of another cache manager"):
        cache.rollback(_manager().snapshot())
    with pytest.raises(ValueError, match="backend: expected 'auto' or one of"):
        HSTUBlock(2, 24, 2, 16, scaling_seqlen=64, backend="bogus")
    with pytest.raises(ValueError, match="eps: expected a float in"):
        HSTUBlock(2, 24, 2, 16, scaling_seqlen=64, eps=-1.0)
    with pytest.raises(ValueError, match="page_size: expected a power of two"):
        RankingConfig.tiny(page_size=24)
    with pytest.raises(TypeError, match=r"dtype: expected torch\.bfloat16"):
        HSTUBlock(2, 24, 2, 16, scaling_seqlen=64, dtype=torch.int32)
    with pytest.raises(TypeError, match="alpha: expected a finite float"):
        HSTUBlock(2, 24, 2, 16, scaling_seqlen=64, alpha="0.1")
    with pytest.raises(TypeError, match="seed: expected an int"):
        RankingConfig.tiny(seed="7")
    with pytest.raises(ValueError, match="hidden: expected a positive int"):
        RankingHead(0, 1)
    with pytest.raises(ValueError, match="num_actions: expected a positive int"):
        pack_requests(_batches(_model(), [0])[0], 0)
    with pytest.raises(TypeError, match="batch: expected a RequestBatch"):
        pack_requests([], 3)
    import hstu_kernels as hk

    with pytest.raises(TypeError, match="settings: unknown"):
        hk.settings.configure(no_such_knob=1)
    before = hk.settings.get()
    with pytest.raises(ValueError, match="backend: expected 'auto' or one of"):
        hk.settings.configure(backend="nonexistent")
    with pytest.raises(ValueError, match="cutedsl_tile: expected"):
        hk.settings.configure(cutedsl_tile=(1, 2))
    assert hk.settings.get() == before
    with pytest.raises(ValueError, match="backend: expected 'auto' or one of"):
        hk.explain("paged", backend="nonexistent")
    with pytest.raises(TypeError, match="partials: expected a bool"):
        hk.explain("paged", partials="yes")


def test_a_request_with_an_impossible_new_count_is_refused_before_the_cache_changes():
    model = _model()
    cache = model.make_cache()
    batch = _batches(model, [0])[0]
    r = batch.requests[0]
    bad = RequestBatch(batch.index, (dataclasses.replace(r, new=r.history + 1),))
    before = _state(cache)
    with pytest.raises(ValueError, match=r"new: expected an int in 0\.\."):
        model.score(bad, "kvcache", cache)
    with pytest.raises(ValueError, match="a user appears twice"):
        model.score(RequestBatch(batch.index, (r, r)), "kvcache", cache)
    assert _state(cache) == before


def test_a_rollback_undoes_one_prepare_only():
    """A snapshot older than the last prepare is refused: undoing several changes could hand
    one host page to two users (one onloaded since, its host pages reused by a later
    offload)."""
    cache = _manager(num_pages=9, host_pages=8)
    cache.prepare([1], [0], [60], [0])
    snap = cache.snapshot()
    cache.prepare([2], [0], [20], [0])
    cache.evict(2)
    with pytest.raises(ValueError, match="more than one"):
        cache.rollback(snap)
    cache.check_invariants()
    snap = cache.snapshot()
    with pytest.raises(KVCacheError):
        cache.evict(99)  # a failed call changes nothing, the snapshot stays good
    cache.prepare([3], [0], [10], [0])
    cache.rollback(snap)
    assert cache.location(3) is None
    cache.check_invariants()


def test_no_offloaded_user_is_dropped_when_that_cannot_make_room():
    """A batch that onloads user A evicts C from the device; the host pool (8 pages) cannot
    take C's 5 pages even without B's 2 (A's 4 are still held for its onload): C is dropped,
    and B, whose drop would not have helped, stays offloaded."""
    cache = _manager(num_pages=9, host_pages=8)
    cache.prepare(["A"], [0], [64], [0])  # 4 pages
    cache.evict("A")
    cache.prepare(["B"], [0], [32], [0])  # 2 pages
    cache.evict("B")
    cache.prepare(["C"], [0], [80], [0])  # 5 of the 8 usable device pages
    cache.prepare(["A"], [64], [16], [0])  # A needs 5 device pages: C must go
    assert cache.location("A") == "device" and cache.location("C") is None
    assert cache.location("B") == "host" and cache.cached_length("B") == 32
    cache.check_invariants()
