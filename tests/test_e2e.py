"""End-to-end ranking model, request generator and the benchmark suite's entry point."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch

from hstu_kernels.model.requests import SyntheticRequests

# --------------------------------------------------------------------------- request generator


def _gen(**kw) -> SyntheticRequests:
    args = dict(num_items=1000, num_actions=5, start=8, stop=40, step=8, targets=4, seed=3)
    args.update(kw)
    return SyntheticRequests(**args)


def test_generator_is_deterministic():
    a = [b for b in _gen().case(3)]
    b = [b for b in _gen().case(3)]
    assert len(a) == len(b) == 5
    for x, y in zip(a, b, strict=True):
        for r, s in zip(x.requests, y.requests, strict=True):
            assert torch.equal(r.history_items, s.history_items)
            assert torch.equal(r.history_actions, s.history_actions)
            assert torch.equal(r.candidates, s.candidates)
            assert r.new == s.new
    other = next(iter(_gen(seed=4).case(1))).requests[0]
    assert not torch.equal(other.history_items, a[0].requests[0].history_items)


def test_generator_seed_schedule():
    """The seed's numbers: 256..4096 in steps of 256 (16 batches), 256 candidates."""
    gen = SyntheticRequests(num_items=10**6, num_actions=8)
    assert gen.num_requests == 16
    batches = list(gen.case(2))
    assert [b.histories for b in batches] == [[256 * (i + 1)] * 2 for i in range(16)]
    assert all(b.targets == [256, 256] for b in batches)
    assert batches[0].new == [256, 256] and batches[5].new == [256, 256]


def test_generator_histories_grow_by_prefix():
    gen = _gen()
    batches = list(gen.case(2))
    for prev, cur in itertools.pairwise(batches):
        assert cur.new == [8, 8]
        for p, c in zip(prev.requests, cur.requests, strict=True):
            assert c.history == p.history + 8
            assert torch.equal(c.history_items[: p.history], p.history_items)
            assert torch.equal(c.history_actions[: p.history], p.history_actions)
    # a user's data does not depend on who shares the batch
    alone = list(gen.case(1, users=[1]))
    assert torch.equal(alone[3].requests[0].candidates, batches[3].requests[1].candidates)
    r = batches[0].requests[0]
    assert int(r.history_items.max()) < 1000 and int(r.history_actions.max()) < 5


@pytest.mark.parametrize(
    "kw",
    [dict(stop=41), dict(start=0), dict(step=0), dict(targets=-1), dict(num_items=0)],
)
def test_generator_rejects_bad_arguments(kw):
    with pytest.raises(ValueError):
        _gen(**kw)


def test_pack_requests_layout():
    from hstu_kernels.model.ranking import pack_requests

    gen = _gen(start=8, stop=16, step=8, targets=3)
    batch = list(gen.case(2))[1]  # histories 16, 16
    p = pack_requests(batch, num_actions=5, cached=[8, 16])
    assert p.new == (8, 0) and p.targets == (3, 3) and p.histories == (16, 16)
    r0, r1 = batch.requests
    assert torch.equal(p.items, torch.cat([r0.history_items[8:], r0.candidates, r1.candidates]))
    assert p.actions[:8].tolist() == r0.history_actions[8:].tolist()
    assert p.actions[8:].tolist() == [5] * 6  # the reserved candidate action
    assert p.positions.tolist() == list(range(8, 16)) + [16] * 6
    assert p.target_rows.tolist() == [8, 9, 10, 11, 12, 13]
    with pytest.raises(ValueError, match="cached"):
        pack_requests(batch, 5, cached=[17, 0])


# --------------------------------------------------------------------------- report and plots


def _fake_results(tmp_path):
    path = tmp_path / "fake.json"
    entries = [
        {"bench": "e2e", "case": f"b{b}", "impl": impl, "batch": b, "time_ms": t, **extra}
        for b in (1, 2)
        for impl, t, extra in (
            ("baseline", 10.0 * b, {}),
            ("kvcache+graphs", 4.0 * b, {"baseline_ms": 10.0 * b, "speedup": 2.5}),
        )
    ]
    entries.append({"bench": "kernel", "case": "delta", "impl": "triton", "time_ms": 0.1})
    path.write_text(json.dumps({"card": "cpu", "arch": "cpu", "results": entries}))
    return path


def test_report_renders_tables(tmp_path):
    from bench import report

    text = report.render_files([_fake_results(tmp_path)])
    assert "End-to-end ranking inference" in text and "Attention kernels" in text
    assert "| b2 | kvcache+graphs | 2 | 8.00 | 20.00 | 2.50 |" in text


