"""FP8 (e4m3) KV pools through the ops, the plans, the Triton kernels and the cache manager.

The math is the reference's (``hstu_kernels.reference.fp8``, tested in
``test_fp8_reference.py``); here each kernel is held to it by the DESIGN.md §5 rule over the
same quantised pool, with NaN in every unused slot and scale (``testing.fp8_pool``) and the
outputs poisoned. Without a GPU the Triton read kernel runs in the interpreter, whose e4m3 to
fp32 conversion is exact for finite codes (the NaN codes it reads as +-480 sit only in slots the
kernel masks); its fp32 to e4m3 conversion rounds some values a binade low, so the quantising
append is tested on the GPU only.
"""

from __future__ import annotations

import torch

_ON_GPU = torch.cuda.is_available()  # without a GPU, conftest switches the interpreter on

import pytest  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from strategies import batches as shared_batches  # noqa: E402
from strategies import masks  # noqa: E402

import hstu_kernels as hk  # noqa: E402
from hstu_kernels import reference  # noqa: E402
from hstu_kernels.testing import (  # noqa: E402
    check_paged_backend,
    fp8_pool,
    make_paged_case,
    poisoned_like,
)

FP8 = torch.float8_e4m3fn
cpu_only = pytest.mark.skipif(_ON_GPU, reason="interpreter tests run only without a GPU")
gpu = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _no_autotune(knobs):
    knobs(triton_autotune=False)


def batches(max_history: int, max_targets: int, max_batch: int = 3):
    """Around the 16-, 32- and 64-token pages and key tiles."""
    edges = (1, 15, 16, 17, 31, 32, 33, 63, 64, 65)
    return shared_batches(max_history, max_targets, max_batch, edges=edges, whole=True)


def _case(shape, page_size, heads, head_dim, device, seed, scale=1.0):
    histories, new, targets = shape
    case = make_paged_case(
        histories, new, targets, page_size=page_size, heads=heads, head_dim=head_dim,
        dtype=torch.float32, device=device, seed=seed,
    )  # fmt: skip
    if scale != 1.0:  # K/V magnitudes far from 1: the scales must carry them
        # (q keeps its own: scaling it too overflowed fp16 outputs, the reference's as well)
        for name in ("k_new", "v_new", "kv_cache", "k_full", "v_full"):
            setattr(case, name, getattr(case, name) * scale)
    return case


# ------------------------------------------------------------------ API, any device (CPU here)


def test_pool_checks_name_the_argument():
    case = _case(([40, 9], [3, 9], [2, 0]), 16, 2, 64, "cpu", 0)
    kv8, scales = fp8_pool(case.kv_cache)
    args = (case.q, case.k_new, case.v_new)
    call = dict(num_targets=case.num_targets, backend="reference")
    with pytest.raises(ValueError, match="kv_scales: an FP8 pool needs its scales"):
        hk.paged_hstu_attention(*args, kv8, case.page_table, case.cu_q, **call)
    with pytest.raises(ValueError, match="kv_scales: given for a float32 pool"):
        hk.paged_hstu_attention(*args, case.kv_cache, case.page_table, case.cu_q,
                                kv_scales=scales, **call)  # fmt: skip
    with pytest.raises(ValueError, match=r"kv_scales: expected shape \(.*\)"):
        hk.paged_hstu_attention(*args, kv8, case.page_table, case.cu_q,
                                kv_scales=scales[:, :, :8].contiguous(), **call)  # fmt: skip
    with pytest.raises(TypeError, match="kv_scales: expected dtype float32"):
        hk.paged_hstu_attention(*args, kv8, case.page_table, case.cu_q,
                                kv_scales=scales.half(), **call)  # fmt: skip
    with pytest.raises(TypeError, match="kv_dtype"):
        hk.plan_paged_attention(case.page_table, case.cu_q, heads=2, head_dim=64,
                                dtype=torch.float32, page_size=16, kv_dtype=torch.int8)  # fmt: skip


