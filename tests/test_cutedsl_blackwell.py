"""Tests of the "cutedsl-blackwell" backend (tcgen05 + TMA, sm_100a/sm_103a).

What runs where (no B200 was available to this project):

- COMPILED ONLY (CPU, in CI): every variant the dispatcher can select (bf16/fp16 x head dim
  64/128 x jagged/paged, sm_100a; one variant also for sm_103a) is compiled with fake tensors
  and its PTX is checked for the instructions meant: ``tcgen05.mma`` (kind::f16, both GEMMs of
  both query tiles), ``tcgen05.alloc``/``dealloc``, ``tcgen05.ld``/``st``/``commit``, TMA bulk
  tensor copies with mbarrier completion, no warp MMA, and (paged) the 16-byte shared-memory
  stores that zero a last page's tail; the cubin is disassembled when ``nvdisasm`` is at hand.
- RUN ON A GPU ELSEWHERE: the arch-neutral code the kernel calls (``hstu_common``: sequence
  metadata, tile walk, page slot, tile classification, mask, SiLU/scale) is the same code the
  warp-MMA kernel runs in ``tests/test_cutedsl_ampere.py`` on an H100;
  :func:`test_kernel_uses_the_shared_helpers` keeps it that way (no private copies).
- RUN ON ANY TMA GPU (sm_90+, i.e. the H100 GPU tests): ``test_tma_views_on_gpu`` pushes the
  kernel's own TMA views (``jagged_tma_view``/``jagged_window``, ``page_tma_view``) through real
  TMA copies (plain TMA, no tcgen05) and checks rows, zero fill past a sequence, a fully
  out-of-bounds box, and pages by id. Written without a GPU run by its author.
- RUN ONLY ON sm_100/sm_103 (skipped everywhere else, i.e. never run by this project): the
  parity tests against the reference, the CUDA-graph test and the benchmark entry. One command
  on a B200: ``HYPOTHESIS_PROFILE=gpu python -m pytest tests/test_cutedsl_blackwell.py -s``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import batches as shared_batches

import hstu_kernels as hk
from hstu_kernels.dispatch import BackendError, explain
from hstu_kernels.testing import (
    PagedCase,
    assert_hstu_close,
    check_all_target_jagged,
    check_jagged_backend,
    check_paged_backend,
    make_paged_case,
    poisoned_like,
)

BACKEND = "cutedsl-blackwell"
PAGE = 128

# Every variant the dispatcher can send to this backend (dtype, head dim, paged), for sm_100a,
# plus one for sm_103a (same source; a separate target).
VARIANTS = [
    ("sm_100a", dtype, d, paged)
    for dtype in (torch.bfloat16, torch.float16)
    for d in (64, 128)
    for paged in (False, True)
] + [("sm_103a", torch.bfloat16, 128, True)]


def _id(v) -> str:
    arch, dtype, d, paged = v
    return f"{arch}-{str(dtype).removeprefix('torch.')}-d{d}-{'paged' if paged else 'jagged'}"


# ---------------------------------------------------------------- dispatch (CPU, no DSL)


@pytest.mark.parametrize("arch", ["sm_100", "sm_103"])
def test_b200_row_of_the_dispatch_table(arch):
    for d in (64, 128):
        assert explain("paged", arch=arch, head_dim=d, page_size=PAGE).choice == BACKEND
        assert explain("jagged", arch=arch, head_dim=d).choice == BACKEND
    other = explain("paged", arch=arch, head_dim=256, page_size=PAGE)
    assert other.choice not in (None, BACKEND)
    assert other.reasons[BACKEND] == "head dim 256 not in [64, 128]"
    small_pages = explain("paged", arch=arch, head_dim=128, page_size=32)
    assert small_pages.choice not in (None, BACKEND)
    assert small_pages.reasons[BACKEND] == "page size 32 not in [128]"
    ctx = explain("paged", arch=arch, head_dim=128, page_size=PAGE, num_contexts=2)
    assert ctx.choice not in (None, BACKEND)
    assert "lacks mask features" in ctx.reasons[BACKEND]


def test_not_chosen_off_blackwell():
    for arch in ("sm_80", "sm_90", "sm_120"):
        exp = explain("paged", arch=arch, head_dim=128, page_size=PAGE)
        assert exp.choice != BACKEND
        assert exp.reasons[BACKEND].startswith(f"arch {arch} not in")


def test_forced_on_cpu_is_refused():
    case = make_paged_case([5], [5], [1], page_size=PAGE, heads=1, head_dim=64)
    q = case.q_full.to(torch.bfloat16)
    with pytest.raises(BackendError, match=BACKEND):
        hk.hstu_attention(q, q, q, case.cu_full, backend=BACKEND)


def test_registration_does_not_import_the_dsl():
    """Discovery imports the registration module on every machine; the kernel module (and
    with it ``cutlass``) must only be imported by a call."""
    code = (
        "import sys; from hstu_kernels.dispatch import registry; "
        "assert 'cutedsl-blackwell' in registry().backends; "
        "print('hstu_kernels.backends.cutedsl.blackwell' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_kernel_uses_the_shared_helpers():
    """The arch-neutral parts come from hstu_common (run on GPUs by the warp-MMA kernel's
    tests), not from private copies in blackwell.py."""
    src = (Path(hk.__file__).parent / "backends" / "cutedsl" / "blackwell.py").read_text()
    for name in (
        "schedule_tile",
        "sequence_info",
        "kv_tile_range",
        "tile_is_full",
        "mask_tile_",
        "silu_scale_",
    ):
        assert f"hc.{name}(" in src, f"blackwell.py does not call hstu_common.{name}"
    assert "def keep(" not in src and "exp2" not in src, "a private mask/SiLU copy"
    # the page of a key tile, and the jagged windows, come from tma_views (shared with hopper)
    assert "tma_views.history_tile_sources(" in src and "tma_views.history_windows(" in src


# ---------------------------------------------------------------- compile only (DSL, CPU)

_PTX: dict = {}


def _compile(variant):
    """PTX (and the cubin path) of one variant, compiled once per test session."""
    if variant not in _PTX:
        pytest.importorskip("cutlass.cute")
        from hstu_kernels.backends.cutedsl import blackwell
        from hstu_kernels.backends.cutedsl import compile as cc

        arch, dtype, d, paged = variant
        host_fn, _, fake_args = blackwell.build_variant(arch, dtype, d, paged)
        with tempfile.TemporaryDirectory(prefix="hstu_bw_") as tmp:
            compiled = cc.compile_kernel(
                host_fn, fake_args(), arch=arch, options=f"--keep-ptx --keep-cubin --dump-dir={tmp}"
            )
            ptx = _contents(compiled.__ptx__, text=True)
            cubin = _contents(compiled.__cubin__, text=False)
        _PTX[variant] = (ptx, cubin)
    return _PTX[variant]


def _contents(artifact, *, text: bool):
    """The DSL hands back either the artifact itself or the path it was dumped to."""
    if isinstance(artifact, str) and len(artifact) < 4096 and Path(artifact).is_file():
        return Path(artifact).read_text() if text else Path(artifact).read_bytes()
    return artifact


@pytest.fixture(scope="module", params=VARIANTS, ids=_id)
def compiled(request):
    return request.param, *_compile(request.param)


def test_ptx_targets_the_arch(compiled):
    (arch, *_), ptx, _ = compiled
    assert re.search(r"^\.target " + arch + r"\s*$", ptx, re.M), "compiled for another arch"


def test_ptx_uses_tcgen05_for_both_gemms_of_both_query_tiles(compiled):
    (_, _, d, _), ptx, _ = compiled
    mma = r"tcgen05\.mma\.cta_group::1\.kind::f16(?:\.[\w:]+)*\s+\[%r\d+\],\s*"
    smem_a = re.findall(mma + r"%rd\d+,", ptx)  # S_t = Q_t K^T: A (Q) from shared memory
    tmem_a = re.findall(mma + r"\[%r\d+\],", ptx)  # O_t += P_t V: A (P) from tensor memory
    # Two query tiles; S: d/16 k-steps, in the prologue and the loop; O: 128/16 k-steps, in
    # the loop and the tail.
    assert len(smem_a) == 2 * 2 * (d // 16), len(smem_a)
    assert len(tmem_a) == 2 * 2 * 8, len(tmem_a)
    assert "mma.sync" not in ptx and "wgmma" not in ptx


def test_ptx_silu_form_follows_the_dtype(compiled):
    """bf16: SiLU through tanh.approx (one MUFU op per score; error far below bf16 rounding);
    fp16: ex2 + rcp (tanh.approx's error is not below fp16 rounding)."""
    (_, dtype, _, _), ptx, _ = compiled
    assert ("tanh.approx.f32" in ptx) == (dtype == torch.bfloat16)
    assert "ex2.approx" in ptx and "rcp.approx" in ptx  # fp16 scores; the targets' self term


def test_ptx_allocates_and_frees_tensor_memory(compiled):
    _, ptx, _ = compiled
    assert re.search(r"tcgen05\.alloc\.cta_group::1\.sync\.aligned\.shared::cta\.b32", ptx)
    assert re.search(r"tcgen05\.dealloc\.cta_group::1\.sync\.aligned\.b32", ptx)
    assert "tcgen05.relinquish_alloc_permit" in ptx
    assert re.search(r"tcgen05\.ld\.sync\.aligned\.32x32b", ptx)  # S and O -> registers
    assert re.search(r"tcgen05\.st\.sync\.aligned\.32x32b", ptx)  # P -> tensor memory
    assert re.search(r"tcgen05\.commit\.cta_group::1\.mbarrier::arrive::one", ptx)


def test_ptx_loads_with_tma(compiled):
    (_, _, d, _), ptx, _ = compiled
    copies = re.findall(
        r"cp\.async\.bulk\.tensor\.4d\.shared::cta\.global\.tile\.mbarrier::complete_tx::bytes",
        ptx,
    )
    # 128-byte swizzle boxes of 64 columns: Q (2 tiles), K and V, d/64 boxes each.
    assert len(copies) == 4 * (d // 64), len(copies)
    assert "prefetch.tensormap" in ptx
    assert "mbarrier.arrive.expect_tx" in ptx
    assert "cp.async.ca" not in ptx and "cp.async.cg" not in ptx  # no per-thread copies


def test_ptx_zeroes_page_tails_only_when_paged(compiled):
    (_, _, _, paged), ptx, _ = compiled
    zero_stores = re.findall(r"st\.shared\.v4\.b32\s+\[[^\]]+\],\s*\{0, 0, 0, 0\}", ptx)
    assert bool(zero_stores) == paged
    assert ("fence.proxy.async.shared::cta" in ptx) == paged


def test_sass_has_the_instructions(compiled):
    """The cubin (ptxas output) holds the Blackwell instructions (needs ``nvdisasm``)."""
    _, _, cubin = compiled
    assert isinstance(cubin, bytes) and cubin[:4] == b"\x7fELF"
    tool = shutil.which("nvdisasm") or _triton_nvdisasm()
    if tool is None:
        pytest.skip("nvdisasm not found")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        run = subprocess.run([tool, f.name], capture_output=True, text=True)
    if run.returncode != 0:
        pytest.skip(f"nvdisasm cannot read this cubin: {run.stderr.strip()[:200]}")
    sass = run.stdout
    assert re.search(r"\bUTC\w*MMA\b", sass), "no tcgen05 MMA in SASS"
    assert re.search(r"\bUTMALDG\b", sass), "no TMA load in SASS"
    assert re.search(r"\bLDTM\b", sass) and re.search(r"\bSTTM\b", sass)


def _triton_nvdisasm() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    return str(path) if path.is_file() else None


# ---------------------------------------------------------------- GPU (sm_100/sm_103 only)


def _on_blackwell() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 10


blackwell_only = pytest.mark.skipif(
    not _on_blackwell(), reason="needs an sm_100/sm_103 GPU (B200/B300)"
)

GPU_VARIANTS = [(dtype, d) for dtype in (torch.bfloat16, torch.float16) for d in (64, 128)]


def batches(max_history: int = 700, max_targets: int = 300, max_batch: int = 4):
    """Around the 128-token page/tile edges, histories often all new."""
    edges = (1, 127, 128, 129, 255, 256, 257, 383, 384)
    return shared_batches(max_history, max_targets, max_batch, edges=edges, whole=True)


def _case(shape, heads: int, head_dim: int, seed: int) -> PagedCase:
    histories, new, targets = shape
    return make_paged_case(
        histories, new, targets, page_size=PAGE, heads=heads, head_dim=head_dim,
        dtype=torch.float32, device="cuda", seed=seed,
    )  # fmt: skip


def check_paged(case: PagedCase, dtype: torch.dtype) -> None:
    check_paged_backend(case, dtype, BACKEND)


def check_jagged(case: PagedCase, dtype: torch.dtype) -> None:
    check_jagged_backend(case, dtype, BACKEND)


@pytest.mark.gpu
@blackwell_only
@given(
    shape=batches(),
    variant=st.sampled_from(GPU_VARIANTS),
    heads=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_paged_parity(shape, variant, heads, seed):
    dtype, head_dim = variant
    check_paged(_case(shape, heads, head_dim, seed), dtype)


@pytest.mark.gpu
@blackwell_only
@given(
    shape=batches(),
    variant=st.sampled_from(GPU_VARIANTS),
    heads=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_jagged_parity(shape, variant, heads, seed):
    dtype, head_dim = variant
    check_jagged(_case(shape, heads, head_dim, seed), dtype)


@pytest.mark.gpu
@blackwell_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_edges(dtype, head_dim):
    """One-token history, zero targets, lengths on and one past the 128/256-row edges, a
    sequence whose second query tile is empty, and many pages."""
    shape = (
        [1, 128, 129, 256, 257, 1000, 3],
        [1, 128, 1, 200, 256, 129, 3],
        [0, 0, 127, 128, 1, 300, 0],
    )
    check_paged(_case(shape, 2, head_dim, 7), dtype)
    check_jagged(_case(shape, 2, head_dim, 7), dtype)


@pytest.mark.gpu
@blackwell_only
def test_all_target_jagged_sequence():
    """A jagged sequence with no history (every row a target): no key tiles at all."""
    check_all_target_jagged(BACKEND, 128)


@pytest.mark.gpu
@blackwell_only
def test_cuda_graph_capture_and_replay():
    dtype = torch.bfloat16
    shape = ([300, 77], [20, 77], [40, 5])
    case = _case(shape, 2, 128, 1)
    q, k_new, v_new, kv = (t.to(dtype) for t in (case.q, case.k_new, case.v_new, case.kv_cache))
    out = poisoned_like(q)
    max_q = max(n + t for n, t in zip(case.new, case.targets, strict=True))

    def call():
        hk.paged_hstu_attention(
            q, k_new, v_new, kv, case.page_table, case.cu_q, num_targets=case.num_targets,
            scaling_seqlen=case.max_total, max_seqlen_q=max_q, validate=False,
            backend=BACKEND, out=out,
        )  # fmt: skip

    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    other = _case(shape, 2, 128, 2)
    for dst, src in ((q, other.q), (k_new, other.k_new), (v_new, other.v_new),
                     (kv, other.kv_cache)):  # fmt: skip
        dst.copy_(src.to(dtype))
    case.page_table.page_ids.copy_(other.page_table.page_ids)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref32 = other.reference_full(torch.float32)[other.rows]
    assert_hstu_close(out, ref32, other.reference_full(dtype)[other.rows])


@pytest.mark.gpu
@blackwell_only
def test_bench_entry():
    """The benchmark entry (page size 128, the only one this kernel takes): every backend
    that serves the shape beside torch SDPA, written to ``bench/results/<card>-page128.json``
    in the DESIGN.md §7 format and printed (run with ``-s``)."""
    from bench import common, kernels

    cases = [
        kernels.Case("delta", 8, 8, 128, 4096, 256, 128, page_size=PAGE),
        kernels.Case("delta", 1, 8, 128, 4096, 256, 128, page_size=PAGE),
        kernels.Case("jagged", 8, 8, 128, 4096, 256, 4096, page_size=PAGE),
    ]
    dtype = torch.bfloat16
    ceilings = common.measure_ceilings()
    entries, lines = [], []
    for case in cases:
        pc = kernels._inputs(case, dtype, "cuda")
        names, _ = kernels._backends_for(case, dtype, "cuda")
        assert BACKEND in names
        for name in [n for n in names if n != "reference"]:
            fn = kernels._call(case, pc, name)
            fn()
            torch.cuda.synchronize()
            e = kernels._entry(case, name, kernels._bench(fn, False), case.flops(), ceilings, dtype)
            entries.append(e)
            lines.append(f"{case.name:<28} {name:<18} {kernels._fmt(e)}")
        fn, flops, note = kernels._sdpa_peer(case, dtype, "cuda")
        e = kernels._entry(case, "torch-sdpa-flash", kernels._bench(fn, False), flops, {}, dtype)
        entries.append(e)
        lines.append(f"{case.name:<28} {'torch-sdpa-flash':<18} {kernels._fmt(e, note)}")
    path = common.results_path(common.card_slug() + "-page128")
    common.write_results("kernel", entries, ceilings=ceilings, path=path)
    print(f"\n{common.card_name()}: {path}\n" + "\n".join(lines))
    assert json.loads(path.read_text())["results"]


# ---------------------------------------------------------------- TMA views on any TMA GPU
#
# The jagged-window and page views of blackwell.py are plain TMA (sm_90+), so they can run on
# an H100: a probe kernel TMA-copies 128-row tiles through them and writes them out. This
# turns "the views address the right rows, rows past a sequence read as zeros, a fully
# out-of-bounds box completes its transaction" from compiled-only into GPU-tested wherever
# the GPU tests run on sm_90+ (it does not cover the tcgen05 parts).


def _probe_host_fn(dtype_c, d: int, paged: bool, which: int, mn_major: bool):
    """The ``@cute.jit`` host function of the TMA-view probe for one view (closure constants:
    the compiled function takes only tensors and ints)."""
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.nvgpu import cpasync

    from hstu_kernels.backends.cutedsl import tma_views as tv

    # The DSL evaluates the (string, see `from __future__ import annotations`) annotations of
    # the functions below in this module's globals; the DSL is imported lazily, so add it.
    globals().update(cute=cute, cutlass=cutlass)

    def smem_layout():
        # row-major (row, d) tile without swizzle; mn_major: the same bytes seen as (d, row)
        if mn_major:
            return cute.make_layout((d, 128), stride=(1, d))
        return cute.make_layout((128, d), stride=(d, 1))

    @cute.kernel
    def kernel(atom, g_view, out, cu, page_ids, pad):
        t, head, b = cute.arch.block_idx()
        tidx, _, _ = cute.arch.thread_idx()
        layout = smem_layout()
        alloc = cutlass.memory.SmemAllocator()
        s = alloc.allocate_tensor(dtype_c, layout, byte_alignment=128)
        bar = alloc.allocate_array(cutlass.Int64, 1)
        if tidx == 0:
            cute.arch.mbarrier_init(bar, 1)
        cute.arch.mbarrier_init_fence()
        cute.arch.sync_threads()
        tile_shape = cute.select(layout.shape, mode=[0, 1])
        if cutlass.const_expr(paged):  # cu is the page_indptr here
            page = page_ids[cu[b] + t]
            g = cute.flat_divide(g_view, tile_shape)[None, None, 0, 0, (head, page)]
        else:
            start = cu[b]
            window = tv.jagged_window(g_view, pad, start, cu[b + 1] - start, mn_major=mn_major)
            g = cute.flat_divide(window, tile_shape)
            if cutlass.const_expr(mn_major):
                g = g[None, None, 0, t, (head, 0)]
            else:
                g = g[None, None, t, 0, (head, 0)]
        ts, tg = cpasync.tma_partition(
            atom, 0, cute.make_layout(1), cute.group_modes(s, 0, 2), cute.group_modes(g, 0, 2)
        )
        if tidx // 32 == 0:  # one whole warp: the copy elects its issuing lane itself
            with cute.arch.elect_one():
                cute.arch.mbarrier_arrive_and_expect_tx(bar, 128 * d * dtype_c.width // 8)
            cute.copy(atom, tg, ts, tma_bar_ptr=bar)
        # bounded wait: a transaction that never completes must fail the test, not hang it
        done = cute.arch.mbarrier_try_wait(bar, 0)
        for _ in cutlass.range(20000, unroll=1):
            if not done:
                done = cute.arch.mbarrier_try_wait(bar, 0)
        for c in cutlass.range(d, unroll=1):
            if done:
                if cutlass.const_expr(mn_major):
                    out[b, head, t * 128 + tidx, c] = s[c, tidx]
                else:
                    out[b, head, t * 128 + tidx, c] = s[tidx, c]
            else:
                out[b, head, t * 128 + tidx, c] = dtype_c(7.0)  # marks a lost transaction

    if paged:

        @cute.jit
        def host(kv: cute.Tensor, out: cute.Tensor, page_indptr: cute.Tensor,
                 page_ids: cute.Tensor, tiles: cutlass.Int32, stream):  # fmt: skip
            view = tv.page_tma_view(kv, which, mn_major=mn_major)
            layout = smem_layout()
            atom, g_view = cpasync.make_tiled_tma_atom(
                cpasync.CopyBulkTensorTileG2SOp(), view, layout, layout.shape
            )
            kernel(atom, g_view, out, page_indptr, page_ids, tiles).launch(
                grid=(tiles, kv.shape[3], page_indptr.shape[0] - 1), block=(128, 1, 1),
                stream=stream,
            )  # fmt: skip

        return host

    @cute.jit
    def host(x: cute.Tensor, out: cute.Tensor, cu: cute.Tensor, pad: cutlass.Int32,
             tiles: cutlass.Int32, stream):  # fmt: skip
        view = tv.jagged_tma_view(x, pad, mn_major=mn_major)
        layout = smem_layout()
        atom, g_view = cpasync.make_tiled_tma_atom(
            cpasync.CopyBulkTensorTileG2SOp(), view, layout, layout.shape
        )
        kernel(atom, g_view, out, cu, cu, pad).launch(
            grid=(tiles, x.shape[1], cu.shape[0] - 1), block=(128, 1, 1), stream=stream
        )

    return host


def _probe_fake_args(dtype_c, d: int, paged: bool):
    import cutlass

    from hstu_kernels.backends.cutedsl import compile as cc

    i32 = cutlass.Int32
    out = cc.fake_tensor(dtype_c, (None, None, None, d))
    if paged:
        kv = cc.fake_tensor(dtype_c, (None, 2, 128, None, d))
        meta = [cc.fake_tensor(i32, (None,), align=4) for _ in range(2)]
        return (kv, out, *meta, i32(1), cc.env_stream())
    x = cc.fake_tensor(dtype_c, (None, None, d))
    cu = cc.fake_tensor(i32, (None,), align=4)
    return (x, out, cu, i32(1), i32(1), cc.env_stream())


_PROBES = [(False, 0, False), (False, 0, True), (True, 0, False), (True, 1, True)]


@pytest.mark.parametrize("paged,which,mn_major", _PROBES)
def test_tma_view_probe_compiles_for_hopper(paged, which, mn_major):
    """The probe below builds for sm_90a (so it can run on the H100 GPU tests)."""
    pytest.importorskip("cutlass.cute")
    import cutlass

    from hstu_kernels.backends.cutedsl import compile as cc

    host = _probe_host_fn(cutlass.BFloat16, 128, paged, which, mn_major)
    ptx = cc.ptx_of(host, _probe_fake_args(cutlass.BFloat16, 128, paged), arch="sm_90a")
    ptx = ptx if "\n" in ptx else Path(ptx).read_text()
    assert "cp.async.bulk.tensor" in ptx


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9),
    reason="needs a TMA GPU (sm_90+)",
)
@pytest.mark.parametrize("paged,which,mn_major", _PROBES)
def test_tma_views_on_gpu(paged, which, mn_major):
    """Through real TMA: jagged windows give each sequence's rows then zeros (also for a
    tile entirely past the sequence), page views give whole pages by page id."""
    import cutlass

    from hstu_kernels.backends.cutedsl import compile as cc
    from hstu_kernels.dispatch import device_arch

    d, heads = 128, 2
    host = _probe_host_fn(cutlass.BFloat16, d, paged, which, mn_major)
    case = make_paged_case([300, 1, 128], [1, 1, 1], [0, 5, 0], page_size=PAGE, heads=heads,
                           head_dim=d, dtype=torch.bfloat16, device="cuda", seed=5)  # fmt: skip
    arch = device_arch(torch.device("cuda"))
    if paged:
        tiles = max(-(-h // PAGE) for h in case.histories)
        out = torch.full((3, heads, tiles * 128, d), float("nan"), dtype=torch.bfloat16,
                         device="cuda")  # fmt: skip
        pt = case.page_table
        # every sequence gets `tiles` page ids (padding with its last page) for the probe
        ids, indptr = [], [0]
        for b in range(3):
            own = pt.page_ids[pt.page_indptr[b] : pt.page_indptr[b + 1]].tolist()
            ids += own + [own[-1]] * (tiles - len(own))
            indptr.append(len(ids))
        ids_t = torch.tensor(ids, dtype=torch.int32, device="cuda")
        indptr_t = torch.tensor(indptr, dtype=torch.int32, device="cuda")
        fn = cc.compile_kernel(host, _probe_fake_args(cutlass.BFloat16, d, True), arch=arch)
        fn(case.kv_cache, out, indptr_t, ids_t, tiles)
        torch.cuda.synchronize()
        expect = case.kv_cache[ids_t.long(), which]  # [B * tiles, 128, heads, d]
        expect = expect.view(3, tiles * 128, heads, d).permute(0, 2, 1, 3)
        torch.testing.assert_close(out, expect, rtol=0, atol=0, equal_nan=True)
    else:
        x, cu = case.k_full, case.cu_full
        lengths = (cu[1:] - cu[:-1]).tolist()
        pad = max(lengths)
        tiles = -(-pad // 128) + 1  # one tile past the longest sequence: fully out of bounds
        out = torch.full((3, heads, tiles * 128, d), float("nan"), dtype=torch.bfloat16,
                         device="cuda")  # fmt: skip
        fn = cc.compile_kernel(host, _probe_fake_args(cutlass.BFloat16, d, False), arch=arch)
        fn(x, out, cu, pad, tiles)
        torch.cuda.synchronize()
        expect = torch.zeros_like(out)
        for b, (s, n) in enumerate(zip(cu[:-1].tolist(), lengths, strict=True)):
            expect[b, :, :n] = x[s : s + n].permute(1, 0, 2)
        torch.testing.assert_close(out, expect, rtol=0, atol=0)
