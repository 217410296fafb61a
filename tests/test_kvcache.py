"""KV cache manager: allocator, metadata builder, eviction, offload/onload, bad requests.

CPU tests exercise the logic with synchronous copies; the ``gpu`` tests repeat the transfer
checks with pinned memory and CUDA streams.
"""

from __future__ import annotations

import copy

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hstu_kernels.kvcache import (
    KVCacheConfig,
    KVCacheError,
    KVCacheManager,
    PageAllocator,
    build_jagged_metadata,
    build_paged_metadata,
)
from hstu_kernels.kvcache.allocator import page_runs
from hstu_kernels.types import PageTable

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def make_cache(device="cpu", num_pages=9, page_size=4, host_pages=0, layers=2):
    cfg = KVCacheConfig(
        num_layers=layers,
        num_pages=num_pages,
        page_size=page_size,
        heads=2,
        head_dim=3,
        dtype=torch.float32,
        device=device,
        host_pages=host_pages,
    )
    return KVCacheManager(cfg)


def write_tokens(cache: KVCacheManager, uid: int, start: int, end: int) -> None:
    """Stand-in for append_kv: token ``p`` of user ``uid`` gets a value that names both."""
    ps = cache.page_size
    pages = cache.user_pages(uid)
    for p in range(start, end):
        for layer in range(cache.config.num_layers):
            val = uid * 10_000 + p * 10 + layer
            cache.pool[layer, pages[p // ps], 0, p % ps] = val
            cache.pool[layer, pages[p // ps], 1, p % ps] = -val


def expected_kv(cache: KVCacheManager, uid: int, length: int) -> torch.Tensor:
    """``[layers, length]`` values that :func:`write_tokens` wrote for tokens ``0..length-1``."""
    layers = torch.arange(cache.config.num_layers)[:, None]
    return (uid * 10_000 + torch.arange(length)[None] * 10 + layers).float()


def read_tokens(pool: torch.Tensor, pages: list[int], length: int, ps: int) -> torch.Tensor:
    pos = torch.arange(length)
    idx = torch.tensor(pages)[pos // ps]
    k = pool[:, idx, 0, pos % ps].cpu()  # [layers, length, heads, D]
    v = pool[:, idx, 1, pos % ps].cpu()
    assert torch.equal(k, -v)
    assert (k == k[..., :1, :1]).all(), "a token's K is not uniform (overwritten?)"
    return k[..., 0, 0]


def check_user(cache: KVCacheManager, uid: int) -> None:
    """The user's pages, wherever they are, hold exactly what was written."""
    n = cache.cached_length(uid)
    cache.synchronize()
    if cache.location(uid) == "device":
        got = read_tokens(cache.pool, cache.user_pages(uid), n, cache.page_size)
    else:
        got = read_tokens(cache.host_pool, cache.host_user_pages(uid), n, cache.page_size)
    assert torch.equal(got, expected_kv(cache, uid, n)), f"user {uid}: pages corrupted"


def snapshot(cache: KVCacheManager):
    return (
        [(u, cache.location(u), cache.cached_length(u)) for u in cache.users],
        copy.deepcopy(cache._users),
        cache.allocator.num_free,
        cache.pool.clone(),
        None if cache.host_pool is None else cache.host_pool.clone(),
        dict(cache.stats),
    )


def assert_same(a, b):
    assert a[0] == b[0] and a[1] == b[1] and a[2] == b[2] and a[5] == b[5]
    assert torch.equal(a[3], b[3])
    assert (a[4] is None and b[4] is None) or torch.equal(a[4], b[4])


# --- allocator --------------------------------------------------------------------------


def test_allocator_lowest_first_and_double_free():
    a = PageAllocator(6, reserved=[0])
    assert a.capacity == 5 and a.num_free == 5
    assert a.allocate(3) == [1, 2, 3]
    a.free([2])
    assert a.allocate(2) == [2, 4]
    with pytest.raises(ValueError, match="double free"):
        a.free([5])
    with pytest.raises(ValueError, match="not allocated"):
        a.free([0])
    with pytest.raises(ValueError, match="twice"):
        a.free([1, 1])
    with pytest.raises(RuntimeError, match="asked for 9 pages"):
        a.allocate(9)
    assert a.num_used == 4


def test_page_runs_coalesce():
    assert page_runs([0, 1, 2, 3], [5, 6, 9, 10]) == [(0, 5, 2), (2, 9, 2)]
    assert page_runs([], []) == []


# --- metadata builder -------------------------------------------------------------------


def test_paged_metadata_matches_page_table():
    pages, cached, new, tgt = [[3, 1], [4], [7, 2, 5]], [5, 0, 9], [2, 3, 0], [1, 0, 4]
    m = build_paged_metadata(pages, cached, new, tgt, page_size=4, device="cpu", user_ids="abc")
    ref = PageTable.from_lists(pages, [7, 3, 9], 4)
    for f in ("page_indptr", "page_ids", "last_page_len"):
        assert torch.equal(getattr(m.page_table, f), getattr(ref, f)), f
    assert m.cu_seqlens_q.tolist() == [0, 3, 6, 10]
    assert m.num_targets.tolist() == tgt and m.append_start.tolist() == cached
    assert (m.max_seqlen_q, m.num_tokens, m.batch_size, m.num_real) == (4, 10, 3, 3)
    assert m.max_total_length == 13 and m.user_ids == ("a", "b", "c")


def test_paged_metadata_padding():
    m = build_paged_metadata(
        [[3, 1]], [5], [2], [1], page_size=4, device="cpu",
        pad_batch=4, pad_tokens=16, dummy_page=0, page_capacity=12,
    )  # fmt: skip
    assert m.batch_size == 5 and m.num_tokens == 16 and m.num_real_tokens == 3
    assert m.cu_seqlens_q.tolist() == [0, 3, 3, 3, 3, 16]
    # the padding sequence's rows are all targets: append_kv writes nothing for them
    assert m.num_targets.tolist() == [1, 0, 0, 0, 13]
    assert m.page_table.page_indptr.tolist() == [0, 2, 3, 4, 5, 6]
    assert m.page_table.page_ids.tolist() == [3, 1, 0, 0, 0, 0]
    assert m.buffer[-12:].tolist() == [3, 1] + [0] * 10
    assert m.page_table.last_page_len.tolist() == [3, 1, 1, 1, 1]
    # no padding slot: the padding rows take the last empty slot of the bucket
    m = build_paged_metadata(
        [[3, 1]], [5], [2], [1], page_size=4, device="cpu",
        pad_batch=3, pad_tokens=8, dummy_page=0, pad_slot=False,
    )  # fmt: skip
    assert m.cu_seqlens_q.tolist() == [0, 3, 3, 8] and m.num_targets.tolist() == [1, 0, 5]
    with pytest.raises(ValueError, match="need a free slot"):
        build_paged_metadata(
            [[3, 1]], [5], [2], [1], page_size=4, device="cpu",
            pad_batch=1, pad_tokens=8, dummy_page=0, pad_slot=False,
        )  # fmt: skip
    with pytest.raises(ValueError, match="pad_batch, pad_tokens"):
        build_paged_metadata(
            [[3, 1]], [5], [2], [1], page_size=4, device="cpu",
            pad_batch=1, pad_tokens=2, dummy_page=0,
        )  # fmt: skip


def test_paged_metadata_errors():
    with pytest.raises(ValueError, match=r"page_lists\[0\]"):
        build_paged_metadata([[1]], [4], [1], [0], page_size=4, device="cpu")
    with pytest.raises(ValueError, match="one entry per sequence"):
        build_paged_metadata([[1]], [1, 2], [1], [0], page_size=4, device="cpu")
    with pytest.raises(ValueError, match=r"new_lengths\[0\]"):
        build_paged_metadata([[1]], [1], [-1], [0], page_size=4, device="cpu")
    with pytest.raises(ValueError, match="page ids >= 0, got -3"):
        build_paged_metadata([[2, -3]], [5], [1], [0], page_size=4, device="cpu")
    with pytest.raises(ValueError, match="page_size: expected a power-of-two int"):
        build_paged_metadata([[1]], [1], [1], [0], page_size=6, device="cpu")
    m = build_paged_metadata([[2, 9], [4]], [5, 0], [1, 2], [0, 1], page_size=4, device="cpu")
    assert m.page_table.page_size == 4 and m.layout.page_id_range == (2, 9)


def test_jagged_metadata():
    m = build_jagged_metadata([5, 1, 7], [2, 0, 3], "cpu")
    assert m.cu_seqlens.tolist() == [0, 7, 8, 18] and m.num_targets.tolist() == [2, 0, 3]
    assert (m.max_seqlen, m.num_tokens, m.batch_size) == (10, 18, 3)


# --- manager ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_prepare_grows_users_and_builds_metadata(device):
    cache = make_cache(device)
    m = cache.prepare([10, 11], [0, 0], [5, 3], [2, 0])
    write_tokens(cache, 10, 0, 5)
    write_tokens(cache, 11, 0, 3)
    assert m.page_table.history_lengths(4).tolist() == [5, 3]
    assert m.cu_seqlens_q.tolist() == [0, 7, 10]
    m = cache.prepare([11, 10], [3, 5], [2, 0], [1, 1])
    write_tokens(cache, 11, 3, 5)
    assert m.page_table.history_lengths(4).tolist() == [5, 5]
    assert m.append_start.tolist() == [3, 5]
    assert cache.user_pages(10) == m.page_table.page_ids[2:].tolist()
    assert cache.users == [11, 10]  # most recently used last, in batch order
    for uid in (10, 11):
        check_user(cache, uid)
    cache.check_invariants()


@pytest.mark.parametrize("device", DEVICES)
def test_offload_then_onload_is_bit_identical(device):
    cache = make_cache(device, num_pages=6, host_pages=8)  # 5 usable pages
    cache.prepare([1], [0], [9], [0])  # 3 pages
    gen = torch.Generator().manual_seed(0)
    pages = cache.user_pages(1)
    data = torch.randn(cache.pool[:, pages].shape, generator=gen).to(device)
    cache.pool[:, pages] = data
    cache.prepare([2], [0], [12], [0])  # needs 3 pages: evicts user 1 to the host
    assert cache.location(1) == "host" and cache.stats["offloaded"] == 1
    cache.synchronize()
    assert torch.equal(cache.host_pool[:, cache.host_user_pages(1)], data.cpu())
    cache.prepare([1], [9], [0], [3])  # back, user 2 goes to the host
    assert cache.location(1) == "device" and cache.location(2) == "host"
    cache.synchronize()
    assert torch.equal(cache.pool[:, cache.user_pages(1)], data)
    cache.check_invariants()


@pytest.mark.parametrize("device", DEVICES)
def test_eviction_is_lru_and_spares_the_batch(device):
    cache = make_cache(device, num_pages=7, host_pages=0)  # 6 usable pages
    for uid in (1, 2, 3):
        cache.prepare([uid], [0], [8], [0])  # 2 pages each: pool full
        write_tokens(cache, uid, 0, 8)
    cache.prepare([1], [8], [0], [1])  # touch user 1: user 2 is now least recently used
    cache.prepare([4, 3], [0, 8], [5, 0], [0, 0])  # needs 2 pages, must not evict 3
    assert cache.location(2) is None and cache.stats["dropped"] == 1
    assert cache.location(1) == "device" and cache.location(3) == "device"
    for uid in (1, 3):
        check_user(cache, uid)
    # a batch that needs every page: evicts everyone outside it, never its own users
    write_tokens(cache, 4, 0, 5)
    cache.prepare([4, 5], [5, 0], [11, 8], [0, 0])  # 4 + 2 pages: the whole pool
    assert set(cache.users) == {4, 5}
    write_tokens(cache, 4, 5, 16)
    check_user(cache, 4)
    cache.check_invariants()


def test_host_pool_drops_lru_offloaded_users_when_full():
    cache = make_cache(num_pages=4, host_pages=4)  # 3 usable device pages, 4 host pages
    for uid in (1, 2, 3):
        cache.prepare([uid], [0], [8], [0])  # 2 pages each
        write_tokens(cache, uid, 0, 8)
    # 1 then 2 were offloaded (4 host pages); offloading 3 drops 1, the oldest on the host
    cache.prepare([4], [0], [12], [0])
    assert cache.location(1) is None and cache.location(2) == "host"
    assert cache.location(3) == "host"
    for uid in (2, 3):
        check_user(cache, uid)
    cache.check_invariants()


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (([1, 9], [4, 3], [1, 1], [0, 0]), "unknown user 9"),
        (([1], [3], [1], [0]), "holds 4 tokens of user 1"),
        (([1], [0], [1], [0]), "holds 4 tokens of user 1"),
        (([1, 1], [4, 4], [1, 1], [0, 0]), "appears twice"),
        (([5], [0], [0], [3]), "empty history"),
        (([5], [0], [-1], [3]), r"new_lengths\[0\]"),
        (([5], [0, 1], [1], [3]), "one entry per user"),
        (([5, 6], [0, 0], [16, 17], [0, 0]), "pool too small"),
        (([1, 5], [4, 0], [12, 20], [0, 0]), "pool too small"),
    ],
)
def test_bad_requests_leave_the_cache_unchanged(request_, match):
    cache = make_cache(num_pages=9, host_pages=4)  # 8 usable pages
    cache.prepare([1], [0], [4], [0])
    cache.prepare([2], [0], [9], [0])
    cache.prepare([3], [0], [12], [0])
    cache.prepare([4], [0], [16], [0])  # evicts 1 and 2 to the host
    before = snapshot(cache)
    with pytest.raises(KVCacheError, match=match):
        cache.prepare(*request_)
    assert_same(before, snapshot(cache))
    cache.check_invariants()


def test_explicit_evict_and_drop():
    cache = make_cache(host_pages=4)
    cache.prepare([1, 2], [0, 0], [5, 2], [0, 0])
    write_tokens(cache, 1, 0, 5)
    cache.evict(1)
    assert cache.location(1) == "host"
    check_user(cache, 1)
    cache.evict(2, offload=False)
    assert cache.location(2) is None
    with pytest.raises(KVCacheError, match="no pages on the device"):
        cache.evict(2)
    cache.drop(1)
    with pytest.raises(KVCacheError, match="unknown user"):
        cache.drop(1)
    assert cache.users == [] and cache.allocator.num_used == 0
    cache.check_invariants()


def test_config_errors():
    with pytest.raises(ValueError, match="page_size"):
        make_cache(page_size=6)
    with pytest.raises(ValueError, match="num_pages"):
        make_cache(num_pages=1)


# --- random request sequences (stateful) --------------------------------------------------

USERS = st.integers(0, 7)


class CacheMachine(RuleBasedStateMachine):
    """Random batches against a small pool; the model tracks what each user should hold."""

    def __init__(self):
        super().__init__()
        self.cache = make_cache(num_pages=9, page_size=4, host_pages=6, layers=2)
        self.known: dict[int, int] = {}  # uid -> length, for users the cache still knows

    @rule(
        batch=st.lists(
            st.tuples(USERS, st.integers(0, 9), st.integers(0, 3)), min_size=1, max_size=3
        ),
        lie=st.booleans(),
    )
    def request(self, batch, lie):
        ids = list(dict.fromkeys(u for u, _, _ in batch))
        new = {u: n for u, n, _ in batch}
        tgt = {u: t for u, _, t in batch}
        cached = [self.cache.cached_length(u) for u in ids]
        if lie:  # claim one token too many for the first user: must be refused
            cached[0] += 1
        before = snapshot(self.cache)
        args = (ids, cached, [new[u] for u in ids], [tgt[u] for u in ids])
        need = sum(-(-(c + new[u]) // 4) for c, u in zip(cached, ids, strict=True))
        try:
            meta = self.cache.prepare(*args)
        except KVCacheError as e:
            assert_same(before, snapshot(self.cache))
            assert (
                lie or need > 8 or any(c + new[u] == 0 for c, u in zip(cached, ids, strict=True))
            ), e
            return
        assert not lie
        for u, c in zip(ids, cached, strict=True):
            write_tokens(self.cache, u, c, c + new[u])
            self.known[u] = c + new[u]
            assert self.cache.location(u) == "device"
        assert meta.page_table.history_lengths(4).tolist() == [self.known[u] for u in ids]
        # users the cache dropped are gone from the model; nobody else may change length
        self.known = {u: n for u, n in self.known.items() if self.cache.location(u) is not None}
        assert set(self.known) == set(self.cache.users)

    @precondition(lambda self: self.known)
    @rule(data=st.data())
    def evict(self, data):
        u = data.draw(st.sampled_from(sorted(self.known)))
        if self.cache.location(u) == "device":
            self.cache.evict(u)
            self.known = {v: n for v, n in self.known.items() if self.cache.location(v) is not None}

    @invariant()
    def consistent(self):
        self.cache.check_invariants()
        for u, n in self.known.items():
            assert self.cache.cached_length(u) == n
            check_user(self.cache, u)


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(
    settings(), max_examples=settings().max_examples * 2, stateful_step_count=15
)


def test_manager_arguments_get_named_errors():
    from hstu_kernels.kvcache import KVCacheConfig, KVCacheManager

    base = dict(num_layers=2, num_pages=4, page_size=16, heads=1, head_dim=8, device="cpu")
    with pytest.raises(TypeError, match=r"dtype: expected torch\.bfloat16"):
        KVCacheConfig(**base, dtype=torch.int32)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            KVCacheConfig(**(base | {"device": "cuda"}))
    with pytest.raises(ValueError, match=r"device: expected .cpu. or .cuda"):
        KVCacheConfig(**(base | {"device": "gpu0"}))
    cache = KVCacheManager(KVCacheConfig(**base))
    for bad in (-1, 2, 99, 1.0, True):
        with pytest.raises(IndexError, match=r"layer: expected an int in 0\.\.1"):
            cache.layer_cache(bad)
        with pytest.raises(IndexError, match=r"layer: expected an int in 0\.\.1"):
            cache.wait_layer(bad)
    with pytest.raises(ValueError, match=r"device: expected a cpu or cuda"):
        KVCacheConfig(**(base | {"device": "xla"}))
    cache.prepare([7], [0], [5], [0])
    before = (cache.users, cache.user_pages(7), cache.location(7))
    with pytest.raises(TypeError, match="offload: expected a bool"):
        cache.evict(7, offload="no")
    assert (cache.users, cache.user_pages(7), cache.location(7)) == before


def test_explain_arguments_get_named_errors():
    import hstu_kernels as hk

    for kw, pattern in (({"head_dim": -8}, "head_dim: expected a positive int"),
                        ({"arch": "sm9"}, "arch: expected 'cpu' or 'sm_"),
                        ({"batch": 0}, "batch: expected a positive int"),
                        ({"max_attn_len": -1}, "max_attn_len: expected an int >= 0"),
                        ({"dtype": "bf16"}, "dtype: expected a torch.dtype")):  # fmt: skip
        with pytest.raises((ValueError, TypeError), match=pattern):
            hk.explain("paged", **kw)
    with pytest.raises(ValueError, match="op: expected one of"):
        hk.explain("decode")
