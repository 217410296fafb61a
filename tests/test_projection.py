"""The fused projection (GEMM + SiLU epilogue into ``[4, T, inner]``), its chooser, and the
layer/block wired to it and to the in-place residual.

CPU tests run the Triton kernels in the interpreter (fp16/fp32: the interpreter's bf16 dot is
wrong); ``gpu`` tests run every tile config in bf16 at the profiled shapes.
"""

from __future__ import annotations

import contextlib

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given

from hstu_kernels import reference
from hstu_kernels import settings as hk_settings
from hstu_kernels.backends.triton import projection as P
from hstu_kernels.kvcache import build_jagged_metadata
from hstu_kernels.model import HSTUBlock
from hstu_kernels.testing import assert_hstu_close, poisoned_like

# small tiles for the interpreter: BLOCK_N divides inner 32/64; several row tiles per group
SMALL_CONFIGS = (P.GemmConfig(16, 32, 32, 2, 1, 4), P.GemmConfig(32, 16, 16, 3, 1, 4))
# the TMA kernel's: store halves of 16 and 8 columns (16 bytes, TMA's least, in fp16); one
# without the flattened loop
SMALL_TMA_CONFIGS = (P.TmaConfig(16, 32, 16, 2, 1, 4), P.TmaConfig(32, 16, 16, 3, 1, 4, False))


def _use_interpreter(monkeypatch) -> None:
    """Route the projection's Triton kernels through the interpreter on CPU tensors."""
    import triton.language as tl

    assert type(tl.sum).__name__ == "InterpretedFunction", "Triton imported before conftest"
    P.reset()  # decorate the kernels again under the interpreter
    P.CHOICES.clear()


def _inputs(tokens, k, inner, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, k, generator=gen).to(device, dtype)
    w = (torch.randn(k, 4 * inner, generator=gen) / k**0.5).to(device, dtype)
    return h, w


def _refs(h, w):
    """fp32 yardstick and the low-precision torch path (unfused: rounds the GEMM, then SiLU)."""
    return reference.project_silu(h.float(), w.float()), reference.project_silu(h, w)


def _check_fused(tokens, k, inner, dtype, config):
    h, w = _inputs(tokens, k, inner, dtype, seed=tokens + k + inner)
    out = poisoned_like(torch.empty(4, tokens, inner, dtype=dtype))
    kernel = P.silu_gemm_tma if isinstance(config, P.TmaConfig) else P.silu_gemm
    got = kernel(h, w, config, out=out)
    assert got is out
    ref32, ref_lowp = _refs(h, w)
    assert_hstu_close(got, ref32, ref_lowp, eps=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 7, 65, 130])
def test_silu_gemm_interpreter(tokens, dtype, monkeypatch):
    _use_interpreter(monkeypatch)
    # K 40: not a multiple of BLOCK_K (the masked K loop); inner 64 with BLOCK_N 16/32:
    # several column tiles per slot
    for k, inner, config in [(32, 32, SMALL_CONFIGS[0]), (64, 64, SMALL_CONFIGS[1])]:
        _check_fused(tokens, k, inner, dtype, config)
    _check_fused(tokens, 40, 64, dtype, SMALL_CONFIGS[0])


@given(
    tokens=st.integers(1, 100),
    k=st.sampled_from([16, 32, 48, 64]),
    inner=st.sampled_from([32, 64]),
    config=st.sampled_from(SMALL_CONFIGS + SMALL_TMA_CONFIGS),
)
def test_silu_gemm_interpreter_random(tokens, k, inner, config):
    import triton.language as tl

    assert type(tl.sum).__name__ == "InterpretedFunction", "Triton imported before conftest"
    P.reset()  # hypothesis forbids function-scoped fixtures: reset by hand
    try:
        _check_fused(tokens, k, inner, torch.float16, config)
    finally:
        P.reset()


def _skip_without_descriptors() -> None:
    if P.tensor_descriptor_class() is None:
        pytest.skip("this triton has no triton.tools.tensor_descriptor (triton < 3.4)")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 7, 65, 130])
def test_silu_gemm_tma_interpreter(tokens, dtype, monkeypatch):
    """The persistent TMA kernel (3 programs in the interpreter, so each loops over several
    tiles). T=7, 65, 130 end in a partial row tile: the 3-d output descriptor must clip its
    rows rather than write them into the next slot's first rows (a [4 * T, inner] view
    would). K=40 is not a multiple of BLOCK_K: TMA's zero fill stands in for the K mask."""
    _use_interpreter(monkeypatch)
    _skip_without_descriptors()
    for k, inner, config in [(32, 32, SMALL_TMA_CONFIGS[0]), (64, 64, SMALL_TMA_CONFIGS[1])]:
        _check_fused(tokens, k, inner, dtype, config)
    _check_fused(tokens, 40, 64, dtype, SMALL_TMA_CONFIGS[0])