def test_kernel_plot_groups_every_shape():
    """The kernel bench names its cases by kind (several shapes each): a bar group per shape."""
    from bench import plots

    a = {"case": "jagged", "batch": 8, "heads": 4, "head_dim": 256}
    b = {"case": "jagged", "batch": 8, "heads": 8, "head_dim": 128}
    assert plots._case_label(a) != plots._case_label(b)
    assert plots._case_label({"case": "b1"}) == "b1"


def test_quick_runs_keep_full_results_apart():
    from bench import common

    assert common.results_path("card", quick=True).name == "card-quick.json"
    assert common.results_path("card").name == "card.json"


def test_plots_written(tmp_path):
    pytest.importorskip("matplotlib")
    from bench import plots

    written = plots.write_plots(_fake_results(tmp_path))
    assert sorted(p.name for p in written) == ["fake-e2e.png", "fake-kernel.png"]
    assert all(p.stat().st_size > 1000 for p in written)


# --------------------------------------------------------------------------- the ranking model


def _tiny_model(device="cpu", dtype=torch.float32, **kw):
    from hstu_kernels.model.ranking import HSTURankingModel, RankingConfig

    config = RankingConfig.tiny(dtype=dtype, **kw)
    return HSTURankingModel(config, device=device)


def _requests(model, **kw):
    c = model.config
    args = dict(start=5, stop=53, step=16, targets=3, seed=1)  # odd lengths, page edges
    args.update(kw)
    return SyntheticRequests(num_items=c.num_items, num_actions=c.num_actions, **args)


def _assert_same_scores(out, ref32, ref_lowp):
    from hstu_kernels.testing import assert_hstu_close

    assert out.shape == ref32.shape
    assert_hstu_close(out.float(), ref32.float(), ref_lowp.float())


def test_kvcache_scores_match_baseline_cpu():
    """DESIGN.md §5 rule on the scores: cached == recomputed, batch after batch, while the
    cache grows (fp32 on the CPU, so the low-precision reference is the fp32 one)."""
    model = _tiny_model()
    # On the CPU the graphs mode runs its runner's eager fallback: the same code path around it.
    caches = {m: model.make_cache() for m in ("kvcache", "kvcache+graphs")}
    batches = list(_requests(model).case(3))
    assert [b.new for b in batches[1:]] == [[16] * 3] * 3
    for batch in batches:
        ref = model.score(batch, "baseline")
        for mode, cache in caches.items():
            out = model.score(batch, mode, cache)
            _assert_same_scores(out, ref, ref)
            assert out.shape[0] == 3 * 3
    for cache in caches.values():
        assert [cache.cached_length(u) for u in (0, 1, 2)] == [53] * 3
    # the scores depend on the history: the last batch's differ from the first's
    assert not torch.allclose(model.score(batches[0], "baseline"), ref)


def test_kvcache_scores_match_baseline_with_host_offload():
    """A pool that holds one user at a time: every batch offloads the other user to the host
    and onloads this one; the scores still match the baseline."""
    model = _tiny_model(max_history=64, page_size=16)
    cache = model.make_cache(num_pages=1 + 4, host_pages=16)
    gen = _requests(model, stop=53)
    for i in range(gen.num_requests):
        for user in (0, 1):
            batch = next(b for b in gen.case(1, users=[user]) if b.index == i)
            ref = model.score(batch, "baseline")
            out = model.score(batch, "kvcache", cache)
            _assert_same_scores(out, ref, ref)
            assert cache.location(user) == "device"
    assert cache.stats["onloaded"] >= 2 and cache.stats["offloaded"] >= 2
    cache.check_invariants()


def test_model_rejects_bad_calls():
    model = _tiny_model(max_history=32)
    batch = next(_requests(model, stop=53).case(1))
    with pytest.raises(ValueError, match="mode"):
        model.score(batch, "fast")
    with pytest.raises(TypeError, match="cache"):
        model.score(batch, "kvcache")
    with pytest.raises(ValueError, match="cache"):
        model.score(batch, "baseline", model.make_cache())
    long = list(_requests(model, stop=53).case(1))[-1]
    with pytest.raises(ValueError, match="history"):
        model.score(long, "baseline")
    cache = model.make_cache()
    model.score(next(_requests(model, start=21, stop=21).case(1)), "kvcache", cache)
    with pytest.raises(ValueError, match="extend what is cached"):
        model.score(batch, "kvcache", cache)  # 5 tokens, but 21 are cached


