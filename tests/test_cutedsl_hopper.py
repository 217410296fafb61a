"""Tests of the "cutedsl-hopper" backend (wgmma + TMA, warp-specialised, sm_90a).

What runs where:

- COMPILED ONLY (CPU, in CI): bf16 at head dims 64/128/256 and fp16 at 256, jagged and paged,
  compiled for sm_90a with fake tensors; the PTX is checked for the instructions meant (wgmma
  of both GEMMs with the shapes of the tiles, the overlap's ``wait_group 1``, the turn-taking
  barriers, ``setmaxnreg`` moving registers from the producer to the consumers, TMA with
  mbarrier completion, the split-KV ticket's fences and atomic, no warp MMA or tcgen05, the
  SiLU form of the dtype, and for the paged op the named barrier of the page-tail zeroing).
- RUN ON AN H100/H200 ONLY (skipped elsewhere): parity against the reference (hypothesis, odd
  lengths around the 32- and 64-key tiles and 128-row query tiles, one-token histories, zero
  targets, outputs poisoned), forced key-range splits, an all-target sequence and CUDA-graph
  replay. All passed on H100s (docs/hopper.md).
"""

from __future__ import annotations

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
from strategies import masks

import hstu_kernels as hk
from hstu_kernels import settings as hk_settings
from hstu_kernels.dispatch import explain
from hstu_kernels.testing import (
    PagedCase,
    assert_hstu_close,
    check_all_target_jagged,
    check_jagged_backend,
    check_paged_backend,
    make_paged_case,
    poisoned_like,
)

BACKEND = "cutedsl-hopper"
PAGE = 32
JAGGED_TILE = 64
# (dtype, head dim, paged, windowed: with contexts/window)
VARIANTS = [(torch.bfloat16, d, paged, False) for d in (64, 128, 256) for paged in (False, True)]
VARIANTS += [(torch.float16, 256, paged, False) for paged in (False, True)]
VARIANTS += [(torch.bfloat16, 256, paged, True) for paged in (False, True)]
VARIANTS += [(torch.float16, 64, False, True)]


def _id(v) -> str:
    dtype, d, paged, windowed = v
    kind = "paged" if paged else "jagged"
    return f"{str(dtype).removeprefix('torch.')}-d{d}-{kind}{'-windowed' if windowed else ''}"


# ---------------------------------------------------------------- dispatch (CPU, no DSL)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_chosen_on_sm90_only(head_dim):
    """Run and measured on H100s: the sm_90 default (for the grids it does not decline, see
    tests/test_dispatch.py); on other archs never."""
    for op, kw in (("paged", {"page_size": PAGE}), ("jagged", {})):
        assert explain(op, arch="sm_90", head_dim=head_dim, **kw).choice == BACKEND
        other = explain(op, arch="sm_89", head_dim=head_dim, **kw)
        assert other.reasons[BACKEND].startswith("arch sm_89 not in")


def test_what_it_declares():
    forced = explain("paged", arch="sm_90", head_dim=256, page_size=PAGE, backend=BACKEND)
    assert forced.reasons[BACKEND].startswith("forced")
    other_pages = explain("paged", arch="sm_90", head_dim=256, page_size=16)
    assert other_pages.reasons[BACKEND] == "page size 16 not in [32]"
    assert (
        explain("jagged", arch="sm_89", head_dim=128)
        .reasons[BACKEND]
        .startswith("arch sm_89 not in")
    )


def test_serves_contexts_and_window():
    """Both features: auto sends such calls here on sm_90 (not to triton or the reference)."""
    for op, kw in (("paged", {"page_size": PAGE}), ("jagged", {})):
        for mask in (
            {"num_contexts": 4},
            {"max_attn_len": 100},
            {"num_contexts": 1, "max_attn_len": 7},
        ):
            assert explain(op, arch="sm_90", head_dim=256, **kw, **mask).choice == BACKEND