@pytest.mark.parametrize("config", P.TMA_CONFIGS, ids=str)
def test_silu_gemm_tma_gpu_configs_interpreter(config, monkeypatch):
    """The GPU's TMA tile configs on a small shape (one partial row tile of 127, K=200 in
    four K tiles, the last partial): the same index math as on the card."""
    _use_interpreter(monkeypatch)
    _skip_without_descriptors()
    _check_fused(127, 200, 256, torch.float16, config)


def test_tma_unsupported_reasons(monkeypatch):
    """Where TMA cannot run, :func:`P.tma_unsupported` says why and the kernel refuses;
    nothing is launched."""
    _use_interpreter(monkeypatch)
    _skip_without_descriptors()
    h, w = _inputs(8, 32, 32, torch.float16)
    assert P.tma_unsupported(h, w) is None
    shifted = torch.empty(8 * 32 + 1, dtype=torch.float16)[1:].view(8, 32).copy_(h)
    assert "h: base pointer" in P.tma_unsupported(shifted, w)
    assert "column stride" in P.tma_unsupported(h, w.t().contiguous().t())
    h36, w36 = _inputs(8, 36, 32, torch.float16)  # 72-byte rows
    assert "K = 36 elements" in P.tma_unsupported(h36, w36)
    h12, w12 = _inputs(8, 32, 12, torch.float16)  # inner 24 bytes
    assert "inner = 12 elements" in P.tma_unsupported(h12, w12)
    with pytest.raises(ValueError, match="h: base pointer"):
        P.silu_gemm_tma(shifted, w, P.TmaConfig(16, 32, 16, 2, 1, 4))
    with pytest.raises(ValueError, match="BLOCK_N does not divide inner=48"):
        P.silu_gemm_tma(*_inputs(4, 32, 48, torch.float16), SMALL_TMA_CONFIGS[0])
    with hk_settings.override(triton_interpret=False):
        assert P.tma_unsupported(h, w) == "not a CUDA tensor"
    monkeypatch.setattr(P, "tensor_descriptor_class", lambda: None)
    assert "triton >= 3.4" in P.tma_unsupported(h, w)


def test_project_silu_tma_choice_and_fallbacks(monkeypatch, request):
    """A TMA choice runs the TMA kernel; on a tensor TMA cannot take, or after the kernel
    failed, the pointer kernel does the work: the layer never stops on TMA."""
    _use_interpreter(monkeypatch)
    _skip_without_descriptors()
    monkeypatch.setattr(P, "CONFIGS", SMALL_CONFIGS)
    monkeypatch.setattr(P, "TMA_CONFIGS", SMALL_TMA_CONFIGS)
    P.reset()
    request.addfinalizer(P.reset)  # the TMA kernel back on for the tests after this one
    calls = []
    real_tma, real_gemm = P.silu_gemm_tma, P.silu_gemm
    monkeypatch.setattr(P, "silu_gemm_tma", lambda *a, **kw: calls.append("tma") or real_tma(*a))
    monkeypatch.setattr(P, "silu_gemm", lambda *a, **kw: calls.append("gemm") or real_gemm(*a))
    h, w = _inputs(33, 32, 32, torch.float16)
    ref32, ref_lowp = _refs(h, w)
    choice = SMALL_TMA_CONFIGS[0]
    assert P._candidates(h, w) == [*SMALL_CONFIGS, *SMALL_TMA_CONFIGS]
    assert_hstu_close(P.project_silu(h, w, choice=choice), ref32, ref_lowp, eps=1e-5)
    assert calls == ["tma"]

    shifted = torch.empty(33 * 32 + 1, dtype=torch.float16)[1:].view(33, 32).copy_(h)
    assert P._candidates(shifted, w) == list(SMALL_CONFIGS)
    assert_hstu_close(P.project_silu(shifted, w, choice=choice), ref32, ref_lowp, eps=1e-5)
    assert calls[1:] == ["gemm"]  # the default pointer config

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(P, "silu_gemm_tma", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):  # not a reason to switch TMA off
        P.project_silu(h, w, choice=choice)
    assert not P._TMA_BROKEN and calls[2:] == []

    def broken(*args, **kwargs):
        from triton.runtime.errors import OutOfResources

        raise OutOfResources(300_000, 232_448, "shared memory")  # does not fit this card

    monkeypatch.setattr(P, "silu_gemm_tma", broken)
    with pytest.warns(RuntimeWarning, match="TMA kernel disabled"):
        got = P.project_silu(h, w, choice=choice)
    assert_hstu_close(got, ref32, ref_lowp, eps=1e-5)
    assert calls[2:] == ["gemm"] and P._TMA_BROKEN and not P._BROKEN
    assert P.tma_unsupported(h, w).startswith("switched off earlier")
    assert P._candidates(h, w) == list(SMALL_CONFIGS)