def test_plan_runs_against_its_kv_dtype():
    case = _case(([40, 9], [3, 9], [2, 0]), 16, 2, 64, "cpu", 1)
    kv8, scales = fp8_pool(case.kv_cache)
    common = dict(heads=2, head_dim=64, dtype=torch.float32, page_size=16, backend="reference")
    plan8 = hk.plan_paged_attention(case.page_table, case.cu_q, case.num_targets,
                                    kv_dtype=FP8, **common)  # fmt: skip
    plan16 = hk.plan_paged_attention(case.page_table, case.cu_q, case.num_targets, **common)
    args = (case.q, case.k_new, case.v_new)
    out8 = plan8.run(*args, kv8, kv_scales=scales)
    want = reference.paged_hstu_attention(
        *args, kv8, case.page_table, case.cu_q, case.num_targets, case.spec(), scales
    )
    assert torch.equal(out8, want)
    assert torch.equal(plan8.run_partials(*args, kv8, kv_scales=scales)[0], want)
    with pytest.raises(TypeError, match="plan's kv_dtype"):
        plan8.run(*args, case.kv_cache)
    with pytest.raises(ValueError, match="needs its scales"):
        plan8.run(*args, kv8)
    with pytest.raises(TypeError, match="plan's kv_dtype"):
        plan16.run(*args, kv8, kv_scales=scales)
    append = hk.plan_append_kv(case.page_table, case.cu_q, case.num_targets, kv_dtype=FP8,
                               **common)  # fmt: skip
    before = (kv8.clone(), scales.clone())
    with pytest.raises(ValueError, match="needs its scales"):
        append.run(kv8, case.k_new, case.v_new)
    assert torch.equal(kv8.view(torch.uint8), before[0].view(torch.uint8))  # nothing written
    assert torch.equal(scales.isnan(), before[1].isnan())


def test_dispatch_sends_fp8_pools_to_backends_that_have_them():
    exp = hk.explain("paged", head_dim=256, kv_dtype=FP8, arch="sm_90")
    assert exp.choice == "triton", str(exp)
    assert "lacks features ['fp8_kv']" in exp.reasons["cutedsl-hopper"]
    with pytest.raises(hk.BackendError, match="fp8_kv"):
        case = _case(([20], [3], [0]), 16, 1, 64, "cpu", 0)
        kv8, scales = fp8_pool(case.kv_cache)
        hk.paged_hstu_attention(case.q, case.k_new, case.v_new, kv8, case.page_table,
                                case.cu_q, backend="cutedsl-hopper", kv_scales=scales)  # fmt: skip
    with pytest.raises(ValueError, match="kv_dtype"):
        hk.explain("jagged", kv_dtype=FP8)


def test_cache_manager_fp8_pool_and_bit_exact_offload():
    """An FP8 pool holds e4m3 pages and fp32 scales beside them; an evicted user's pages and
    scales come back bit for bit."""
    from hstu_kernels.kvcache import KVCacheConfig, KVCacheManager

    config = KVCacheConfig(num_layers=2, num_pages=9, page_size=16, heads=2, head_dim=64,
                           dtype=torch.float32, device="cpu", host_pages=8,
                           kv_dtype=FP8)  # fmt: skip
    cache = KVCacheManager(config)
    assert cache.pool.dtype == FP8 and cache.scales.shape == (2, 9, 2, 16, 2)
    assert cache.layer_scales(1).data_ptr() == cache.scales[1].data_ptr()
    assert cache.kv_dtype == FP8
    meta = cache.prepare([7], [0], [40], [0])
    gen = torch.Generator().manual_seed(5)
    k, v = (torch.randn(40, 2, 64, generator=gen) * 3 for _ in range(2))
    for layer in range(2):
        hk.append_kv(cache.layer_cache(layer), meta.page_table, k, v, meta.cu_seqlens_q,
                     num_targets=meta.num_targets, kv_scales=cache.layer_scales(layer))  # fmt: skip
    pages = cache.user_pages(7)
    saved = (cache.pool[:, pages].view(torch.uint8).clone(), cache.scales[:, pages].clone())
    cache.evict(7)
    assert cache.location(7) == "host"
    cache.prepare([7], [40], [1], [0])  # onloads, then one more token
    back = cache.user_pages(7)
    assert torch.equal(cache.pool[:, back].view(torch.uint8), saved[0])
    assert torch.equal(cache.scales[:, back], saved[1])
    cache.check_invariants()
    with pytest.raises(TypeError, match="kv_dtype"):
        KVCacheConfig(num_layers=1, num_pages=2, page_size=16, heads=1, head_dim=64,
                      device="cpu", kv_dtype=torch.float16)  # fmt: skip


