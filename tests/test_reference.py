"""The reference ops: the mask against a per-pair statement of the rule, the parity invariant
(paged == rows of full jagged), and append_kv."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import hstu_kernels as hk
from hstu_kernels.reference import gather_history_kv, hstu_mask
from hstu_kernels.testing import assert_hstu_close, make_paged_case, poisoned_like

PAGE_SIZES = [16, 32, 64, 128, 256]


def valid_pair(p: int, j: int, history: int, contexts: int, window: int) -> bool:
    """DESIGN.md §1, one pair at a time, as written there."""

    def ident(x: int) -> int:
        if contexts == 0:
            return min(x, history)
        return min(max(x - contexts + 1, 0), history - contexts + 1)

    d = ident(p) - ident(j)
    return (
        p == j
        or (d > 0 and (window == 0 or d <= window))
        or (contexts > 0 and ident(p) == 0 and ident(j) < ident(history))
    )


@st.composite
def mask_params(draw):
    history = draw(st.integers(1, 40))
    targets = draw(st.integers(0, 12))
    contexts = draw(st.sampled_from([0, 0, 1, min(3, history), history]))
    window = draw(st.sampled_from([0, 0, 1, 5, history + targets]))
    return history, targets, contexts, window


@given(mask_params())
def test_mask_matches_per_pair_rule(params):
    history, targets, contexts, window = params
    total = history + targets
    mask = hstu_mask(history, total, contexts, window)
    expected = torch.tensor(
        [[valid_pair(p, j, history, contexts, window) for j in range(total)] for p in range(total)]
    )
    assert torch.equal(mask, expected)


@given(st.integers(1, 30), st.integers(0, 10))
def test_mask_without_contexts_or_window_is_causal_plus_targets(history, targets):
    total = history + targets
    mask = hstu_mask(history, total)
    for p in range(total):
        for j in range(total):
            expected = j <= p if p < history else (j < history or j == p)
            assert bool(mask[p, j]) == expected, (p, j)


@st.composite
def paged_batches(draw, max_pages: int = 3):
    page_size = draw(st.sampled_from(PAGE_SIZES))
    batch = draw(st.integers(1, 3))
    # lengths that straddle page edges: k pages +- 1 token, and one-token histories
    edge = st.builds(
        lambda k, d: max(1, k * page_size + d),
        st.integers(0, max_pages),
        st.sampled_from([-1, 0, 1]),
    )
    histories = draw(
        st.lists(st.one_of(edge, st.just(1), st.integers(1, 70)), min_size=batch, max_size=batch)
    )
    new = [draw(st.integers(0, h)) for h in histories]
    targets = draw(st.lists(st.sampled_from([0, 0, 1, 3, 17]), min_size=batch, max_size=batch))
    contexts = draw(st.sampled_from([0, 0, 0, 1, 2]))
    contexts = min(contexts, min(histories))
    window = draw(st.sampled_from([0, 0, 0, 1, 7, 50]))
    heads = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**31 - 1))
    return histories, new, targets, page_size, contexts, window, heads, seed


@given(paged_batches())
def test_parity_paged_equals_rows_of_full(params):
    histories, new, targets, page_size, contexts, window, heads, seed = params
    case = make_paged_case(
        histories, new, targets, page_size=page_size, heads=heads, head_dim=16, seed=seed
    )
    kwargs = dict(num_targets=case.num_targets, num_contexts=contexts, max_attn_len=window)
    full = hk.hstu_attention(
        case.q_full, case.k_full, case.v_full, case.cu_full, backend="reference", **kwargs
    )
    # Default scaling_seqlen of the paged call is max(H_b + T_b): the same as the full call's.
    out = hk.paged_hstu_attention(
        case.q,
        case.k_new,
        case.v_new,
        case.kv_cache,
        case.page_table,
        case.cu_q,
        backend="reference",
        out=poisoned_like(case.q),
        **kwargs,
    )
    expected = full[case.rows]
    assert_hstu_close(out, expected, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_reference_within_its_own_tolerance(dtype):
    case = make_paged_case([50, 33], [7, 33], [5, 0], page_size=16, heads=2, head_dim=32, seed=1)
    ref32 = case.reference_full(torch.float32)
    lowp = case.reference_full(dtype)
    assert lowp.dtype == dtype
    # bf16/fp16 inputs change the numbers, but the result is still close to fp32
    err = (lowp.float() - ref32).abs().max().item()
    assert 0 < err < 0.05 * ref32.abs().max().item()


@given(paged_batches(max_pages=2), st.integers(1, 3))
def test_append_kv_in_chunks_then_read_back(params, chunks):
    histories, _, _, page_size, _, _, heads, seed = params
    case = make_paged_case(
        histories,
        histories,
        [0] * len(histories),
        page_size=page_size,
        heads=heads,
        head_dim=8,
        seed=seed,
        fill_cache=False,
    )
    kv = case.kv_cache
    starts = case.cu_full.tolist()
    # append each history in `chunks` pieces, the page table growing with it
    done = [0] * len(histories)
    for c in range(chunks):
        upto = [h * (c + 1) // chunks for h in histories]
        rows = torch.cat([torch.arange(s + d, s + u) for s, d, u in zip(starts, done, upto)])
        if rows.numel() == 0:
            continue
        lengths = [u - d for d, u in zip(done, upto)]
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        table = _prefix_table(case.page_table, page_size, upto)
        if any(u == 0 for u in upto):
            continue  # a table needs >= 1 token per sequence; wait for the next chunk
        hk.append_kv(kv, table, case.k_full[rows], case.v_full[rows], cu)
        done = upto
    for b, h in enumerate(histories):
        k, v = gather_history_kv(kv, case.page_table, b)
        assert torch.equal(k, case.k_full[starts[b] : starts[b] + h])
        assert torch.equal(v, case.v_full[starts[b] : starts[b] + h])


def _prefix_table(table: hk.PageTable, page_size: int, lengths: list[int]) -> hk.PageTable:
    """The table of the first ``lengths[b]`` tokens of each sequence of ``table``."""
    indptr = table.page_indptr.tolist()
    pages = [
        table.page_ids[indptr[b] : indptr[b] + max(1, -(-n // page_size))].tolist()
        for b, n in enumerate(lengths)
    ]
    return hk.PageTable.from_lists(pages, [max(n, 1) for n in lengths], page_size)


def test_append_kv_skips_target_rows_and_keeps_other_slots():
    case = make_paged_case([20], [6], [4], page_size=16, heads=1, head_dim=4, seed=3)
    before = case.kv_cache.clone()
    k = torch.randn_like(case.k_new)
    v = torch.randn_like(case.v_new)
    hk.append_kv(case.kv_cache, case.page_table, k, v, case.cu_q, num_targets=case.num_targets)
    kh, vh = gather_history_kv(case.kv_cache, case.page_table, 0)
    assert torch.equal(kh[14:], k[:6]) and torch.equal(vh[14:], v[:6])
    kh0, _ = gather_history_kv(before, case.page_table, 0)
    assert torch.equal(kh[:14], kh0[:14])
    # nothing else changed: same NaN pattern, same values outside the six written slots
    changed = ~((case.kv_cache == before) | (case.kv_cache.isnan() & before.isnan()))
    assert int(changed.sum()) == 2 * 6 * 1 * 4


@given(mask_params(), st.integers(0, 2**31 - 1))
def test_jagged_reference_matches_formula(params, seed):
    """out[p] = sum over valid j of silu(alpha <q_p, k_j>) / scaling_seqlen * v_j, in fp64."""
    history, targets, contexts, window = params
    total = history + targets
    gen = torch.Generator().manual_seed(seed)
    heads, dim = 2, 8
    q, k, v = (torch.randn(total, heads, dim, generator=gen) for _ in range(3))
    alpha, scaling = 0.7, total + 3
    out = hk.hstu_attention(
        q,
        k,
        v,
        torch.tensor([0, total], dtype=torch.int32),
        num_targets=torch.tensor([targets], dtype=torch.int32),
        num_contexts=contexts,
        max_attn_len=window,
        alpha=alpha,
        scaling_seqlen=scaling,
        backend="reference",
    )
    q64, k64, v64 = q.double(), k.double(), v.double()
    expected = torch.zeros(total, heads, dim, dtype=torch.float64)
    for p in range(total):
        for j in range(total):
            if valid_pair(p, j, history, contexts, window):
                s = alpha * (q64[p] * k64[j]).sum(-1)  # [heads]
                expected[p] += (s * torch.sigmoid(s) / scaling)[:, None] * v64[j]
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