def test_silu_gemm_rejects_a_config_that_straddles_slots():
    h, w = _inputs(4, 32, 48, torch.float32)
    with pytest.raises(ValueError, match="BLOCK_N does not divide inner=48"):
        P.silu_gemm(h, w, SMALL_CONFIGS[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_silu_split_interpreter(dtype, monkeypatch):
    """The unfused path's pass: strided input (a view of a wider product), odd rows and a
    width that is not a power of two."""
    _use_interpreter(monkeypatch)
    rows, inner = 7, 40
    wide = torch.randn(rows, 4 * inner + 8, generator=torch.Generator().manual_seed(1))
    uvqk = wide.to(dtype)[:, 3 : 3 + 4 * inner]
    out = poisoned_like(torch.empty(4, rows, inner, dtype=dtype))
    got = P.silu_split(uvqk, inner, out=out)
    ref32 = F.silu(uvqk.float()).view(rows, 4, inner).transpose(0, 1)
    ref_lowp = F.silu(uvqk).view(rows, 4, inner).transpose(0, 1)
    assert_hstu_close(got, ref32, ref_lowp, eps=1e-5)


def test_project_silu_cpu_path(knobs, tmp_path):
    knobs(tuning_cache=tmp_path)  # GPU tests earlier in the run fill the cache
    h, w = _inputs(9, 24, 32, torch.float32)
    got = P.project_silu(h, w)
    assert got.shape == (4, 9, 32) and got.is_contiguous()
    want = F.silu(h @ w)
    for slot in range(4):
        torch.testing.assert_close(got[slot], want[:, slot * 32 : (slot + 1) * 32])
    assert P.project_silu(h[:0], w).shape == (4, 0, 32)
    assert not P.CHOICES.items()  # nothing timed or cached without CUDA
    with pytest.raises(ValueError, match="4 \\* inner"):
        P.project_silu(h, w[:, :30])
    with pytest.raises(ValueError, match="expected \\[T, K\\]"):
        P.project_silu(h[:, :20], w)
    with pytest.raises(TypeError, match="one dtype"):
        P.project_silu(h.double(), w)


def test_default_choice():
    assert P.default_choice(1024) == P.CONFIGS[0]
    assert P.default_choice(192) == P.GemmConfig(64, 64, 64, 8, 4, 4)
    assert P.default_choice(96) == P.UNFUSED
    assert all(c.block_m % 64 == 0 and c.num_warps in (4, 8) for c in P.CONFIGS)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_project_silu_chooser_interpreter(dtype, monkeypatch):
    """With Triton on: fp16 takes the default config (no timing off CUDA), fp32 the unfused
    path (cuBLAS keeps fp32 exact); a forced choice is obeyed."""
    _use_interpreter(monkeypatch)
    monkeypatch.setattr(P, "CONFIGS", SMALL_CONFIGS)
    calls = []
    real_gemm, real_split = P.silu_gemm, P.silu_split
    monkeypatch.setattr(
        P, "silu_gemm", lambda *a, **kw: calls.append("gemm") or real_gemm(*a, **kw)
    )
    monkeypatch.setattr(
        P, "silu_split", lambda *a, **kw: calls.append("split") or real_split(*a, **kw)
    )
    h, w = _inputs(33, 32, 32, dtype)
    ref32, ref_lowp = _refs(h, w)
    assert_hstu_close(P.project_silu(h, w), ref32, ref_lowp, eps=1e-5)
    assert calls == (["gemm"] if dtype == torch.float16 else ["split"])
    assert_hstu_close(P.project_silu(h, w, choice=P.UNFUSED), ref32, ref_lowp, eps=1e-5)
    assert_hstu_close(P.project_silu(h, w, choice=SMALL_CONFIGS[1]), ref32, ref_lowp, eps=1e-5)
    assert calls[-2:] == ["split", "gemm"]
    assert not P._BROKEN and not P.CHOICES.items()


# --- the layer and the block ---------------------------------------------------------------


def _block(num_layers=3, dtype=torch.float32, device="cpu", heads=2, head_dim=16, **kw):
    return HSTUBlock(num_layers, 24, heads, head_dim, scaling_seqlen=64, dtype=dtype,
                     device=device, seed=5, **kw)  # fmt: skip


def test_block_with_fused_projection_equals_torch_ops_cpu(monkeypatch, request):
    """The block on the Triton backend, fused projection included (interpreter; K=24 is not
    a multiple of BLOCK_K), computes what the reference's torch ops do, uncached and cached."""
    block = _block(heads=1, head_dim=64)
    meta = build_jagged_metadata([9, 20], [3, 0], "cpu")
    x = torch.randn(meta.num_tokens, block.hidden, generator=torch.Generator().manual_seed(2))
    want = block.forward_uncached(x, meta, return_all=True)
    cache = block.make_cache(num_pages=4, page_size=16)
    want_cached = block.forward_cached(x[:9], cache.prepare([1], [0], [9], [0]), cache)

    _use_interpreter(monkeypatch)
    monkeypatch.setattr(P, "CONFIGS", SMALL_CONFIGS)
    stack = contextlib.ExitStack()
    request.addfinalizer(stack.close)
    stack.enter_context(P.CHOICES.pin(SMALL_CONFIGS[0]))  # fp32 through the kernel too
    calls = []
    real = P.silu_gemm
    monkeypatch.setattr(P, "silu_gemm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    block = _block(heads=1, head_dim=64, backend="triton")
    got = block.forward_uncached(x, meta, return_all=True)
    assert len(calls) == block.num_layers
    for g, w in zip(got, want, strict=True):
        assert_hstu_close(g, w, w, eps=1e-5)
    cache = block.make_cache(num_pages=4, page_size=16)
    got_cached = block.forward_cached(x[:9], cache.prepare([1], [0], [9], [0]), cache)
    assert_hstu_close(got_cached, want_cached, want_cached, eps=1e-5)


def test_finish_in_place_equals_out_of_place():
    layer = _block(1).layers[0]
    gen = torch.Generator().manual_seed(3)
    x, attn = torch.randn(11, 24, generator=gen), torch.randn(11, 2, 16, generator=gen)
    u = F.silu(torch.randn(11, 32, generator=gen))
    x0 = x.clone()
    want = layer.finish(x, attn, u)
    assert torch.equal(x, x0)  # out of place: x untouched
    got = layer.finish(x, attn, u, inplace=True)
    assert got.data_ptr() == x.data_ptr()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_block_spares_callers_x_and_return_all_outputs():
    """Later layers accumulate in place, but never into the caller's ``x``, and not when
    every layer's output is returned (they would overwrite each other)."""
    block = _block()
    meta = build_jagged_metadata([13, 4], [2, 1], "cpu")
    x = torch.randn(meta.num_tokens, block.hidden, generator=torch.Generator().manual_seed(4))
    x0 = x.clone()
    every = block.forward_uncached(x, meta, return_all=True)
    last = block.forward_uncached(x, meta)
    assert torch.equal(x, x0)
    assert len({o.data_ptr() for o in every}) == block.num_layers
    torch.testing.assert_close(last, every[-1], rtol=0, atol=0)
    # the outputs are each layer's own: layer l+1 recomputed from layer l's output
    one = block.layers[1].forward_uncached(every[0], meta, scaling_seqlen=64, backend="auto")
    torch.testing.assert_close(one, every[1], rtol=0, atol=0)

    cache = block.make_cache(num_pages=4, page_size=16)
    xc = x[:13].clone()
    got = block.forward_cached(xc, cache.prepare([1], [0], [13], [0]), cache)
    assert torch.equal(xc, x0[:13])
    cache = block.make_cache(num_pages=4, page_size=16)
    every_c = block.forward_cached(xc, cache.prepare([1], [0], [13], [0]), cache, return_all=True)
    torch.testing.assert_close(got, every_c[-1], rtol=0, atol=0)


# --- GPU ---------------------------------------------------------------------------------

GPU_TOKENS = [1, 384, 3072, 4352 + 37]


@pytest.mark.gpu
@pytest.mark.parametrize("config", P.CONFIGS, ids=str)
@pytest.mark.parametrize("tokens", GPU_TOKENS)
def test_silu_gemm_gpu(tokens, config):
    """Every config in bf16 against the fp32 yardstick, DESIGN.md §5 style: the allowance is
    twice the unfused bf16 path's error (it rounds the GEMM, then the SiLU; the fused kernel
    rounds once, so it should sit well inside); eps 1e-4 of the output's scale covers a case
    where that path happened to be exact."""
    for k, inner in [(1024, 1024), (200, 256)]:  # K=200: the masked K loop
        if not config.fits(inner):
            continue
        h, w = _inputs(tokens, k, inner, torch.bfloat16, "cuda", seed=tokens)
        out = poisoned_like(torch.empty(4, tokens, inner, dtype=torch.bfloat16, device="cuda"))
        got = P.silu_gemm(h, w, config, out=out)
        ref32, ref_lowp = _refs(h, w)
        assert_hstu_close(got, ref32, ref_lowp, eps=1e-4)


TMA_TOKENS = [1, 127, 384, 3072, 4352, 4352 + 37]


@pytest.mark.gpu
@pytest.mark.parametrize("config", P.TMA_CONFIGS, ids=str)
@pytest.mark.parametrize("tokens", TMA_TOKENS)
def test_silu_gemm_tma_gpu(tokens, config):
    """Every TMA config in bf16, as test_silu_gemm_gpu: T=1 and 127 (fewer tiles than SMs,
    a partial row tile), 4352 (34 full row tiles, several per program) and 4389 (a partial
    last row tile, whose rows past T the 3-d store must clip, not spill into the next slot);
    K=200 ends in a partial K tile that TMA zero-fills."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability 9.0 or later")
    for k, inner in [(1024, 1024), (200, 256)]:
        if not config.fits(inner):
            continue
        h, w = _inputs(tokens, k, inner, torch.bfloat16, "cuda", seed=tokens)
        assert P.tma_unsupported(h, w) is None
        out = poisoned_like(torch.empty(4, tokens, inner, dtype=torch.bfloat16, device="cuda"))
        got = P.silu_gemm_tma(h, w, config, out=out)
        ref32, ref_lowp = _refs(h, w)
        assert_hstu_close(got, ref32, ref_lowp, eps=1e-4)


@pytest.mark.gpu
def test_project_silu_tma_fallback_and_graph_gpu(monkeypatch, knobs, tmp_path):
    """A TMA choice on a misaligned ``h`` (a view 2 bytes into its buffer) runs the pointer
    kernel instead; on aligned tensors it runs inside a CUDA graph capture (the host-side
    descriptors travel by value in the kernel's parameters)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability 9.0 or later")
    knobs(tuning_cache=tmp_path)  # no choices from earlier tests or processes
    choice = P.TMA_CONFIGS[0]
    h, w = _inputs(700, 1024, 1024, torch.bfloat16, "cuda")
    shifted = torch.empty(700 * 1024 + 1, dtype=h.dtype, device="cuda")[1:].view(700, 1024)
    shifted.copy_(h)
    assert "h: base pointer" in P.tma_unsupported(shifted, w)
    ref32, ref_lowp = _refs(h, w)
    assert_hstu_close(P.project_silu(shifted, w, choice=choice), ref32, ref_lowp, eps=1e-4)

    P.project_silu(h, w, choice=choice)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = P.project_silu(h, w, choice=choice)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert_hstu_close(out, ref32, ref_lowp, eps=1e-4)
    assert not P._TMA_BROKEN and not P._BROKEN


@pytest.mark.gpu
def test_project_silu_chooser_gpu(knobs, tmp_path):
    knobs(tuning_cache=tmp_path)  # no choices from earlier tests or processes
    h, w = _inputs(3000, 1024, 1024, torch.bfloat16, "cuda")
    ref32, ref_lowp = _refs(h, w)
    assert_hstu_close(P.project_silu(h, w), ref32, ref_lowp, eps=1e-4)
    assert list(P.CHOICES.items()) == [(4096, 1024, 4096, "torch.bfloat16")]
    choice = next(iter(P.CHOICES.items().values()))
    assert choice == P.UNFUSED or choice in P.CONFIGS + P.TMA_CONFIGS
    print("project_silu picks", choice)
    if torch.cuda.get_device_capability()[0] >= 9:  # the TMA kernel is among the candidates
        assert set(P.TMA_CONFIGS) <= set(P._candidates(h, w))
    assert_hstu_close(P.project_silu(h[:2100], w), *_refs(h[:2100], w), eps=1e-4)
    assert len(P.CHOICES.items()) == 1  # same bucket: timed once
    # kept on disk: a later process reads the choice back instead of timing
    P.CHOICES.clear()
    assert P.CHOICES.get(h.device, (4096, 1024, 4096, "torch.bfloat16")) == choice

    # unfused path alone
    assert_hstu_close(P.unfused_project_silu(h, w), ref32, ref_lowp, eps=1e-4)

    # no timing with the switch off
    with hk_settings.override(projection_autotune=False):
        P.project_silu(h[:100], w)
    assert P.CHOICES.get(h.device, (128, 1024, 4096, "torch.bfloat16")) == P.default_choice(1024)

    # no timing inside a graph capture: the default, not cached
    hs = h[:700].clone()
    P.silu_gemm(hs, w, P.default_choice(1024))  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = P.project_silu(hs, w)
    graph.replay()
    torch.cuda.synchronize()
    assert (1024, 1024, 4096, "torch.bfloat16") not in P.CHOICES.items()
    assert_hstu_close(out, *_refs(hs, w), eps=1e-4)


@pytest.mark.gpu
def test_block_in_place_gpu():
    """bf16 on the card: the in-place residual and the chosen projection give the
    return_all (out-of-place) outputs."""
    block = HSTUBlock(3, 256, 2, 128, scaling_seqlen=512, dtype=torch.bfloat16, device="cuda")
    meta = build_jagged_metadata([300, 33], [17, 0], "cuda")
    x = torch.randn(meta.num_tokens, 256, device="cuda", dtype=torch.bfloat16)
    x0 = x.clone()
    every = block.forward_uncached(x, meta, return_all=True)
    last = block.forward_uncached(x, meta)
    assert torch.equal(x, x0)
    torch.testing.assert_close(last, every[-1], rtol=0, atol=0)


def test_projection_choices_round_trip_through_the_tuning_cache(knobs, tmp_path):
    """Every kind of choice survives the disk (a later process skips the timing); a choice
    made after a failure stays in its process."""
    from hstu_kernels.tuning import reset_caches

    knobs(tuning_cache=tmp_path)
    cpu = torch.device("cpu")
    choices = [P.UNFUSED, "separate", P.CONFIGS[0], P.TMA_CONFIGS[-1]]
    for i, c in enumerate(choices):
        assert P.decode_choice(P.encode_choice(c)) == c
        P.CHOICES.put(cpu, (i, 1024, 4096, "torch.bfloat16"), c)
    P.CHOICES.put(cpu, (99, 1024, 4096, "torch.bfloat16"), P.UNFUSED, persist=False)
    reset_caches()  # memory gone: what comes back was read from disk
    for i, c in enumerate(choices):
        assert P.CHOICES.get(cpu, (i, 1024, 4096, "torch.bfloat16")) == c
    assert P.CHOICES.get(cpu, (99, 1024, 4096, "torch.bfloat16")) is None
    with pytest.raises(ValueError):
        P.decode_choice({"name": "fastest"})


def test_a_pinned_choice_resolves_untuned_keys_and_leaves_nothing_behind(knobs, tmp_path):
    """``CHOICES.pin(c)``: keys not tuned yet resolve to ``c`` (visible in ``items()``), a
    tuned key keeps its value, nothing is written to disk, and afterwards only the tuned key
    is known."""
    from hstu_kernels.tuning import reset_caches

    knobs(tuning_cache=tmp_path)
    cpu = torch.device("cpu")
    tuned, untuned = (1, 1024, 4096, "torch.bfloat16"), (2, 1024, 4096, "torch.bfloat16")
    P.CHOICES.put(cpu, tuned, P.UNFUSED)
    with P.CHOICES.pin(P.CONFIGS[0]):
        assert P.CHOICES.get(cpu, untuned) == P.CONFIGS[0]
        assert P.CHOICES.get(cpu, tuned) == P.UNFUSED
        assert P.CHOICES.items() == {tuned: P.UNFUSED, untuned: P.CONFIGS[0]}
        P.CHOICES.put(cpu, tuned, P.UNFUSED)  # a write inside the block persists only the tuned
    assert P.CHOICES.items() == {tuned: P.UNFUSED}
    assert P.CHOICES.get(cpu, untuned) is None
    reset_caches()  # from disk: only the tuned key
    assert P.CHOICES.get(cpu, untuned) is None and P.CHOICES.get(cpu, tuned) == P.UNFUSED
