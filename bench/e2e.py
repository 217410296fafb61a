"""End-to-end ranking inference benchmark (the seed's first benchmark).

For each batch size (users per batch: 1, 2, 4, 8) a *case* is the seed's 16 batches: every
user's history grows from 256 to 4096 tokens in steps of 256 across its requests, and every
request ranks 256 candidates. Each mode of :class:`~hstu_kernels.model.ranking.HSTURankingModel`
(``baseline``: no cache, no graphs; ``kvcache``; ``kvcache+graphs``) serves the whole case
from an empty cache, and the case's total wall time is recorded: host packing, embedding
lookup, cache preparation and onload, the block, the head and the copy of each batch's scores
back to the host (a server returns them) are all inside it. Median of ``reps`` runs, after one
warm-up run of each mode (compilation, autotuning and graph capture happen there); the timed
runs go in rounds that serve every mode once each.

Without a GPU the same code runs a tiny model on the reference backend (a smoke test; the
times mean nothing). ``python -m bench.e2e [--quick]``; part of ``python -m bench``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench import common
from hstu_kernels.model.ranking import MODES, HSTURankingModel, RankingConfig
from hstu_kernels.model.requests import RequestBatch, SyntheticRequests

# The seed's performance bar (published for an L20): kvcache+graphs over baseline.
TARGET_SPEEDUP = {1: 1.3, 8: 2.6}
# Modes over an FP8 pool (``--fp8``): the cached modes' ``+fp8`` twins, compared with them.
FP8_SUFFIX = "+fp8"


def ranking_agreement(scores: torch.Tensor, ref: torch.Tensor, candidates: int) -> dict:
    """How far ``scores`` rank each request's ``candidates`` like ``ref`` (both ``[requests *
    candidates, tasks]``, each request's candidates contiguous; the first task): the mean over
    requests of Spearman's correlation and of the top-10 overlap, and the largest |difference|."""
    a = scores[:, 0].reshape(-1, candidates).double()
    b = ref[:, 0].reshape(-1, candidates).double()

    def ranks(x: torch.Tensor) -> torch.Tensor:
        return x.argsort(dim=1).argsort(dim=1).double()

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    spearman = (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))
    k = min(10, candidates)
    top_a, top_b = a.topk(k, dim=1).indices, b.topk(k, dim=1).indices
    overlap = (top_a[:, :, None] == top_b[:, None, :]).any(2).double().mean(1)
    return {
        "spearman": round(spearman.mean().item(), 5),
        "top10_overlap": round(overlap.mean().item(), 4),
        "max_abs_diff": round((scores - ref).abs().max().item(), 5),
    }


@dataclass(frozen=True)
class Plan:
    """What one run measures."""

    config: RankingConfig
    batch_sizes: tuple[int, ...]
    start: int
    stop: int
    step: int
    targets: int
    modes: tuple[str, ...]
    reps: int
    device: str
    # also serve the cached modes over an FP8 pool (modes "<mode>+fp8"), compared with them
    fp8: bool = False

    @property
    def num_batches(self) -> int:
        return (self.stop - self.start) // self.step + 1


def make_plan(*, quick: bool = False, gpu: bool | None = None) -> Plan:
    """The seed's cases on a GPU (``quick``: batch 1 and 8, histories up to 1024, one rep);
    a tiny model on the CPU otherwise."""
    gpu = torch.cuda.is_available() if gpu is None else gpu
    if gpu:
        config = RankingConfig()  # the seed's model, bf16
        if quick:
            return Plan(config, (1, 8), 256, 1024, 256, 256, MODES, 1, "cuda")
        # The bar's cases (1 and 8) first, so a run cut short still has them.
        return Plan(config, (1, 8, 2, 4), 256, 4096, 256, 256, MODES, 3, "cuda")
    # CUDA graphs need a GPU: the CPU run covers the two eager modes.
    modes = tuple(m for m in MODES if m != "kvcache+graphs")
    if quick:
        config = RankingConfig.tiny(num_layers=1, hidden=32, heads=2, head_dim=16, max_history=48)
        return Plan(config, (1, 2), 16, 48, 16, 4, modes, 1, "cpu")
    config = RankingConfig.tiny(max_history=128)
    return Plan(config, (1, 2, 4), 32, 128, 32, 16, modes, 1, "cpu")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def serve_case(
    model: HSTURankingModel, batches: list[RequestBatch], mode: str, cache
) -> tuple[float, list[torch.Tensor]]:
    """Serve every batch of a case in order (the cache cleared first); returns the wall time
    in ms and each batch's scores (on the host)."""
    if cache is not None:
        cache.clear()
    device = model.device.type
    _sync(device)
    t0 = time.perf_counter()
    scores = [model.score(b, mode, cache).to("cpu") for b in batches]
    _sync(device)
    return (time.perf_counter() - t0) * 1e3, scores