def test_registration_does_not_import_the_dsl():
    code = (
        "import sys; from hstu_kernels.dispatch import registry; "
        f"assert {BACKEND!r} in registry().backends; "
        "print('hstu_kernels.backends.cutedsl.hopper' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_kernel_uses_the_shared_helpers():
    """The arch-neutral parts come from hstu_common (run on GPUs by the warp-MMA kernel's
    tests) and the TMA views from tma_views (run through real TMA copies on an H100)."""
    src = (Path(hk.__file__).parent / "backends" / "cutedsl" / "hopper.py").read_text()
    for name in ("lpt_tile", "sequence_info", "kv_tile_range", "tile_is_full",
                 "mask_tile_", "silu_scale_"):  # fmt: skip
        assert f"hc.{name}(" in src, f"hopper.py does not call hstu_common.{name}"
    for name in ("jagged_tma_view", "jagged_window", "page_tma_view"):
        assert f"def {name}(" not in src
    assert "tma_views.history_tile_sources(" in src and "tma_views.history_windows(" in src
    assert "def keep(" not in src and "exp2" not in src, "a private mask/SiLU copy"


# ---------------------------------------------------------------- compile only (DSL, CPU)

_PTX: dict = {}


def _ptx(variant) -> str:
    if variant not in _PTX:
        pytest.importorskip("cutlass.cute")
        from hstu_kernels.backends.cutedsl import compile as cc
        from hstu_kernels.backends.cutedsl import hopper

        dtype, d, paged, windowed = variant
        host_fn, _, fake_args = hopper.build_variant("sm_90a", dtype, d, paged, windowed)
        _PTX[variant] = cc.ptx_of(host_fn, fake_args(), arch="sm_90a")
    return _PTX[variant]


@pytest.fixture(scope="module", params=VARIANTS, ids=_id)
def compiled(request):
    return request.param, _ptx(request.param)


def test_ptx_targets_sm90a(compiled):
    _, ptx = compiled
    assert re.search(r"^\.target sm_90a\s*$", ptx, re.M)


def test_ptx_uses_wgmma_for_both_gemms(compiled):
    (dtype, d, paged, _), ptx = compiled
    kind = "bf16.bf16" if dtype == torch.bfloat16 else "f16.f16"
    tile = PAGE if paged else JAGGED_TILE  # keys per tile: a page, or 64 (jagged)
    qk = re.findall(rf"wgmma\.mma_async\.sync\.aligned\.m64n{tile}k16\.f32\.{kind}", ptx)
    pv = re.findall(rf"wgmma\.mma_async\.sync\.aligned\.m64n{d}k16\.f32\.{kind}", ptx)
    # The key loop's first S and last P V are peeled off (S_{i+1} is issued with P_i V_i), so
    # each GEMM appears twice: one k-step per 16 of the head dim (S), per 16 keys (P V).
    if d == tile:  # D = 64 jagged: both GEMMs are m64n64
        assert len(qk) == 2 * (d // 16) + 2 * (tile // 16), len(qk)
    else:
        assert len(qk) == 2 * (d // 16), len(qk)
        assert len(pv) == 2 * (tile // 16), len(pv)
    # The loop waits for S_i only (one group, P_{i-1} V_{i-1}, still in flight).
    assert re.search(r"wgmma\.wait_group\.sync\.aligned\s+1;", ptx)
    assert "wgmma.wait_group.sync.aligned" in ptx
    assert "mma.sync" not in ptx and "tcgen05" not in ptx


def test_ptx_moves_registers_to_the_consumers(compiled):
    _, ptx = compiled
    assert re.search(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+24;", ptx)
    assert re.search(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+240;", ptx)


def test_ptx_loads_through_tma(compiled):
    _, ptx = compiled
    assert re.search(r"cp\.async\.bulk\.tensor\.\dd\.shared::cta\.global\.tile\.mbarrier::complete_tx", ptx)  # fmt: skip
    assert "mbarrier.try_wait" in ptx


def test_ptx_silu_form_follows_the_dtype(compiled):
    (dtype, _, _, _), ptx = compiled
    assert ("tanh.approx.f32" in ptx) == (dtype == torch.bfloat16)
    if dtype == torch.float16:
        assert "ex2.approx" in ptx


def test_ptx_paged_zeroes_the_page_tail(compiled):
    (_, _, paged, _), ptx = compiled
    # The consumers' named barrier after zeroing a last page's tail (barrier 1, 256 threads).
    assert bool(re.search(r"bar\.sync\s+1,\s*256;", ptx)) == paged
    assert ("fence.proxy.async.shared::cta" in ptx) or not paged


def test_ptx_pingpong_takes_turns(compiled):
    """The default: each GEMM issue (the first S, S_{i+1} with P_i V_i, the last P V) waits
    for this warpgroup's turn (a named barrier picked by the warpgroup index) and hands the
    turn over; warpgroup 1 starts by handing the first turn to warpgroup 0 (barrier 2), and
    warpgroup 0 hands its last to warpgroup 1 (barrier 3)."""
    _, ptx = compiled
    assert len(re.findall(r"bar\.sync\s+%r\d+,\s*256;", ptx)) == 3
    assert len(re.findall(r"bar\.arrive\s+%r\d+,\s*256;", ptx)) == 2
    assert re.search(r"bar\.arrive\s+2,\s*256;", ptx)  # the first turn
    assert re.search(r"bar\.arrive\s+3,\s*256;", ptx)  # warpgroup 0's last


def test_ptx_split_kv_ticket(compiled):
    """Split-KV: the partial stores are released (fence) before the ticket's atomic add, and
    the last split acquires (fence) before it reads the others' partials."""
    _, ptx = compiled
    fence = r"fence\.acq_rel\.gpu;"
    atom = r"atom\.global\.acq_rel\.add\.u32"
    assert re.search(fence + r"[\s\S]*" + atom + r"[\s\S]*" + fence, ptx)
    assert re.search(r"bar\.sync\s+4,\s*256;", ptx)
    assert "ld.global.nc" not in ptx  # the partials are read coherently


def test_ptx_without_pingpong(knobs):
    """HSTU_CUTEDSL_PINGPONG=0 (for A/B runs): the warpgroups run freely, no turn barriers."""
    pytest.importorskip("cutlass.cute")
    from hstu_kernels.backends.cutedsl import compile as cc
    from hstu_kernels.backends.cutedsl import hopper

    knobs(cutedsl_pingpong=False)
    host_fn, variant, fake_args = hopper.build_variant("sm_90a", torch.bfloat16, 256, True)
    assert not variant["pingpong"]
    ptx = cc.ptx_of(host_fn, fake_args(), arch="sm_90a")
    assert "bar.arrive" not in ptx and not re.search(r"bar\.sync\s+%r\d+", ptx)
    assert re.search(r"bar\.sync\s+1,\s*256;", ptx)  # the page-tail zeroing, as before


def _new_enough_ptxas() -> str | None:
    """A ptxas that reads this DSL's PTX (the triton wheel's, if recent enough)."""
    candidates = [shutil.which("ptxas")]
    try:
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"))
    except ImportError:
        pass
    return next((c for c in candidates if c and Path(c).is_file()), None)


def test_no_register_spills(compiled):
    _, ptx = compiled
    ptxas = _new_enough_ptxas()
    if ptxas is None:
        pytest.skip("no ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        run = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", str(src), "-o", "/dev/null"],
                             capture_output=True, text=True)  # fmt: skip
    if run.returncode != 0:
        pytest.skip(f"ptxas cannot read this PTX: {run.stderr.strip()[:200]}")
    assert re.search(r"0 bytes spill stores, 0 bytes spill loads", run.stderr), run.stderr


# ---------------------------------------------------------------- on an H100/H200 only


def _on_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


hopper_only = pytest.mark.skipif(not _on_hopper(), reason="needs an sm_90 GPU (H100/H200)")
GPU_VARIANTS = [(dtype, d) for dtype in (torch.bfloat16, torch.float16) for d in (64, 128, 256)]


def batches(max_history: int = 700, max_targets: int = 300, max_batch: int = 4):
    """Around the 32- and 64-key tiles and 128-row query tiles, histories often all new."""
    edges = (1, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 257)
    return shared_batches(max_history, max_targets, max_batch, edges=edges, whole=True)


def _case(shape, heads: int, head_dim: int, seed: int) -> PagedCase:
    histories, new, targets = shape
    return make_paged_case(
        histories, new, targets, page_size=PAGE, heads=heads, head_dim=head_dim,
        dtype=torch.float32, device="cuda", seed=seed,
    )  # fmt: skip


@pytest.mark.gpu
@hopper_only
@given(shape=batches(), variant=st.sampled_from(GPU_VARIANTS), heads=st.integers(1, 3),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_paged_parity(shape, variant, heads, seed):
    dtype, head_dim = variant
    check_paged_backend(_case(shape, heads, head_dim, seed), dtype, BACKEND)


@pytest.mark.gpu
@hopper_only
@given(shape=batches(), variant=st.sampled_from(GPU_VARIANTS), heads=st.integers(1, 3),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_jagged_parity(shape, variant, heads, seed):
    dtype, head_dim = variant
    check_jagged_backend(_case(shape, heads, head_dim, seed), dtype, BACKEND)


@pytest.mark.gpu
@hopper_only
@pytest.mark.parametrize("head_dim", [128, 256])
def test_edges(head_dim):
    """One-token history, zero targets, lengths on and one past the tile edges, a sequence
    whose later query tiles are empty, and many pages."""
    shape = (
        [1, 32, 33, 128, 129, 1000, 3],
        [1, 32, 1, 100, 128, 129, 3],
        [0, 0, 31, 128, 1, 300, 0],
    )
    for dtype in (torch.bfloat16, torch.float16):
        check_paged_backend(_case(shape, 2, head_dim, 7), dtype, BACKEND)
        check_jagged_backend(_case(shape, 2, head_dim, 7), dtype, BACKEND)


def _forced_splits(n: int):
    """Force ``n`` key-range splits per query tile (``split_kv.split_layout``)."""
    return hk_settings.override(cutedsl_splits=n)


@pytest.mark.gpu
@hopper_only
@given(shape=batches(), variant=st.sampled_from(GPU_VARIANTS), heads=st.integers(1, 3),
       seed=st.integers(0, 2**16), splits=st.sampled_from([2, 3, 5, 16]))  # fmt: skip
def test_split_kv_parity(shape, variant, heads, seed, splits):
    """Forced splits: partial sums by the last split of each query tile, tiles with fewer key
    tiles than splits (empty splits exit), one split's own range ending in a page tail."""
    dtype, head_dim = variant
    case = _case(shape, heads, head_dim, seed)
    with _forced_splits(splits):
        check_paged_backend(case, dtype, BACKEND)
        check_jagged_backend(case, dtype, BACKEND)


@pytest.mark.gpu
@hopper_only
@given(data=st.data(), shape=batches(), variant=st.sampled_from(GPU_VARIANTS),
       heads=st.integers(1, 3), seed=st.integers(0, 2**16),
       splits=st.sampled_from([None, None, 2, 5]))  # fmt: skip
def test_contexts_and_window_parity(data, shape, variant, heads, seed, splits):
    """Contexts up to the shortest history and windows from one key to past the history,
    with targets, page and tile edges; unsplit (the kernel's own choice) and forced splits."""
    dtype, head_dim = variant
    mask = data.draw(masks(shape))
    case = _case(shape, heads, head_dim, seed)
    with _forced_splits(splits):
        check_paged_backend(case, dtype, BACKEND, *mask)
        check_jagged_backend(case, dtype, BACKEND, *mask)


@pytest.mark.gpu
@hopper_only
def test_contexts_and_window_edges():
    """Windows of one key, of one page, one past a page and longer than the history; contexts
    covering a whole short history; long histories split in 2 and 7."""
    one_token = ([1, 33, 1000, 4000], [1, 33, 100, 129], [0, 31, 1, 300])
    longer = ([33, 100, 4000], [33, 1, 129], [0, 5, 300])
    cases = [(one_token, m) for m in ((0, 1), (0, 32), (0, 33), (1, 5000), (1, 0), (0, 1024))]
    cases += [(longer, m) for m in ((33, 64), (33, 0), (32, 1024))]
    for shape, mask in cases:
        case = _case(shape, 2, 256, 3)
        for splits in (None, 2, 7):
            with _forced_splits(splits):
                check_paged_backend(case, torch.bfloat16, BACKEND, *mask)
                check_jagged_backend(case, torch.bfloat16, BACKEND, *mask)


@pytest.mark.gpu
@hopper_only
def test_split_kv_edges():
    """Long histories split in 2..16 (the tickets of a query tile reach every count)."""
    shape = ([1, 33, 1000, 4000], [1, 33, 100, 129], [0, 31, 1, 300])
    for splits in (2, 7, 16):
        with _forced_splits(splits):
            for dtype in (torch.bfloat16, torch.float16):
                check_paged_backend(_case(shape, 2, 256, splits), dtype, BACKEND)
                check_jagged_backend(_case(shape, 2, 256, splits), dtype, BACKEND)


@pytest.mark.gpu
@hopper_only
@pytest.mark.parametrize("splits", [2, 5, 16])
def test_paged_partials_unsummed(monkeypatch, splits):
    """``paged_hstu_attention_partials`` on this backend: every split writes its fp32 partial
    (zeros where a short history leaves a split no key tile), nothing is summed, and the
    in-order sum rounded to bf16 is the public op's output bit for bit (same splits, summed
    by the kernel's tickets), within the DESIGN.md §5 rule of the reference."""
    from hstu_kernels.ops import paged_hstu_attention_partials

    shape = ([1, 33, 1000, 4000], [1, 33, 100, 129], [0, 31, 1, 300])
    case = _case(shape, 2, 256, splits)
    q, k, v, kv = (t.to(torch.bfloat16) for t in (case.q, case.k_new, case.v_new, case.kv_cache))
    args = (q, k, v, kv, case.page_table, case.cu_q)
    kwargs = dict(num_targets=case.num_targets, scaling_seqlen=case.max_total, backend=BACKEND)
    empty = torch.empty

    def poisoned_empty(*shape, **kw):  # the partials: NaN until written
        t = empty(*shape, **kw)
        return t.fill_(float("nan")) if kw.get("dtype") == torch.float32 else t

    with _forced_splits(splits):
        with monkeypatch.context() as m:
            m.setattr(torch, "empty", poisoned_empty)
            got = paged_hstu_attention_partials(*args, **kwargs)
        want = hk.paged_hstu_attention(*args, **kwargs, out=poisoned_like(q))
    assert got.dtype == torch.float32 and got.shape == (splits, *q.shape)
    total = got[0].clone()
    for i in range(1, splits):
        total += got[i]
    summed = total.to(torch.bfloat16)
    assert torch.equal(summed, want)
    ref32, ref_lowp = (case.reference_full(d)[case.rows] for d in (torch.float32, torch.bfloat16))
    assert_hstu_close(summed, ref32, ref_lowp)


@pytest.mark.gpu
@hopper_only
def test_without_pingpong(knobs):
    """The free-running variant (HSTU_CUTEDSL_PINGPONG=0) computes the same as the default."""
    knobs(cutedsl_pingpong=False)
    shape = ([1, 33, 129, 1000], [1, 33, 100, 129], [0, 31, 1, 300])
    for dtype in (torch.bfloat16, torch.float16):
        check_paged_backend(_case(shape, 2, 256, 5), dtype, BACKEND)
        check_jagged_backend(_case(shape, 2, 256, 5), dtype, BACKEND)


@pytest.mark.gpu
@hopper_only
def test_batch_shorter_than_a_box():
    """Every sequence shorter than one 32-key tile and the 128-row query box: the TMA boxes are
    taller than the views' row extent (max_seqlen), which TMA must read as zeros."""
    shape = ([5, 1, 20], [5, 1, 3], [2, 0, 7])
    for dtype in (torch.bfloat16, torch.float16):
        check_paged_backend(_case(shape, 2, 256, 11), dtype, BACKEND)
        check_jagged_backend(_case(shape, 2, 256, 11), dtype, BACKEND)


@pytest.mark.gpu
@hopper_only
def test_all_target_jagged_sequence():
    """A jagged sequence with no history (every row a target): no key tiles at all."""
    check_all_target_jagged(BACKEND, 256)


@pytest.mark.gpu
@hopper_only
@pytest.mark.parametrize("splits", [1, 4])
def test_cuda_graph_replay_equals_eager(splits):
    """Replays equal the eager call bit for bit (split-KV: the tickets are zeroed in the
    graph, and the partials are summed in split order whichever split finishes last)."""
    dtype = torch.bfloat16
    case = _case(([300, 77], [20, 77], [40, 5]), 2, 256, 1)
    q, k_new, v_new, kv = (t.to(dtype) for t in (case.q, case.k_new, case.v_new, case.kv_cache))
    max_q = max(n + t for n, t in zip(case.new, case.targets, strict=True))

    def call(out):
        hk.paged_hstu_attention(
            q, k_new, v_new, kv, case.page_table, case.cu_q, num_targets=case.num_targets,
            max_seqlen_q=max_q, scaling_seqlen=case.max_total, backend=BACKEND, out=out,
        )  # fmt: skip

    with _forced_splits(splits):
        eager = poisoned_like(q)
        call(eager)
        replayed = poisoned_like(q)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call(replayed)
    for _ in range(3):
        replayed.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(eager, replayed)


def test_kernel_bench_times_it_on_sm90(monkeypatch):
    """bench.kernels times every backend that serves a case on its arch: this one on sm_90."""
    from bench import kernels

    monkeypatch.setattr(kernels, "device_arch", lambda device: "sm_90")
    case = kernels.Case("delta", 8, 4, 256, 4096, 256, 128, page_size=PAGE)
    names, _ = kernels._backends_for(case, torch.bfloat16, "cuda")
    assert BACKEND in names and "triton" in names


# ---------------------------------------------------------------- split-KV choice (CPU)


@pytest.mark.parametrize(
    ("tiles", "kv_tiles", "causal", "expected"),
    [
        (96, 128, False, 1),  # delta B=8, 4 heads, 384 rows: most SMs busy already
        (32, 128, False, 4),  # delta B=8 without targets: one tile per (sequence, head)
        (48, 128, False, 2),  # delta B=4 + targets: one wave (8 splits, 3 waves, lost)
        (24, 128, False, 5),  # delta B=2 + targets
        (12, 128, False, 11),  # delta B=1: 12 tiles fill 132 SMs in 11 parts
        (1088, 136, True, 1),  # jagged B=8: the mean load dominates
        (136, 68, True, 2),  # jagged B=1 (64-key tiles): the longest tile dominates
    ],
)
def test_choose_splits(tiles, kv_tiles, causal, expected):
    from hstu_kernels.backends.cutedsl.split_kv import choose_splits

    assert choose_splits(tiles, kv_tiles, 132, causal) == expected


def test_split_buffers_shapes(monkeypatch, knobs):
    """The op's split-KV arguments: a stand-in without a split; with one, fp32 partials per
    split and zeroed tickets per query tile; fixed chunks only for jagged."""
    from hstu_kernels.backends.cutedsl import split_kv

    monkeypatch.setattr(split_kv, "sm_count", lambda device: 132)
    q = torch.empty((4 * 384, 4, 256), dtype=torch.bfloat16)
    partials, tickets, chunk, unsummed = split_kv.split_buffers(q, 4, 384, 128, 128, False)
    assert partials.shape == (split_kv.choose_splits(48, 128, 132, False), *q.shape)
    assert partials.dtype == torch.float32 and chunk == 0 and unsummed == 0
    assert tickets.shape == (48,) and not tickets.any()
    knobs(cutedsl_splits=3)
    partials, tickets, chunk, unsummed = split_kv.split_buffers(q, 4, 384, 100, 128, True)
    assert partials.shape[0] == 3 and chunk == 34 and unsummed == 0
    # left to the caller: no tickets (a stand-in), the kernel's flag set
    partials, tickets, chunk, unsummed = split_kv.split_buffers(
        q, 4, 384, 100, 128, False, unsummed=True
    )
    assert partials.shape == (3, *q.shape) and tickets.numel() == 1 and unsummed == 1
    knobs(cutedsl_splits=1)
    for flag in (False, True):
        partials, _, chunk, unsummed = split_kv.split_buffers(
            q, 4, 384, 100, 128, True, unsummed=flag
        )
        assert partials.shape[0] == 1 and chunk == 0 and unsummed == 0


def test_lpt_tile_order():
    """The one-dimensional grid visits every (m_block, head, batch, split) once, longest query
    tiles (highest m_block) of every sequence and head first, a tile's splits side by side."""
    from hstu_kernels.backends.cutedsl.hstu_common import lpt_tile

    m_blocks, batch, heads, splits = 3, 2, 4, 5
    order = [
        lpt_tile(i, batch, heads, splits, m_blocks)
        for i in range(m_blocks * batch * heads * splits)
    ]
    assert len(set(order)) == len(order)
    assert [o[0] for o in order] == sorted((o[0] for o in order), reverse=True)
    assert [o[3] for o in order[:splits]] == list(range(splits))
    assert {o[1:3] for o in order[: batch * heads * splits]} == {
        (h, b) for h in range(heads) for b in range(batch)
    }
