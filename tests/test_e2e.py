"""End-to-end ranking model, request generator and the benchmark suite's entry point."""

from __future__ import annotations

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


def test_plots_written(tmp_path):
    pytest.importorskip("matplotlib")
    from bench import plots

    written = plots.write_plots(_fake_results(tmp_path))
    assert sorted(p.name for p in written) == ["fake-e2e.png", "fake-kernel.png"]
    assert all(p.stat().st_size > 1000 for p in written)
