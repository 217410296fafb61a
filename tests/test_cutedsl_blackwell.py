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

import hstu_kernels as hk
from hstu_kernels.dispatch import BackendError, explain
from hstu_kernels.testing import PagedCase, assert_hstu_close, make_paged_case, poisoned_like

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
        "page_slot",
        "tile_is_full",
        "mask_tile_",
        "silu_scale_",
    ):
        assert f"hc.{name}(" in src, f"blackwell.py does not call hstu_common.{name}"
    assert "def keep(" not in src and "exp2" not in src, "a private mask/SiLU copy"


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


@st.composite
def batches(draw, max_history: int = 700, max_targets: int = 300, max_batch: int = 4):
    """(histories, new, targets): odd lengths around the 128-token page/tile edges, one-token
    histories and zero targets included."""
    b = draw(st.integers(1, max_batch))
    edge = st.sampled_from([1, 127, 128, 129, 255, 256, 257, 383, 384])
    histories = draw(st.lists(st.one_of(edge, st.integers(1, max_history)), min_size=b, max_size=b))
    new = [draw(st.one_of(st.just(h), st.integers(1, h))) for h in histories]
    targets = draw(st.lists(st.integers(0, max_targets), min_size=b, max_size=b))
    return histories, new, targets


def _case(shape, heads: int, head_dim: int, seed: int) -> PagedCase:
    histories, new, targets = shape
    return make_paged_case(
        histories, new, targets, page_size=PAGE, heads=heads, head_dim=head_dim,
        dtype=torch.float32, device="cuda", seed=seed,
    )  # fmt: skip


def check_paged(case: PagedCase, dtype: torch.dtype) -> None:
    ref32 = case.reference_full(torch.float32)[case.rows]
    ref_lowp = case.reference_full(dtype)[case.rows]
    q, k_new, v_new, kv = (t.to(dtype) for t in (case.q, case.k_new, case.v_new, case.kv_cache))
    out = hk.paged_hstu_attention(
        q, k_new, v_new, kv, case.page_table, case.cu_q, num_targets=case.num_targets,
        scaling_seqlen=case.max_total, backend=BACKEND, out=poisoned_like(q),
    )  # fmt: skip
    assert_hstu_close(out, ref32, ref_lowp)


def check_jagged(case: PagedCase, dtype: torch.dtype) -> None:
    q, k, v = (t.to(dtype) for t in (case.q_full, case.k_full, case.v_full))
    out = hk.hstu_attention(
        q, k, v, case.cu_full, num_targets=case.num_targets, backend=BACKEND,
        out=poisoned_like(q),
    )  # fmt: skip
    assert_hstu_close(out, case.reference_full(torch.float32), case.reference_full(dtype))


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
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(47, 2, 128, device="cuda", generator=g) for _ in range(3))
    cu = torch.tensor([0, 4, 47], dtype=torch.int32, device="cuda")
    nt = torch.tensor([4, 3], dtype=torch.int32, device="cuda")
    lowp = [t.to(torch.bfloat16) for t in (q, k, v)]
    out = hk.hstu_attention(*lowp, cu, num_targets=nt, backend=BACKEND,
                            out=poisoned_like(lowp[0]))  # fmt: skip
    ref32 = hk.hstu_attention(q, k, v, cu, num_targets=nt, backend="reference")
    ref_lowp = hk.hstu_attention(*lowp, cu, num_targets=nt, backend="reference")
    assert_hstu_close(out, ref32, ref_lowp)


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
