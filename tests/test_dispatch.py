"""Backend selection by (arch, dtype, head dim, page size, features), with faked capabilities."""

from __future__ import annotations

import pytest
import torch

import hstu_kernels as hk
from hstu_kernels.dispatch import Backend, BackendError, Registry, Request, device_arch, registry

ALL_DTYPES = frozenset({torch.bfloat16, torch.float16, torch.float32})
LOWP = frozenset({torch.bfloat16, torch.float16})
GPU_ARCHS = frozenset({"sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_103", "sm_120"})


def _jagged_stub(q, k, v, cu_seqlens, num_targets, max_seqlen, spec, out):
    raise AssertionError("the fake registries are only asked to choose")


def _paged_stub(q, k_new, v_new, kv_cache, page_table, cu_q, num_targets, max_q, spec, out):
    raise AssertionError("the fake registries are only asked to choose")


def _append_stub(kv_cache, page_table, k, v, cu_seqlens, num_targets):
    raise AssertionError("the fake registries are only asked to choose")


OPS = {"jagged": _jagged_stub, "paged": _paged_stub, "append_kv": _append_stub}


def fake_registry(unavailable: dict[str, str] | None = None) -> Registry:
    """A registry shaped like DESIGN.md §4's table."""
    unavailable = unavailable or {}

    def probe(name):
        return lambda arch: unavailable.get(name)

    return Registry(
        [
            Backend(
                "reference",
                OPS,
                ALL_DTYPES,
                page_sizes=frozenset(2**i for i in range(4, 9)),
                features=frozenset({"contexts", "window"}),
                priority={"*": 0},
            ),
            Backend(
                "triton",
                OPS,
                LOWP,
                archs=GPU_ARCHS,
                head_dims=frozenset({64, 128, 256}),
                page_sizes=frozenset(2**i for i in range(4, 9)),
                features=frozenset({"contexts", "window"}),
                priority={"*": 20},
                probe=probe("triton"),
            ),
            Backend(
                "cutedsl-ampere",
                {"jagged": _jagged_stub, "paged": _paged_stub},
                LOWP,
                archs=GPU_ARCHS,
                head_dims=frozenset({64, 128, 256}),
                page_sizes=frozenset(2**i for i in range(4, 9)),
                priority={"*": 10, "sm_89": 30},
                probe=probe("cutedsl-ampere"),
            ),
            Backend(
                "cutedsl-blackwell",
                {"jagged": _jagged_stub, "paged": _paged_stub},
                LOWP,
                archs=frozenset({"sm_100", "sm_103"}),
                head_dims=frozenset({64, 128}),
                page_sizes=frozenset({128}),
                priority={"*": 40},
                probe=probe("cutedsl-blackwell"),
            ),
        ]
    )


@pytest.mark.parametrize(
    "op,batch,max_seqlen_q,expected",
    [
        ("paged", 8, 384, "cutedsl-hopper"),  # 96 tiles of 4 heads
        ("paged", 8, 128, "triton"),  # 32 tiles: triton's split kernel measured faster
        ("paged", 1, 384, "triton"),
        ("jagged", 8, 4352, "cutedsl-hopper"),
        ("jagged", 1, 4352, "cutedsl-hopper"),  # split in 2
        ("jagged", 1, 1024, "triton"),
    ],
)
def test_sm90_small_grids_go_to_triton(op, batch, max_seqlen_q, expected, monkeypatch):
    """On sm_90 the Hopper kernel declines the grids triton serves faster (measured)."""
    monkeypatch.delenv("HSTU_KERNELS_BACKEND", raising=False)
    exp = hk.explain(
        op, arch="sm_90", dtype=torch.bfloat16, head_dim=256, batch=batch, heads=4,
        max_seqlen_q=max_seqlen_q,
    )  # fmt: skip
    assert exp.choice == expected, str(exp)
    if expected == "triton":
        assert exp.reasons["cutedsl-hopper"].startswith("declines: ")
    forced = hk.explain(op, arch="sm_90", head_dim=256, batch=batch, heads=4,
                        max_seqlen_q=max_seqlen_q, backend="cutedsl-hopper")  # fmt: skip
    assert forced.choice == "cutedsl-hopper"  # declining binds "auto" only


