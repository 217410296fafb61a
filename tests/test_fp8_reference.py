"""The reference math of an FP8 (e4m3) KV page pool (``hstu_kernels.reference.fp8``): the
quantisation per token and head, the append (incremental appends leave earlier tokens' bytes
alone), and paged attention reading dequantised history."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hstu_kernels import reference
from hstu_kernels.reference import fp8
from hstu_kernels.testing import make_paged_case
from hstu_kernels.types import PageTable


@given(rows=st.integers(1, 40), heads=st.integers(1, 3), d=st.sampled_from([16, 64, 256]),
       magnitude=st.sampled_from([1e-3, 1.0, 300.0]), seed=st.integers(0, 2**16))  # fmt: skip
def test_quantize_round_trip(rows, heads, d, magnitude, seed):
    """e4m3 keeps 3 mantissa bits: each element within 1/16 of itself, plus the subnormal
    step of its row's scale; the row's largest magnitude maps to 448 exactly."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, heads, d, generator=gen) * magnitude
    x8, scale = fp8.quantize(x)
    assert x8.dtype == fp8.FP8_DTYPE and scale.dtype == fp8.SCALE_DTYPE
    assert x8.shape == x.shape and scale.shape == (rows, heads)
    back = fp8.dequantize(x8, scale)
    bound = x.abs() / 16 + scale[..., None] * 2.0**-9
    assert ((back - x).abs() <= bound).all()
    assert torch.equal(x8.float().abs().amax(-1), torch.full((rows, heads), fp8.FP8_MAX))


def test_zero_rows_and_bf16_input():
    x = torch.zeros(3, 2, 8, dtype=torch.bfloat16)
    x[1, 0] = torch.arange(8) - 3.5
    x8, scale = fp8.quantize(x)
    assert scale[0].tolist() == [1.0, 1.0] and (x8[0].float() == 0).all()
    assert torch.equal(fp8.dequantize(x8, scale)[0], torch.zeros(2, 8))
    assert scale[1, 0] == pytest.approx(3.5 / 448)


def test_pool_holds_more_tokens():
    """Scales included, the same bytes hold 1.97x the bf16 pool's tokens at D = 256."""
    assert fp8.tokens_per_byte_ratio(256) == pytest.approx(512 / 260)
    assert fp8.tokens_per_byte_ratio(256) >= 1.9 and fp8.tokens_per_byte_ratio(64) < 1.9


def _fp8_pool(case):
    """An empty FP8 pool and scales shaped like the case's cache (NaN: unwritten)."""
    cache = torch.full(case.kv_cache.shape, float("nan")).to(fp8.FP8_DTYPE)
    scales = torch.full(case.kv_cache.shape[:-1], float("nan"))
    return cache, scales


def _history_rows(case, lengths, seqs=None):
    """Packed K/V rows of the first ``lengths[i]`` history tokens of sequence ``seqs[i]``
    (default: every sequence), and their offsets."""
    seqs = range(len(lengths)) if seqs is None else seqs
    starts = case.cu_full.tolist()
    rows = torch.cat(
        [torch.arange(starts[b], starts[b] + n) for b, n in zip(seqs, lengths, strict=True)]
    )
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return case.k_full[rows], case.v_full[rows], cu


def _pages(case):
    pt = case.page_table
    ptr = pt.page_indptr.tolist()
    return [pt.page_ids[ptr[b] : ptr[b + 1]].tolist() for b in range(len(ptr) - 1)]


def _prefill(case):
    cache, scales = _fp8_pool(case)
    k, v, cu = _history_rows(case, case.histories)
    reference.append_kv(cache, case.page_table, k, v, cu, None, kv_scales=scales)
    return cache, scales


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == fp8.FP8_DTYPE else t.view(torch.int32)


