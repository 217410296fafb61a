"""The projection kernel with the cache append in its epilogue
(:mod:`hstu_kernels.backends.triton.fusion`), and the layer's choice between it and the separate path.

CPU tests run the kernel in the Triton interpreter (fp16/fp32); ``gpu`` tests run it in bf16.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

import hstu_kernels
from hstu_kernels import reference
from hstu_kernels.backends.triton import fusion as FU
from hstu_kernels.backends.triton import projection as P
from hstu_kernels.kvcache import build_paged_metadata
from hstu_kernels.testing import assert_hstu_close, poisoned_like

SMALL = (P.GemmConfig(16, 32, 32, 2, 1, 4), P.GemmConfig(32, 16, 16, 3, 1, 4))
# the persistent TMA kernel's (tests/test_projection.py): store halves of 16 and 8 columns
SMALL_TMA = (P.TmaConfig(16, 32, 16, 2, 1, 4), P.TmaConfig(32, 16, 16, 3, 1, 4, False))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _interpreter_or_gpu() -> None:
    """Skip unless the kernels can run: on a GPU, or on CPU under the interpreter."""
    if DEVICE == "cuda":
        return
    import triton.language as tl

    assert type(tl.sum).__name__ == "InterpretedFunction", "Triton imported before conftest"


def _gpu_tma() -> tuple:
    """The TMA configs, where this GPU has TMA (compute capability 9.0 or later)."""
    return P.TMA_CONFIGS if torch.cuda.get_device_capability()[0] >= 9 else ()


def _inputs(tokens, k, inner, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, k, generator=gen)
    w = torch.randn(k, 4 * inner, generator=gen) / k**0.5
    return h.to(DEVICE, dtype), w.to(DEVICE, dtype)


def _paged_batch(new, targets, cached, heads, head_dim, page_size, dtype, seed):
    """A poisoned cache, its metadata and the page lists of a batch."""
    gen = torch.Generator().manual_seed(seed)
    lists, nxt = [], 1  # page 0 left unused: it must stay poisoned
    for c, n in zip(cached, new, strict=True):
        need = -(-(c + n) // page_size)
        lists.append(list(range(nxt, nxt + need)))
        nxt += need
    perm = torch.randperm(nxt + 2, generator=gen).tolist()  # pages out of order
    lists = [[perm[p] for p in pl] for pl in lists]
    cache = poisoned_like(torch.empty(nxt + 2, 2, page_size, heads, head_dim, dtype=dtype))
    meta = build_paged_metadata(lists, cached, new, targets, page_size=page_size, device=DEVICE)
    return cache.to(DEVICE), meta


def _check(tokens_new, targets, cached, k, heads, head_dim, page_size, dtype, config, seed):
    inner = heads * head_dim
    tokens = sum(tokens_new) + sum(targets)
    h, w = _inputs(tokens, k, inner, dtype, seed)
    cache, meta = _paged_batch(tokens_new, targets, cached, heads, head_dim, page_size, dtype, seed)
    expected_cache = cache.clone()
    append = FU.CacheAppend(cache, meta.page_table, meta.cu_seqlens_q, meta.num_targets)
    out = poisoned_like(torch.empty(4, tokens, inner, dtype=dtype, device=DEVICE))
    kernel = P.silu_gemm_tma if isinstance(config, P.TmaConfig) else P.silu_gemm
    got = kernel(h, w, config, out=out, append=append)
    assert got is out
    ref32, ref_lowp = reference.project_silu(h.float(), w.float()), reference.project_silu(h, w)
    assert_hstu_close(got, ref32, ref_lowp, eps=1e-5)
    shape = (tokens, heads, head_dim)
    hstu_kernels.append_kv(
        expected_cache, meta.page_table, got[3].view(shape), got[1].view(shape),
        meta.cu_seqlens_q, num_targets=meta.num_targets, backend="reference",
    )  # fmt: skip
    # the epilogue stores the same values into the same slots, and nothing else
    assert torch.equal(cache.view(torch.int16), expected_cache.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_append_edges(dtype):
    """A one-token history, a sequence of targets only, a page edge crossed by the new rows,
    an empty sequence; K not a multiple of BLOCK_K. Pointer and TMA kernels."""
    _interpreter_or_gpu()
    if DEVICE == "cuda":
        dtype = torch.bfloat16 if dtype == torch.float32 else dtype
    # the GPU's configs need inner = heads * D to be a multiple of their BLOCK_N (<= 256)
    configs, head_dim, k = (
        (SMALL + SMALL_TMA, 16, 40) if DEVICE == "cpu" else (P.CONFIGS + _gpu_tma(), 128, 200)
    )
    for i, config in enumerate(configs):
        _check([1, 0, 19, 0], [2, 3, 0, 0], [0, 4, 14, 1], k, 2, head_dim, 16, dtype, config, i)


@given(
    batch=st.integers(1, 4),
    data=st.data(),
    config=st.sampled_from(SMALL + SMALL_TMA),
    k=st.sampled_from([16, 48]),
)
def test_append_random(batch, data, config, k):
    _interpreter_or_gpu()
    P.reset()  # hypothesis forbids function-scoped fixtures: reset by hand
    try:
        new = data.draw(st.lists(st.integers(0, 40), min_size=batch, max_size=batch))
        tgt = data.draw(st.lists(st.integers(0, 6), min_size=batch, max_size=batch))
        cached = data.draw(st.lists(st.integers(0, 50), min_size=batch, max_size=batch))
        cached = [c if c + n else 1 for c, n in zip(cached, new, strict=True)]
        if sum(new) + sum(tgt) == 0:
            tgt[0] = 1
        _check(new, tgt, cached, k, 2, 16, 16, torch.float16, config, batch * 100 + k)
    finally:
        P.reset()


def test_append_rejects_a_cache_it_cannot_write():
    h, w = _inputs(4, 32, 32, torch.float32, seed=0)
    cache, meta = _paged_batch([4], [0], [0], 2, 8, 16, torch.float32, 0)  # heads*D 16, not 32
    append = FU.CacheAppend(cache, meta.page_table, meta.cu_seqlens_q, meta.num_targets)
    with pytest.raises(ValueError, match="heads\\*D = 32"):
        P.silu_gemm(h, w, SMALL[0], append=append)
    cache2, meta2 = _paged_batch([4], [0], [0], 2, 16, 16, torch.float16, 0)
    append2 = FU.CacheAppend(cache2, meta2.page_table, meta2.cu_seqlens_q, meta2.num_targets)
    with pytest.raises(TypeError, match=r"kv_cache: expected torch\.float32"):
        P.silu_gemm(h, w, SMALL[0], append=append2)


def test_project_appending_falls_back_to_the_separate_path(knobs):
    """Off CUDA (or with HSTU_FUSED_APPEND=0) the separate path runs."""
    h, w = _inputs(3, 8, 8, torch.float32, seed=1)
    cache, meta = _paged_batch([3], [0], [0], 2, 4, 16, torch.float32, 0)
    append = FU.CacheAppend(cache, meta.page_table, meta.cu_seqlens_q, meta.num_targets)
    if DEVICE == "cuda":
        knobs(fused_append=False)
    sentinel = torch.zeros(1)
    assert FU.project_appending(h, w, append, lambda: sentinel) is sentinel


def test_layer_cached_path_with_the_fused_projection(monkeypatch, knobs, tmp_path):
    """The layer's cached path with the fused kernel forced (interpreter on the CPU): the
    same outputs and the same cache as the separate path (LayerNorm, projection, append_kv),
    chunk after chunk, so k and v land in the right planes and rows."""
    import triton.language as tl

    from hstu_kernels.model import HSTUBlock

    if DEVICE == "cuda":
        pytest.skip("the GPU runs this through tests/test_block.py")
    assert type(tl.sum).__name__ == "InterpretedFunction", "Triton imported before conftest"

    def run(fused: bool):
        knobs(fused_append=fused, tuning_cache=tmp_path / str(fused))  # fresh choices
        # fused: every shape takes the first small config
        monkeypatch.setattr(P, "CONFIGS", (SMALL[0],))
        with FU.CHOICES.pin(SMALL[0]):
            return _run_block()

    def _run_block():
        block = HSTUBlock(
            num_layers=2, hidden=32, heads=1, head_dim=64, scaling_seqlen=64,
            dtype=torch.float16, seed=3, backend="triton",
        )  # fmt: skip
        cache = block.make_cache(num_pages=12, page_size=16)
        gen = torch.Generator().manual_seed(2)
        outs = []
        for cached, new, tgt in (([0, 0], [20, 9], [0, 3]), ([20, 9], [7, 17], [2, 0])):
            meta = cache.prepare([5, 6], cached, new, tgt)
            x = torch.randn(sum(new) + sum(tgt), 32, generator=gen).half()
            outs.append(block.forward_cached(x, meta, cache))
        return outs, cache.pool.clone(), FU.CHOICES.items()

    sep_outs, sep_pool, sep_choices = run(False)
    fused_outs, fused_pool, fused_choices = run(True)
    assert not sep_choices and fused_choices and set(fused_choices.values()) == {SMALL[0]}
    # the same GEMM config either way, so the same values, bit for bit
    for a, b in zip(fused_outs, sep_outs, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(fused_pool, sep_pool)
    assert torch.isfinite(fused_pool).all() and fused_pool.abs().sum() > 0