def test_pool_bytes_hold_more_tokens():
    """The same bytes, scales included, hold >= 1.9x the tokens of a bf16 pool at D = 256."""
    from hstu_kernels.kvcache import KVCacheConfig, KVCacheManager

    def tokens_per_byte(kv_dtype):
        config = KVCacheConfig(num_layers=1, num_pages=4, page_size=32, heads=4, head_dim=256,
                               device="cpu", kv_dtype=kv_dtype)  # fmt: skip
        c = KVCacheManager(config)
        used = c.pool.numel() * c.pool.element_size()
        if c.scales is not None:
            used += c.scales.numel() * c.scales.element_size()
        return 4 * 32 / used

    assert tokens_per_byte(FP8) / tokens_per_byte(None) == pytest.approx(512 / 260)


# ---------------------------------------------------------------- CPU (Triton interpreter)


@cpu_only
@given(
    data=st.data(),
    shape=batches(max_history=70, max_targets=9),
    page_size=st.sampled_from([16, 32]),
    heads=st.integers(1, 2),
    dtype=st.sampled_from([torch.float16, torch.float32]),
    scale=st.sampled_from([1.0, 1e-3, 40.0]),
    seed=st.integers(0, 2**16),
)
def test_paged_parity_interpreter(data, shape, page_size, heads, dtype, scale, seed):
    mask = data.draw(st.one_of(st.just((0, 0)), masks(shape)))
    check_paged_backend(_case(shape, page_size, heads, 64, "cpu", seed, scale), dtype,
                        "triton", *mask, fp8=True)  # fmt: skip


@cpu_only
def test_paged_partials_interpreter(knobs):
    from hstu_kernels.backends.triton import attention as tri_attn
    from hstu_kernels.backends.triton.config import Config

    case = _case(([70, 33], [20, 33], [5, 0]), 16, 2, 64, "cpu", 4)
    kv8, scales = fp8_pool(case.kv_cache)
    q, k, v = (t.half() for t in (case.q, case.k_new, case.v_new))
    want = reference.paged_hstu_attention(q, k, v, kv8, case.page_table, case.cu_q,
                                          case.num_targets, case.spec(), scales)  # fmt: skip
    partials = tri_attn.launch(
        q, k, v, case.cu_q, case.num_targets, 33, case.spec().alpha, case.max_total,
        poisoned_like(q), Config(16, 16, 4, 1, splits=3), kv8, case.page_table,
        sum_splits=False, kv_scales=scales,
    )  # fmt: skip
    assert partials.shape == (3, *q.shape)
    got = partials.sum(0).to(q.dtype)
    assert (got.float() - want.float()).abs().max() <= 5e-3 * want.float().abs().max()


# ---------------------------------------------------------------------------------- GPU