def measure(
    plan: Plan,
    model: HSTURankingModel,
    log=print,
    on_case=None,
    failures: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Time every (batch size, mode) of ``plan``; returns the results entries.

    ``on_case(entries)`` is called with the entries so far after each batch size (so a run
    cut short still leaves its finished cases). Each cached mode's scores are compared with
    the baseline's on the same requests and the largest difference is logged. A mode that
    raises is logged, appended to ``failures`` and skipped."""
    c = plan.config
    gen = SyntheticRequests(
        num_items=c.num_items,
        num_actions=c.num_actions,
        start=plan.start,
        stop=plan.stop,
        step=plan.step,
        targets=plan.targets,
        seed=c.seed,
    )
    entries = []
    modes = list(plan.modes)
    if plan.fp8:
        modes += [m + FP8_SUFFIX for m in plan.modes if m != "baseline"]
    common.progress().start("e2e", len(plan.batch_sizes) * len(modes))
    for bs in plan.batch_sizes:
        batches = list(gen.case(bs))
        cache = model.make_cache()
        fp8_cache = None
        if plan.fp8:
            fp8_cache = model.block.make_cache(
                cache.config.num_pages, c.page_size, kv_dtype=torch.float8_e4m3fn
            )
        times: dict[str, float] = {}
        scores: dict[str, torch.Tensor] = {}
        agreement: dict[str, dict] = {}
        runs: dict[str, list] = {}
        # Warm-up (compile, autotune, capture), then timed rounds that serve every mode once
        # each: the host's speed drifts during a run (every mode waits on it), and interleaving
        # spreads the drift over all modes alike. A failing mode is logged and dropped; it
        # must not cost the others' numbers.
        for round_ in range(plan.reps + 1):
            for mode in modes if round_ == 0 else list(runs):
                fp8 = mode.endswith(FP8_SUFFIX)
                pool = None if mode == "baseline" else (fp8_cache if fp8 else cache)
                try:
                    got = serve_case(model, batches, mode.removesuffix(FP8_SUFFIX), pool)
                except Exception:
                    log(f"  batch {bs:2d}  {mode:15s} FAILED:\n{traceback.format_exc()}")
                    if failures is not None:
                        failures.append(f"batch {bs} {mode}")
                    common.progress().step(f"batch {bs} {mode} failed")
                    runs.pop(mode, None)
                    continue
                if round_:
                    runs[mode].append(got)
                else:
                    runs[mode] = []
        for mode, done in runs.items():
            fp8 = mode.endswith(FP8_SUFFIX)
            base_mode = mode.removesuffix(FP8_SUFFIX)
            times[mode] = statistics.median(ms for ms, _ in done)
            scores[mode] = torch.cat(done[-1][1]).float()
            line = f"  batch {bs:2d}  {mode:15s} {times[mode]:10.2f} ms / {len(batches)} batches"
            if mode != "baseline" and "baseline" in scores:
                diff = (scores[mode] - scores["baseline"]).abs().max().item()
                top = scores["baseline"].abs().max().item()
                line += f"   max |score - baseline| {diff:.3g} (max |score| {top:.3g})"
            if fp8 and base_mode in scores:
                agreement[mode] = ranking_agreement(scores[mode], scores[base_mode], plan.targets)
                line += f"   against the 16-bit pool: {agreement[mode]}"
            log(line)
            common.progress().step(f"batch {bs} {mode}: {times[mode]:.1f} ms")
        model.release_graphs(cache)
        if fp8_cache is not None:
            model.release_graphs(fp8_cache)
        del cache, fp8_cache
        if plan.device == "cuda":
            torch.cuda.empty_cache()
        base = times.get("baseline")
        for mode, ms in times.items():
            e = {
                "bench": "e2e",
                "case": f"b{bs}",
                "impl": mode,
                "batch": bs,
                "heads": c.heads,
                "head_dim": c.head_dim,
                "page_size": c.page_size,
                "layers": c.num_layers,
                "hidden": c.hidden,
                "history": plan.stop,
                "targets": plan.targets,
                "batches": len(batches),
                "kv_dtype": "float8_e4m3fn"
                if mode.endswith(FP8_SUFFIX)
                else str(c.dtype).removeprefix("torch."),
                "time_ms": round(ms, 3),
            }
            e.update(agreement.get(mode, {}))
            if mode != "baseline" and base is not None:
                e["baseline_ms"] = round(base, 3)
                e["speedup"] = round(base / ms, 3)
            entries.append(e)
        if on_case is not None:
            on_case(entries)
    return entries


def summary(entries: list[dict[str, Any]]) -> str:
    """Speed-ups of the cached modes, and the seed's bar where it applies."""
    lines = []
    for e in entries:
        if "speedup" not in e:
            continue
        line = (
            f"batch {e['batch']:2d}  {e['impl']:15s} {e['time_ms']:10.2f} ms  "
            f"baseline {e['baseline_ms']:10.2f} ms  speedup {e['speedup']:.2f}x"
        )
        bar = TARGET_SPEEDUP.get(e["batch"])
        if bar is not None and e["impl"] == "kvcache+graphs":
            line += f"  (bar {bar}x: {'met' if e['speedup'] >= bar else 'NOT met'})"
        lines.append(line)
    return "\n".join(lines)


def attention_backends(
    config: RankingConfig, plan: Plan, batch: int, kv_dtype=None
) -> dict[str, str]:
    """The backends the dispatcher picks, on this machine, for each op the model calls over a
    case of ``batch`` users (the choice can depend on the call's size, which grows with the
    history) over a pool of ``kv_dtype``: ``"a+b"`` where the case's calls get more than one."""
    from hstu_kernels import explain

    kw = dict(dtype=config.dtype, head_dim=config.head_dim, backend=config.backend,
              batch=batch, heads=config.heads)  # fmt: skip
    histories = range(plan.start, plan.stop + 1, plan.step)
    jagged = {explain("jagged", max_seqlen_q=h + plan.targets, **kw).choice for h in histories}
    # Each request appends its newest `step` history tokens (the first: `start`) + candidates.
    paged = {
        explain("paged", page_size=config.page_size, max_seqlen_q=n + plan.targets,
                kv_dtype=kv_dtype, **kw).choice
        for n in {plan.start, plan.step}
    }  # fmt: skip
    append = explain("append_kv", page_size=config.page_size, kv_dtype=kv_dtype, **kw).choice

    def names(choices: set) -> str:
        return "+".join(sorted(str(c) for c in choices))

    return {"jagged": names(jagged), "paged": names(paged), "append_kv": str(append)}


def run(
    *,
    quick: bool = False,
    path: Path | None = None,
    batch_sizes: tuple[int, ...] | None = None,
    reps: int | None = None,
    fp8: bool = False,
    log=print,
) -> list[dict[str, Any]]:
    """Run the benchmark and write its entries to the results file (``path``: default
    ``bench/results/<card>.json``); returns the entries. ``batch_sizes`` and ``reps``
    override the plan's."""
    plan = make_plan(quick=quick)
    if batch_sizes is not None:
        plan = dataclasses.replace(plan, batch_sizes=tuple(batch_sizes))
    if reps is not None:
        plan = dataclasses.replace(plan, reps=reps)
    if fp8:
        plan = dataclasses.replace(plan, fp8=True)
    c = plan.config
    if plan.device == "cpu":
        log("e2e: no GPU, tiny model on the reference backend (times are not GPU performance)")
    log(
        f"e2e: {c.num_layers} layers, hidden {c.hidden}, {c.heads} heads x {c.head_dim}, "
        f"{str(c.dtype).removeprefix('torch.')}, histories {plan.start}..{plan.stop} step "
        f"{plan.step}, {plan.targets} candidates, batch sizes {list(plan.batch_sizes)}, "
        f"modes {list(plan.modes)}, {plan.reps} rep(s)"
    )
    backends = {b: attention_backends(c, plan, b) for b in plan.batch_sizes}
    log(f"e2e: attention backends per batch size {backends}")
    model = HSTURankingModel(c, device=plan.device)

    def write(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        order = [*plan.modes, *(m + FP8_SUFFIX for m in plan.modes)]
        entries = sorted(entries, key=lambda e: (e["batch"], order.index(e["impl"])))
        for e in entries:
            if e["impl"].endswith(FP8_SUFFIX):
                ops = attention_backends(c, plan, e["batch"], torch.float8_e4m3fn)
            else:
                ops = backends.get(e["batch"]) or attention_backends(c, plan, e["batch"])
            e["backend"] = ops["jagged" if e["impl"] == "baseline" else "paged"]
        common.write_results("e2e", entries, path=path or common.results_path(quick=quick))
        return entries

    failures: list[str] = []
    entries = write(measure(plan, model, log, on_case=write, failures=failures))
    log(summary(entries))
    if failures:
        raise RuntimeError(f"e2e: failed cases (the others were written): {failures}")
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer, smaller cases")
    parser.add_argument("--results", type=Path, default=None, help="results JSON path")
    parser.add_argument("--batch-sizes", default=None, help="e.g. 1,8 (default: the plan's)")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per mode")
    parser.add_argument(
        "--fp8", action="store_true", help="also serve the cached modes over an FP8 pool"
    )
    args = parser.parse_args(argv)
    sizes = None
    if args.batch_sizes:
        sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    run(quick=args.quick, path=args.results, batch_sizes=sizes, reps=args.reps, fp8=args.fp8)
    return 0


if __name__ == "__main__":
    sys.exit(main())
