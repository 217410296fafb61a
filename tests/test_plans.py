"""Plans (``hk.plan_*``): ``plan.run`` equals the functional op bit for bit on every backend,
refuses inputs that disagree with the plan with a named error, needs no sync with a host
layout, can be captured into a CUDA graph; the functional ops' plan cache never serves a stale
plan; ``torch.compile(fullgraph=True)`` over the public ops and the HSTU block.

CPU: the reference and the Triton interpreter (fp16/fp32). GPU (marker ``gpu``): every backend
that serves the case on the card.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import batches as shared_batches

import hstu_kernels as hk
from hstu_kernels.dispatch import Request, device_arch, registry
from hstu_kernels.testing import assert_hstu_close, make_paged_case, poisoned_like

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"


def _backends(op: str, dtype: torch.dtype, head_dim: int, page_size: int | None) -> list[str]:
    """Every backend that serves ``op`` here (the Triton interpreter on the CPU included)."""
    request = Request(op, device_arch(torch.device(DEVICE)), dtype, head_dim, page_size)
    return sorted(n for n, b in registry().backends.items() if b.refusal(request) is None)


def batches(max_batch: int = 3, max_history: int = 80, max_targets: int = 9):
    """Around the 16- and 32-token pages and tiles; sequences with no new rows included."""
    edges = (1, 15, 16, 17, 31, 32, 33, 63, 64, 65)
    return shared_batches(max_history, max_targets, max_batch, edges=edges, min_new=0)


def _case(shape, page_size: int, heads: int, head_dim: int, dtype: torch.dtype, seed: int):
    return make_paged_case(*shape, page_size=page_size, heads=heads, head_dim=head_dim,
                           dtype=dtype, device=DEVICE, seed=seed)  # fmt: skip


def _plan_equals_op(case, dtype: torch.dtype, backend: str) -> None:
    """plan.run against the functional op, bit for bit, outputs poisoned; and the §5 rule."""
    heads, head_dim = case.q.shape[1:]
    pt, cu, nt = case.page_table, case.cu_q, case.num_targets
    plan = hk.plan_paged_attention(
        pt, cu, nt, heads=heads, head_dim=head_dim, dtype=dtype, page_size=case.page_size,
        scaling_seqlen=case.max_total, backend=backend,
    )  # fmt: skip
    assert plan.backend == backend
    q, k, v, kv = (t.to(dtype) for t in (case.q, case.k_new, case.v_new, case.kv_cache))
    got = plan.run(q, k, v, kv, out=poisoned_like(q))
    want = hk.paged_hstu_attention(q, k, v, kv, pt, cu, num_targets=nt,
                                   scaling_seqlen=case.max_total, backend=backend,
                                   out=poisoned_like(q))  # fmt: skip
    assert torch.equal(got, want)
    rows = case.rows
    assert_hstu_close(
        got, case.reference_full(torch.float32)[rows], case.reference_full(dtype)[rows]
    )
    # a second run (another layer's pool: here the same values in another tensor)
    assert torch.equal(plan.run(q, k, v, kv.clone()), want)


def _jagged_plan_equals_op(case, dtype: torch.dtype, backend: str) -> None:
    heads, head_dim = case.q.shape[1:]
    plan = hk.plan_jagged_attention(case.cu_full, case.num_targets, heads=heads,
                                    head_dim=head_dim, dtype=dtype, backend=backend)  # fmt: skip
    q, k, v = (t.to(dtype) for t in (case.q_full, case.k_full, case.v_full))
    got = plan.run(q, k, v, out=poisoned_like(q))
    want = hk.hstu_attention(q, k, v, case.cu_full, num_targets=case.num_targets,
                             backend=backend, out=poisoned_like(q))  # fmt: skip
    assert torch.equal(got, want)
    assert_hstu_close(got, case.reference_full(torch.float32), case.reference_full(dtype))


def _append_plan_equals_op(case, dtype: torch.dtype, backend: str) -> None:
    heads, head_dim = case.q.shape[1:]
    pt, cu, nt = case.page_table, case.cu_q, case.num_targets
    plan = hk.plan_append_kv(pt, cu, nt, heads=heads, head_dim=head_dim, dtype=dtype,
                             page_size=case.page_size, backend=backend)  # fmt: skip
    k, v = case.k_new.to(dtype), case.v_new.to(dtype)
    planned = torch.full_like(case.kv_cache, float("nan"), dtype=dtype)
    functional = planned.clone()
    plan.run(planned, k, v)
    hk.append_kv(functional, pt, k, v, cu, num_targets=nt, backend=backend)
    assert torch.equal(planned.nan_to_num(7.0), functional.nan_to_num(7.0))
    assert sum(case.new) == 0 or not torch.isnan(planned).all()


CPU_DTYPES = [torch.float32, torch.float16]


@pytest.mark.skipif(GPU, reason="CPU: reference and Triton interpreter")
@given(shape=batches(), page_size=st.sampled_from([16, 32]), heads=st.integers(1, 2),
       dtype=st.sampled_from(CPU_DTYPES), seed=st.integers(0, 2**16))  # fmt: skip
def test_plan_run_equals_the_op_cpu(shape, page_size, heads, dtype, seed):
    case = _case(shape, page_size, heads, 64, torch.float32, seed)
    for backend in _backends("paged", dtype, 64, page_size):
        _plan_equals_op(case, dtype, backend)
    for backend in _backends("jagged", dtype, 64, None):
        _jagged_plan_equals_op(case, dtype, backend)
    for backend in _backends("append_kv", dtype, 64, page_size):
        _append_plan_equals_op(case, dtype, backend)


def test_cpu_runs_cover_the_interpreter():
    """The CPU parity test above must reach the Triton kernels, not only the reference."""
    if GPU:
        pytest.skip("the GPU tests cover the compiled kernels")
    pytest.importorskip("triton")
    assert "triton" in _backends("paged", torch.float16, 64, 16)


GPU_VARIANTS = [(torch.bfloat16, 128), (torch.bfloat16, 256), (torch.float16, 64)]


@pytest.mark.gpu
@given(shape=batches(max_batch=4, max_history=300, max_targets=40),
       variant=st.sampled_from(GPU_VARIANTS), heads=st.integers(1, 3),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_plan_run_equals_the_op_gpu(shape, variant, heads, seed):
    dtype, head_dim = variant
    case = _case(shape, 32, heads, head_dim, torch.float32, seed)
    backends = [b for b in _backends("paged", dtype, head_dim, 32) if b != "reference"]
    assert backends
    for backend in backends:
        _plan_equals_op(case, dtype, backend)
    for backend in [b for b in _backends("jagged", dtype, head_dim, None) if b != "reference"]:
        _jagged_plan_equals_op(case, dtype, backend)
    for backend in [b for b in _backends("append_kv", dtype, head_dim, 32) if b != "reference"]:
        _append_plan_equals_op(case, dtype, backend)


# --- what a plan refuses --------------------------------------------------------------------


@pytest.fixture
def planned():
    case = make_paged_case([40, 17], [8, 17], [3, 2], page_size=16, heads=2, head_dim=8,
                           device=DEVICE, seed=1)  # fmt: skip
    plan = hk.plan_paged_attention(case.page_table, case.cu_q, case.num_targets, heads=2,
                                   head_dim=8, dtype=torch.float32, page_size=16,
                                   backend="reference")  # fmt: skip
    return case, plan


@pytest.mark.parametrize(
    "change,exc,pattern",
    [
        (
            lambda c: {"q": c.q[1:], "k_new": c.k_new[1:], "v_new": c.v_new[1:]},
            ValueError,
            r"q: expected 30 rows",
        ),
        (
            lambda c: {"q": c.q.half(), "k_new": c.k_new.half(), "v_new": c.v_new.half()},
            TypeError,
            r"q: expected dtype float32",
        ),
        (lambda c: {"k_new": c.k_new[:, :1].contiguous()}, ValueError, r"k_new: expected shape"),
        (
            lambda c: {"v_new": c.v_new.transpose(0, 1).contiguous().transpose(0, 1)},
            ValueError,
            r"v_new: expected a contiguous tensor",
        ),
        (
            lambda c: {
                "q": c.q.reshape(30, 4, 4),
                "k_new": c.k_new.reshape(30, 4, 4),
                "v_new": c.v_new.reshape(30, 4, 4),
            },
            ValueError,
            r"q: expected heads, head_dim = \(2, 8\)",
        ),
        (
            lambda c: {"kv_cache": c.kv_cache[:, :, :8].contiguous()},
            ValueError,
            r"kv_cache: expected pages of 16 tokens",
        ),
        (
            lambda c: {"kv_cache": c.kv_cache[:3].contiguous()},
            ValueError,
            r"page_table\.page_ids: expected ids in 0\.\.2 \(pages in kv_cache\)",
        ),
        (lambda c: {"kv_cache": c.kv_cache.half()}, TypeError, r"kv_cache: expected dtype float32"),
        (lambda c: {"out": c.q[:5]}, ValueError, r"out: expected shape \(30, 2, 8\)"),
        (lambda c: {"out": c.q.double()}, TypeError, r"out: expected dtype float32"),
        (lambda c: {"q": "q"}, TypeError, r"q: expected a torch.Tensor"),
        # several wrong: the first in argument order is named
        (lambda c: {"kv_cache": c.kv_cache.half(), "out": c.q[:5]}, TypeError, r"kv_cache:"),
        (lambda c: {"k_new": c.k_new[1:], "out": c.q.double()}, ValueError, r"k_new:"),
        (lambda c: {"out": c.q}, ValueError, r"out: must not share memory with q"),
    ],
)
def test_plan_refuses_what_disagrees_with_it(planned, change, exc, pattern):
    case, plan = planned
    args = dict(q=case.q, k_new=case.k_new, v_new=case.v_new, kv_cache=case.kv_cache, out=None)
    args.update(change(case))
    with pytest.raises(exc, match=pattern):
        plan.run(**args)


def test_plan_arguments_are_checked():
    case = make_paged_case([40], [8], [3], page_size=16, heads=2, head_dim=8, seed=2)
    pt, cu, nt = case.page_table, case.cu_q, case.num_targets
    base = dict(heads=2, head_dim=8, dtype=torch.float32, page_size=16)
    for change, exc, pattern in [
        ({"heads": 0}, ValueError, "heads: expected a positive int"),
        ({"dtype": torch.int32}, TypeError, "dtype: expected one of"),
        ({"page_size": 24}, ValueError, "page_size: expected a power-of-two int"),
        ({"max_seqlen_q": 5}, ValueError, r"max_seqlen_q: expected >= 11"),
        ({"backend": "nope"}, hk.BackendError, "nope: unknown backend"),
        ({"max_attn_len": -1}, ValueError, "max_attn_len: expected >= 0"),
    ]:
        with pytest.raises(exc, match=pattern):
            hk.plan_paged_attention(pt, cu, nt, **(base | change))
    with pytest.raises(ValueError, match=r"last_page_len: expected 1\.\.16"):
        bad = hk.PageTable(pt.page_indptr, pt.page_ids, pt.last_page_len + 30)
        hk.plan_paged_attention(bad, cu, nt, **base)
    with pytest.raises(ValueError, match=r"max_seqlen: expected >= 43"):
        hk.plan_jagged_attention(case.cu_full, nt, heads=2, head_dim=8, dtype=torch.float32,
                                 max_seqlen=40)  # fmt: skip


def test_a_host_layout_needs_no_read_and_is_checked():
    """With a layout the plan reads nothing from the device; a wrong layout is refused on the
    host, and the values it gives are the ones the plan uses."""
    case = make_paged_case([40, 17], [8, 17], [3, 2], page_size=16, heads=2, head_dim=8, seed=3)
    pt, cu, nt = case.page_table, case.cu_q, case.num_targets
    base = dict(heads=2, head_dim=8, dtype=torch.float32, page_size=16, backend="reference")
    read = hk.plan_paged_attention(pt, cu, nt, **base)
    layout = hk.BatchLayout((11, 19), (3, 2), (40, 17), read.layout.page_id_range)
    assert read.layout == layout
    given_plan = hk.plan_paged_attention(pt, cu, nt, **base, layout=layout)
    assert given_plan.layout is layout and given_plan.spec == read.spec
    assert torch.equal(given_plan.run(case.q, case.k_new, case.v_new, case.kv_cache),
                       read.run(case.q, case.k_new, case.v_new, case.kv_cache))  # fmt: skip
    with pytest.raises(ValueError, match=r"sequence 1 has 17 new history rows but .* only 9"):
        hk.plan_paged_attention(pt, cu, nt, **base,
                                layout=hk.BatchLayout((11, 19), (3, 2), (40, 9)))  # fmt: skip
    with pytest.raises(ValueError, match="layout: describes 1 sequences"):
        hk.plan_paged_attention(pt, cu, nt, **base, layout=hk.BatchLayout((11,), (3,), (40,)))


def test_functional_ops_never_use_a_stale_plan():
    """The plan cache: a metadata tensor written in place by torch (validate=False), or new
    values (validate=True), give a new plan; the result always matches the reference."""
    case = make_paged_case([40, 17], [8, 17], [3, 2], page_size=16, heads=2, head_dim=8, seed=4)
    pt, cu, nt = case.page_table, case.cu_q.clone(), case.num_targets.clone()
    q, k, v, kv = case.q, case.k_new, case.v_new, case.kv_cache
    kw = dict(num_targets=nt, scaling_seqlen=case.max_total)
    first = hk.paged_hstu_attention(q, k, v, kv, pt, cu, **kw)
    assert torch.equal(first, hk.paged_hstu_attention(q, k, v, kv, pt, cu, **kw))
    # fewer targets, more new rows, in place: both paths see it
    nt[0] = 1
    ref = hk.paged_hstu_attention(q, k, v, kv, pt, cu.clone(), **(kw | {"num_targets": nt.clone()}))
    assert not torch.equal(ref, first)
    assert torch.equal(hk.paged_hstu_attention(q, k, v, kv, pt, cu, **kw), ref)
    assert torch.equal(hk.paged_hstu_attention(q, k, v, kv, pt, cu, **kw, validate=False), ref)
    # the same tensor, values changed behind torch's back (no version bump): validate reads
    nt.data[0] = 3
    with torch.no_grad():
        nt.data.copy_(torch.tensor([3, 2], dtype=torch.int32))
    assert torch.equal(hk.paged_hstu_attention(q, k, v, kv, pt, cu, **kw), first)


# --- CUDA graphs --------------------------------------------------------------------------


@pytest.mark.gpu
def test_plan_run_is_graph_capturable():
    """Append + attention plans captured once, replayed on new K/V values in the same
    buffers: every replay equals an eager run of the same plans."""
    dtype = torch.bfloat16
    case = make_paged_case([300, 77], [40, 77], [16, 3], page_size=32, heads=2, head_dim=128,
                           device="cuda", seed=9)  # fmt: skip
    pt, cu, nt = case.page_table, case.cu_q, case.num_targets
    base = dict(heads=2, head_dim=128, dtype=dtype, page_size=32)
    append = hk.plan_append_kv(pt, cu, nt, **base)
    attention = hk.plan_paged_attention(pt, cu, nt, **base, scaling_seqlen=case.max_total)
    q, k, v = (t.to(dtype) for t in (case.q, case.k_new, case.v_new))
    kv = case.kv_cache.to(dtype)
    out = torch.empty_like(q)

    def step() -> None:
        append.run(kv, k, v)
        attention.run(q, k, v, kv, out)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in range(3):
        g = torch.Generator(device="cuda").manual_seed(seed)
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape, generator=g, device="cuda"))
        graph.replay()
        got = out.clone()
        step()
        torch.cuda.synchronize()
        assert torch.equal(got, out)


# --- torch.compile ----------------------------------------------------------------------------


def _compile_case(device: str):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    head_dim = 128 if device == "cuda" else 8
    case = make_paged_case([40, 17], [8, 17], [3, 2], page_size=32 if device == "cuda" else 16,
                           heads=2, head_dim=head_dim, dtype=dtype, device=device, seed=5)  # fmt: skip
    return case


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_torch_compile_fullgraph_over_the_public_ops(device):
    torch._dynamo.reset()
    case = _compile_case(device)

    def step(q, k, v, kv, pt, cu, nt, q_full, k_full, v_full, cu_full):
        hk.append_kv(kv, pt, k, v, cu, num_targets=nt)
        paged = hk.paged_hstu_attention(q, k, v, kv, pt, cu, num_targets=nt)
        jagged = hk.hstu_attention(q_full, k_full, v_full, cu_full, num_targets=nt, alpha=0.3)
        return paged, jagged

    def args(kv):
        c = case
        return (c.q, c.k_new, c.v_new, kv, c.page_table, c.cu_q, c.num_targets, c.q_full,
                c.k_full, c.v_full, c.cu_full)  # fmt: skip

    eager_kv, compiled_kv = case.kv_cache.clone(), case.kv_cache.clone()
    want = step(*args(eager_kv))
    got = torch.compile(step, fullgraph=True)(*args(compiled_kv))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(eager_kv.nan_to_num(7.0), compiled_kv.nan_to_num(7.0))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_torch_compile_fullgraph_over_the_block(device):
    """The compiled block (cached and uncached paths) gives the eager block's outputs within
    the DESIGN.md §5 rule (the compiler generates its own LayerNorm and GEMM kernels)."""
    from hstu_kernels.kvcache import build_jagged_metadata
    from hstu_kernels.model import HSTUBlock

    torch._dynamo.reset()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = dict(num_layers=2, hidden=64, heads=2, head_dim=32 if device == "cpu" else 64)
    block = HSTUBlock(**shape, scaling_seqlen=64, dtype=dtype, device=device, seed=3)
    block32 = HSTUBlock(**shape, scaling_seqlen=64, dtype=torch.float32, device=device, seed=3)
    block32.backend = "reference"
    new, targets = [20, 9], [0, 3]
    gen = torch.Generator().manual_seed(4)
    x32 = torch.randn(sum(new) + sum(targets), 64, generator=gen).to(device)

    def cached(b, x, compiled: bool):
        cache = b.make_cache(num_pages=12, page_size=16 if device == "cpu" else 32)
        meta = cache.prepare([5, 6], [0, 0], new, targets)
        run = lambda x, meta: b.forward_cached(x, meta, cache)
        return (torch.compile(run, fullgraph=True) if compiled else run)(x, meta)

    ref32 = cached(block32, x32, False)
    eager = cached(block, x32.to(dtype), False)
    compiled = cached(block, x32.to(dtype), True)
    assert_hstu_close(compiled, ref32, eager)

    meta = build_jagged_metadata(new, targets, device)
    run = lambda b, x: b.forward_uncached(x, meta)
    ref32, eager = run(block32, x32), run(block, x32.to(dtype))
    compiled = torch.compile(run, fullgraph=True)(block, x32.to(dtype))
    assert_hstu_close(compiled, ref32, eager)


# --- settings ---------------------------------------------------------------------------------


def test_settings_are_read_once(monkeypatch, knobs):
    """The environment is read when settings are first needed (or reloaded), not per call."""
    knobs()  # settings exist before the variable changes
    monkeypatch.setenv("HSTU_KERNELS_BACKEND", "no-such-backend")
    case = make_paged_case([40], [8], [3], page_size=16, heads=2, head_dim=8, seed=6)
    hk.paged_hstu_attention(case.q, case.k_new, case.v_new, case.kv_cache, case.page_table,
                            case.cu_q, num_targets=case.num_targets)  # fmt: skip
    assert hk.settings.from_environment().backend == "no-such-backend"
    assert hk.settings.get().backend == "auto"
    with pytest.raises(ValueError, match="HSTU_CUTEDSL_SPLITS: expected an int"):
        hk.settings.from_environment({"HSTU_CUTEDSL_SPLITS": "many"})
    with hk.settings.override(backend="reference"):
        assert hk.explain("paged", device="cpu", page_size=16).choice == "reference"