@pytest.mark.parametrize(
    "batch, max_seqlen_q, partials, expected",
    [
        (8, 128, False, "triton"),  # B=8 without targets: the kernel's ticket sum loses
        (8, 128, True, "cutedsl-hopper"),  # the layer sums the partials: hopper wins
        (1, 384, True, "triton"),  # B=1 + targets: triton faster either way
        (8, 384, True, "cutedsl-hopper"),  # B=8 + targets: not split at all
    ],
)
def test_sm90_paged_partials_choice(batch, max_seqlen_q, partials, expected, monkeypatch):
    """A paged call whose caller sums the split partials (``Request.partials``) is declined
    by the Hopper kernel only below ``MIN_TILES_PARTIALS`` (measured)."""
    monkeypatch.delenv("HSTU_KERNELS_BACKEND", raising=False)
    exp = hk.explain(
        "paged", arch="sm_90", dtype=torch.bfloat16, head_dim=256, batch=batch, heads=4,
        max_seqlen_q=max_seqlen_q, partials=partials,
    )  # fmt: skip
    assert exp.choice == expected, str(exp)


def test_hopper_grid_tiles_round_up_to_a_power_of_two():
    from hstu_kernels.backends.cutedsl_hopper import grid_tiles
    from hstu_kernels.dispatch import call_size

    assert grid_tiles(call_size(8, 4, 384)) == 128 and grid_tiles(call_size(1, 4, 4352)) == 256
    assert grid_tiles(call_size(1, 1, 1)) == 1 and grid_tiles(call_size(3, 1, 129)) == 8
    assert call_size(2, 2, None) is None and grid_tiles(None) is None
    assert call_size(3, 1, 129) == (3, 1, 256)  # rows in multiples of 128


@pytest.mark.parametrize(
    "arch,head_dim,page_size,expected",
    [
        ("cpu", 256, 32, "reference"),
        ("sm_80", 256, 32, "triton"),
        ("sm_89", 256, 32, "cutedsl-ampere"),  # measured faster there (fake priority)
        ("sm_90", 128, 64, "triton"),
        ("sm_100", 128, 128, "cutedsl-blackwell"),
        ("sm_100", 256, 128, "triton"),  # blackwell kernel lacks D=256
        ("sm_100", 128, 32, "triton"),  # blackwell kernel needs 128-token pages
        ("sm_90", 96, 32, "reference"),  # no GPU kernel for D=96
    ],
)
def test_selection_per_arch(arch, head_dim, page_size, expected):
    reg = fake_registry()
    request = Request("paged", arch, torch.bfloat16, head_dim, page_size)
    exp = reg.explain(request)
    assert exp.choice == expected, str(exp)
    assert reg.select(request).name == expected
    # every backend passed over has a reason
    assert set(exp.reasons) == {"reference", "triton", "cutedsl-ampere", "cutedsl-blackwell"}


def test_explain_gives_reasons():
    reg = fake_registry()
    exp = reg.explain(Request("paged", "sm_100", torch.bfloat16, 256, 128))
    assert exp.reasons["cutedsl-blackwell"] == "head dim 256 not in [64, 128]"
    assert exp.reasons["triton"].startswith("chosen")
    assert "lower priority" in exp.reasons["reference"]
    text = str(exp)
    assert "-> triton" in text and "head dim 256 not in [64, 128]" in text


def test_features_and_ops_route_to_capable_backend():
    reg = fake_registry()
    req = Request("paged", "sm_100", torch.bfloat16, 128, 128, frozenset({"window"}))
    exp = reg.explain(req)
    assert exp.choice == "triton"
    assert exp.reasons["cutedsl-blackwell"] == "lacks mask features ['window']"
    exp = reg.explain(Request("append_kv", "sm_89", torch.bfloat16, 256, 32))
    assert exp.choice == "triton"
    assert exp.reasons["cutedsl-ampere"] == "does not implement append_kv"


def test_unavailable_backend_is_passed_over():
    reg = fake_registry({"cutedsl-blackwell": "nvidia-cutlass-dsl is not installed"})
    exp = reg.explain(Request("paged", "sm_100", torch.bfloat16, 128, 128))
    assert exp.choice == "triton"
    assert exp.reasons["cutedsl-blackwell"] == "nvidia-cutlass-dsl is not installed"


def test_refusal_when_nothing_serves():
    reg = fake_registry()
    req = Request("paged", "sm_90", torch.bfloat16, 128, 8)  # no backend takes 8-token pages
    with pytest.raises(BackendError, match="no backend can serve") as info:
        reg.select(req)
    assert "page size 8 not in" in str(info.value)