@pytest.mark.gpu
def test_three_modes_same_scores_gpu():
    """bf16 on the GPU: baseline, kvcache and kvcache+graphs against the fp32 baseline, with
    the tolerance of DESIGN.md §5 (twice the bf16 baseline's own error)."""
    from hstu_kernels.model.ranking import MODES, HSTURankingModel

    dims = dict(num_layers=2, hidden=256, heads=2, head_dim=128, max_batch=8, max_history=512)
    dims.update(max_targets=32)
    model = _tiny_model("cuda", torch.bfloat16, num_tasks=4, **dims)
    # fp32 through the reference backend (a kernel's fp32 path may round through tf32)
    ref_config = dataclasses.replace(model.config, dtype=torch.float32, backend="reference")
    model32 = HSTURankingModel(ref_config, device="cuda")
    model32.load_state_dict(model.state_dict())
    gen = _requests(model, start=37, stop=485, step=64, targets=19)
    caches = {m: model.make_cache() for m in MODES if m != "baseline"}
    for bs in (1, 3):
        for cache in caches.values():
            cache.clear()
        # The rule's max is taken over all scores of the case (8 batches): a max over a
        # handful of numbers would make "twice the bf16 error" a coin toss.
        ref32, ref_lowp, outs = [], [], {m: [] for m in caches}
        for batch in gen.case(bs):
            ref32.append(model32.score(batch, "baseline").float())
            ref_lowp.append(model.score(batch, "baseline").float())
            for mode, cache in caches.items():
                outs[mode].append(model.score(batch, mode, cache).float())
        for mode in caches:
            _assert_same_scores(torch.cat(outs[mode]), torch.cat(ref32), torch.cat(ref_lowp))
        assert caches["kvcache+graphs"].cached_length(bs - 1) == 485
    assert model.graph_runner(caches["kvcache+graphs"]).captured, "no CUDA graph was used"


# --------------------------------------------------------------------------- the suite


def test_suite_quick_run_cpu(tmp_path, capsys):
    """``python -m bench --quick`` completes on the CPU and says it is a reference run."""
    if torch.cuda.is_available():
        pytest.skip("the CPU smoke run; the GPU runs the real suite")
    from bench.__main__ import main

    path = tmp_path / "cpu.json"
    assert main(["--quick", "--results", str(path)]) == 0
    text = capsys.readouterr().out
    assert "No CUDA GPU found" in text
    data = json.loads(path.read_text())
    e2e = [r for r in data["results"] if r["bench"] == "e2e"]
    assert {r["impl"] for r in e2e} == {"baseline", "kvcache"}
    assert all(r["time_ms"] > 0 for r in e2e)
    assert (tmp_path / "cpu-e2e.png").exists()


def test_e2e_failing_mode_keeps_the_others(tmp_path, monkeypatch):
    """A mode that raises is reported (the run raises at the end), the others are written."""
    if torch.cuda.is_available():
        pytest.skip("the CPU smoke run")
    from bench import e2e
    from hstu_kernels.model import HSTUBlock

    def broken(self, *args, **kwargs):
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(HSTUBlock, "forward_cached", broken)
    path = tmp_path / "r.json"
    with pytest.raises(RuntimeError, match="batch 1 kvcache"):
        e2e.run(quick=True, path=path, batch_sizes=(1,), log=lambda *a: None)
    written = json.loads(path.read_text())["results"]
    assert [r["impl"] for r in written] == ["baseline"]


@pytest.mark.parametrize(
    "history,new,targets,contexts,window",
    [(50, 50, 5, 0, 0), (50, 50, 5, 3, 0), (50, 50, 5, 0, 7), (50, 20, 5, 3, 7),
     (50, 50, 5, 3, 60), (40, 10, 0, 40, 1), (40, 1, 3, 2, 39)],
)  # fmt: skip
def test_kernel_bench_counts_the_pairs_of_the_mask(history, new, targets, contexts, window):
    """The kernel bench's FLOP count: the valid pairs of the DESIGN.md section 1 rule on
    clamped ids, counted pair by pair here."""
    from bench.kernels import Case

    def ids(p: int) -> int:
        if contexts == 0:
            return min(p, history)
        return min(max(p - contexts + 1, 0), history - contexts + 1)

    valid = 0
    for p in range(history - new, history + targets):
        for j in range(history + targets):
            d = ids(p) - ids(j)
            valid += (
                p == j
                or (d > 0 and (window == 0 or d <= window))
                or (contexts > 0 and ids(p) == 0 and ids(j) < ids(history))
            )
    case = Case("jagged", 2, 1, 64, history, targets, new, contexts=contexts, window=window)
    assert case.pairs() == 2 * valid