@pytest.mark.parametrize("page_size", [16, 32])
def test_incremental_append_is_bit_exact(page_size):
    """Cached rows first, then the new rows of a request: the same bytes and scales as one
    append of the whole history (nothing re-quantised), and every other slot still unwritten."""
    histories, new = [1, 33, 70, 16], [1, 2, 37, 16]
    case = make_paged_case(histories, new, [0, 3, 5, 1], page_size=page_size, heads=2,
                           head_dim=32, seed=3)  # fmt: skip
    whole = _prefill(case)
    cache, scales = _fp8_pool(case)
    before = [h - n for h, n in zip(histories, new, strict=True)]
    cached = [b for b, n in enumerate(before) if n]  # a wholly new history starts empty
    pages = [_pages(case)[b][: -(-before[b] // page_size)] for b in cached]
    table = PageTable.from_lists(pages, [before[b] for b in cached], page_size)
    k, v, cu = _history_rows(case, [before[b] for b in cached], cached)
    reference.append_kv(cache, table, k, v, cu, None, kv_scales=scales)
    reference.append_kv(cache, case.page_table, case.k_new, case.v_new, case.cu_q,
                        case.num_targets, kv_scales=scales)  # fmt: skip
    assert torch.equal(_bytes(cache), _bytes(whole[0]))
    assert torch.equal(_bytes(scales), _bytes(whole[1]))
    written = ~torch.isnan(whole[1])
    assert int(written.sum()) == 2 * sum(histories) * 2  # K and V, per head


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", [(0, 0), (2, 9)])
def test_paged_attention_reads_dequantised_history(dtype, mask):
    """An FP8 pool gives exactly what a cache holding its dequantised values (in the
    queries' dtype) gives, and it satisfies the parity invariant over those values."""
    case = make_paged_case([40, 3, 97], [5, 3, 1], [4, 0, 7], page_size=16, heads=2,
                           head_dim=64, seed=5)  # fmt: skip
    cache, scales = _prefill(case)
    spec = case.spec(*mask)
    q, k_new, v_new = (t.to(dtype) for t in (case.q, case.k_new, case.v_new))
    got = reference.paged_hstu_attention(q, k_new, v_new, cache, case.page_table, case.cu_q,
                                         case.num_targets, spec, kv_scales=scales)  # fmt: skip
    plain = fp8.dequantize(cache, scales).to(dtype)
    want = reference.paged_hstu_attention(q, k_new, v_new, plain, case.page_table, case.cu_q,
                                          case.num_targets, spec)  # fmt: skip
    assert torch.equal(got, want)
    if dtype != torch.float32:
        return
    # Parity: the rows of the full jagged attention whose history K/V are the dequantised ones.
    k_full, v_full = case.k_full.clone(), case.v_full.clone()
    for b, (s, h) in enumerate(zip(case.cu_full.tolist(), case.histories, strict=False)):
        k_hist, v_hist = reference.gather_history_kv(cache, case.page_table, b, scales)
        k_full[s : s + h], v_full[s : s + h] = k_hist, v_hist
    full = reference.jagged_hstu_attention(case.q_full, k_full, v_full, case.cu_full,
                                           case.num_targets, spec)  # fmt: skip
    torch.testing.assert_close(got, full[case.rows], rtol=1e-5, atol=1e-6)


def test_error_against_the_bf16_cache():
    """Random data, D = 256: the FP8 pool's output stays within 5 % of the output's largest
    magnitude of the same call over the bf16 cache (e4m3 keeps 3 mantissa bits; the errors of
    a row's keys average out in its weighted sum)."""
    case = make_paged_case([300, 129], [20, 1], [16, 8], page_size=32, heads=2,
                           head_dim=256, seed=11)  # fmt: skip
    cache, scales = _prefill(case)
    q, k_new, v_new = (t.to(torch.bfloat16) for t in (case.q, case.k_new, case.v_new))
    spec = case.spec()
    got = reference.paged_hstu_attention(q, k_new, v_new, cache, case.page_table, case.cu_q,
                                         case.num_targets, spec, kv_scales=scales)  # fmt: skip
    bf16 = reference.paged_hstu_attention(q, k_new, v_new, case.kv_cache.to(torch.bfloat16),
                                          case.page_table, case.cu_q, case.num_targets, spec)  # fmt: skip
    err = (got.float() - bf16.float()).abs().max().item()
    assert 0 < err <= 0.05 * bf16.float().abs().max().item()