def test_forced_backend(knobs):
    reg = fake_registry()
    req = Request("paged", "sm_90", torch.bfloat16, 128, 32)
    assert reg.select(req, "reference").name == "reference"
    with pytest.raises(BackendError, match="forced but arch sm_90 not in"):
        reg.select(req, "cutedsl-blackwell")
    with pytest.raises(BackendError, match="unknown backend"):
        reg.select(req, "cuda-magic")
    knobs(backend="reference")  # what HSTU_KERNELS_BACKEND=reference sets
    exp = reg.explain(req)
    assert exp.choice == "reference" and "HSTU_KERNELS_BACKEND" in exp.reasons["reference"]
    # an explicit backend= wins over the environment
    assert reg.select(req, "triton").name == "triton"


def test_request_rejects_unknown_op_and_feature():
    with pytest.raises(ValueError, match="op: expected one of"):
        Request("decode", "sm_90", torch.bfloat16, 128)
    with pytest.raises(ValueError, match="features: expected a subset"):
        Request("paged", "sm_90", torch.bfloat16, 128, 32, frozenset({"alibi"}))


def test_duplicate_registration_refused():
    reg = fake_registry()
    with pytest.raises(ValueError, match="registered twice"):
        reg.register(Backend("triton", OPS, LOWP))


def test_real_registry_serves_cpu_with_reference():
    assert "reference" in registry().backends
    exp = hk.explain(
        "paged", device="cpu", dtype=torch.float32, head_dim=32, page_size=16, backend="reference"
    )
    assert exp.choice == "reference"
    exp = hk.explain("paged", arch="sm_90", head_dim=96, page_size=8)
    assert exp.choice is None and "page size 8 not in" in exp.reasons["reference"]


@pytest.mark.parametrize(
    "arch,head_dim,page_size,expected",
    [
        ("sm_80", 256, 32, "triton"),
        ("sm_89", 256, 32, "triton"),
        ("sm_90", 256, 32, "cutedsl-hopper"),  # measured fastest on an H100 (large grids)
        ("sm_90", 128, 128, "triton"),  # hopper's pages are 32 tokens
        ("sm_100", 128, 128, "cutedsl-blackwell"),
        ("sm_100", 256, 32, "cutedsl-ampere"),
        ("cpu", 256, 32, "reference"),
    ],
)
def test_real_registry_follows_the_dispatch_table(arch, head_dim, page_size, expected, knobs):
    """DESIGN.md §4 with the registered backends (capabilities faked: no probing)."""
    knobs(backend="auto")  # whatever HSTU_KERNELS_BACKEND the tests were started with
    exp = hk.explain(
        "paged", arch=arch, dtype=torch.bfloat16, head_dim=head_dim, page_size=page_size
    )
    if arch == "cpu":
        # explain(arch=...) does not probe, so Triton's interpreter-only rule is not applied;
        # its priority on the CPU is below the reference's.
        assert exp.reasons["triton"].startswith("could serve, lower priority")
    assert exp.choice == expected, str(exp)


def test_size_read_from_the_device_is_used_to_select():
    """Without max_seqlen the call's size is unknown until the offsets are read; the plan
    then chooses its backend with the size (a backend may decline by size)."""
    from hstu_kernels.dispatch import call_size

    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    plan = hk.plan_jagged_attention(cu, heads=2, head_dim=16, dtype=torch.float32)
    assert plan.request.size == call_size(2, 2, 6) and plan.max_seqlen == 6
    plan = hk.plan_jagged_attention(cu, heads=2, head_dim=16, dtype=torch.float32, max_seqlen=9)
    assert plan.request.size == call_size(2, 2, 9)