@gpu
@given(
    data=st.data(),
    shape=batches(max_history=1500, max_targets=300),
    page_size=st.sampled_from([16, 32, 64]),
    head_dim=st.sampled_from([64, 128, 256]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    scale=st.sampled_from([1.0, 1e-3, 40.0]),
    seed=st.integers(0, 2**16),
)
def test_paged_parity_gpu(data, shape, page_size, head_dim, dtype, scale, seed):
    mask = data.draw(st.one_of(st.just((0, 0)), masks(shape)))
    case = _case(shape, page_size, 2, head_dim, "cuda", seed, scale)
    check_paged_backend(case, dtype, "triton", *mask, fp8=True)


@gpu
@pytest.mark.parametrize("splits", [1, 5])
def test_paged_splits_gpu(knobs, splits):
    from hstu_kernels.backends.triton.config import Config

    knobs(triton_autotune=False)
    case = _case(([1000, 33, 64, 1], [128, 33, 17, 1], [256, 0, 7, 2]), 32, 2, 256, "cuda", 3)
    kv8, scales = fp8_pool(case.kv_cache)
    q, k, v = (t.bfloat16() for t in (case.q, case.k_new, case.v_new))
    ref32 = reference.paged_hstu_attention(case.q, case.k_new, case.v_new, kv8,
                                           case.page_table, case.cu_q, case.num_targets,
                                           case.spec(), scales)  # fmt: skip
    ref16 = reference.paged_hstu_attention(q, k, v, kv8, case.page_table, case.cu_q,
                                           case.num_targets, case.spec(), scales)  # fmt: skip
    from hstu_kernels.backends.triton import attention as tri_attn
    from hstu_kernels.testing import assert_hstu_close

    out = poisoned_like(q)
    tri_attn.launch(q, k, v, case.cu_q, case.num_targets, 300, case.spec().alpha,
                    case.max_total, out, Config(128, 32, 8, 3, splits=splits), kv8,
                    case.page_table, kv_scales=scales)  # fmt: skip
    assert_hstu_close(out, ref32, ref16)


@gpu
@given(
    shape=batches(max_history=300, max_targets=20),
    page_size=st.sampled_from([16, 32, 64]),
    head_dim=st.sampled_from([64, 128, 256]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    scale=st.sampled_from([1.0, 1e-3, 40.0]),
    seed=st.integers(0, 2**16),
)
def test_append_bit_exact_gpu(shape, page_size, head_dim, dtype, scale, seed):
    """The Triton append writes the reference's bytes and scales, and nothing else."""
    case = _case(shape, page_size, 2, head_dim, "cuda", seed, scale)
    nan = torch.full(case.kv_cache.shape, float("nan"), device="cuda")
    expected, got = nan.to(FP8), nan.to(FP8)
    s_expected, s_got = nan[..., 0].clone(), nan[..., 0].clone()
    k, v = case.k_new.to(dtype), case.v_new.to(dtype)
    reference.append_kv(expected, case.page_table, k, v, case.cu_q, case.num_targets,
                        kv_scales=s_expected)  # fmt: skip
    hk.append_kv(got, case.page_table, k, v, case.cu_q, num_targets=case.num_targets,
                 backend="triton", kv_scales=s_got)  # fmt: skip
    assert torch.equal(expected.view(torch.uint8), got.view(torch.uint8))
    assert torch.equal(s_expected.isnan(), s_got.isnan())
    assert torch.equal(s_expected.nan_to_num(0.0), s_got.nan_to_num(0.0))


@gpu
def test_cached_block_fp8_close_to_bf16_gpu():
    """The cached block over an FP8 pool (Triton append and attention, two batches: the second
    reads the first's quantised history) against the same block over a bf16 pool: close."""
    from hstu_kernels.model.block import HSTUBlock

    block = HSTUBlock(2, 256, 2, 128, scaling_seqlen=600, dtype=torch.bfloat16, device="cuda")
    gen = torch.Generator(device="cuda")
    outs = {}
    for name, kv_dtype in (("bf16", None), ("fp8", FP8)):
        cache = block.make_cache(64, 32, kv_dtype=kv_dtype)
        gen.manual_seed(1)
        for cached, new, targets in (([0, 0], [300, 45], [0, 20]), ([300, 45], [17, 1], [9, 0])):
            meta = cache.prepare([0, 1], cached, new, targets)
            x = torch.randn(meta.num_tokens, 256, device="cuda", generator=gen).bfloat16()
            outs[name] = block.forward_cached(x, meta, cache).float()
    assert torch.isfinite(outs["fp8"]).all()
    diff = (outs["fp8"] - outs["bf16"]).abs().max().item()
    assert 0 < diff <= 0.05 * outs["bf16"].abs().max().item(), diff