def _unverified(name: str, paged_op, calls: list, base: str = "reference") -> Backend:
    """A backend that the repository has never verified (``verified_archs`` empty), ranked
    above every real one, running ``base``'s kernels through ``paged_op``."""
    from hstu_kernels.backends import reference as ref_backend  # noqa: F401 (registers it)

    real = registry().backends[base].ops

    def paged(q, k_new, v_new, kv_cache, page_table, cu_q, num_targets, max_q, spec, out):
        calls.append(name)
        paged_op(real, q, k_new, v_new, kv_cache, page_table, cu_q, num_targets, max_q, spec, out)

    ops = {"paged": paged, "jagged": real["jagged"]}
    return Backend(name, ops, ALL_DTYPES, page_sizes=frozenset({16, 32}),
                   priority={"*": 50}, verified_archs=frozenset())  # fmt: skip


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_an_unverified_backend_serves_auto_only_after_its_first_use_check(device, knobs, tmp_path):
    """A kernel never run here is checked against the reference on first use: a broken one
    (fault-injected: its output off by one) warns once and auto falls back, saying why in
    explain(); a correct one is chosen. The verdict is kept on disk: a new process (here a new
    registry) does not check again. A forced backend is never checked. On the GPU the checked
    kernels are the Triton backend's, and the fallback is Triton itself."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    knobs(tuning_cache=tmp_path)

    def broken(real, *args):
        real["paged"](*args)
        args[-1].add_(1.0)

    def correct(real, *args):
        real["paged"](*args)

    if device == "cuda":
        base, arch, dtype = "triton", device_arch(torch.device("cuda")), torch.bfloat16
    else:
        base, arch, dtype = "reference", "cpu", torch.float32
    fallback = registry().backends[base]
    request = Request("paged", arch, dtype, 64, 32)
    calls: list = []
    reg = Registry([fallback, _unverified("broken", broken, calls, base)])
    with pytest.warns(RuntimeWarning, match="'broken' failed its first-use parity check"):
        assert reg.select(request).name == base
    assert "failed its first-use parity check" in reg.explain(request).reasons["broken"]
    assert reg.select(request, "broken").name == "broken"  # forced: no check
    assert calls == ["broken"]  # checked once

    calls.clear()
    reg = Registry([fallback, _unverified("good", correct, calls, base)])
    assert reg.select(request).name == "good" and calls == ["good"]
    reg = Registry([fallback, _unverified("good", correct, calls, base)])
    hk.reset_caches()  # memory gone: the verdict comes back from disk
    assert reg.select(request).name == "good" and calls == ["good"]


def test_one_split_kv_chooser_with_a_rule_per_kernel():
    """The kernels' split choices all come from hstu_kernels.split_kv (H100: 132 SMs)."""
    from hstu_kernels.backends.cutedsl.split_kv import choose_splits as hopper_splits
    from hstu_kernels.backends.cutedsl_ampere import num_splits
    from hstu_kernels.split_kv import choose_splits

    assert choose_splits(12, 64, 132, causal=False, rule="fill") == 11  # Triton B=1: one wave
    assert choose_splits(96, 64, 132, causal=False, rule="fill") == 1
    assert choose_splits(48, 128, 132, causal=False, rule="waves") == 2  # Hopper B=4 + targets
    assert hopper_splits(48, 128, 132, False) == 2
    assert choose_splits(136, 68, 132, causal=True) == 2  # jagged B=1
    assert num_splits(12, 68, 1, 132) == choose_splits(12, 68, 132, causal=False, rule="share")
    with pytest.raises(ValueError, match="rule"):
        choose_splits(12, 64, 132, causal=False, rule="even")


def test_a_backend_declaration_that_could_only_fail_later_is_refused():
    noop = registry().backends["reference"].ops["jagged"]
    with pytest.raises(ValueError, match="are not ops"):
        Backend("typo", {"jaged": noop}, ALL_DTYPES)
    with pytest.raises(ValueError, match=r"planners .* have no op"):
        Backend("half", {"jagged": noop}, ALL_DTYPES, planners={"paged": lambda b: None})
    with pytest.raises(ValueError, match="are not features"):
        Backend("masks", {"jagged": noop}, ALL_DTYPES, features=frozenset({"sliding"}))
    # an implementation that cannot take the op's positional arguments
    with pytest.raises(TypeError, match=r"'paged' takes \(q, k, v\).* 10 positional"):
        Backend("short", {"paged": lambda q, k, v: None}, ALL_DTYPES)
    with pytest.raises(TypeError, match="takes \\*args"):
        Backend("forwarding", {"layernorm": lambda *args: None}, ALL_DTYPES)
    with pytest.raises(TypeError, match="not callable"):
        Backend("none", {"jagged": None}, ALL_DTYPES)
    with pytest.raises(TypeError, match="6 positional"):
        Backend("kw", {"append_kv": lambda kv, pt, k, v, cu, nt, *, extra: None}, ALL_DTYPES)
    # extra parameters with defaults are fine
    Backend("extra", {"project_silu": lambda h, w, choice=None: None}, ALL_DTYPES)
