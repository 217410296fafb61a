"""HSTU block benchmark: the seed's "HSTU layers with KV cache".

8 HSTU layers, hidden 1024, 4 heads x 256, bf16, pages of 32 tokens; batch 1/2/4/8, history
256..4096 in steps of 256, 256 targets or none. Two paths per case, measured in the same run:

- *baseline*: no cache, every history token recomputed (``HSTUBlock.forward_uncached``);
- *KV cache*: only the last 128 history tokens are new, the rest is cached; the block runs
  through the CUDA-graph runner (``CachedBlockGraphs``): a call copies the metadata and
  inputs into the graph's buffers and replays it. ``cache.prepare`` is not timed here (it is
  host work that overlaps the GPU in a serving loop; the e2e benchmark includes it).

Each case also gets its *floor*: for every kernel the block launches, FLOPs over the card's
measured bf16 matmul rate plus bytes moved over its measured copy bandwidth, summed. Times
are ``triton.testing.do_bench`` medians (L2 flushed between calls) on random data.

``python -m bench.block [--quick]``; without a GPU it runs a tiny fp32 version on the CPU
with the reference backend and says so (those numbers say nothing about any GPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from bench import common

BARS = {  # (batch, targets) -> (cached ms, uncached ms) at history 4096, 3968 cached (H100)
    (8, 256): (1.6, 11.0),
    (8, 0): (0.8, 10.0),
    (1, 256): (0.4, 1.5),
}


@dataclass(frozen=True)
class Plan:
    batches: tuple[int, ...] = (1, 2, 4, 8)
    histories: tuple[int, ...] = tuple(range(256, 4097, 256))
    targets: tuple[int, ...] = (256, 0)
    new: int = 128
    layers: int = 8
    hidden: int = 1024
    heads: int = 4
    head_dim: int = 256
    page_size: int = 32
    dtype: torch.dtype = torch.bfloat16
    device: str = "cuda"
    graphs: bool = True
    baseline_graphs: bool = True  # also time the uncached block from a CUDA graph
    # The cached path's pools, each timed on the same inputs: None (dtype) or FP8 (e4m3)
    kv_dtypes: tuple[torch.dtype | None, ...] = (None,)
    note: str = ""
    extra: dict = field(default_factory=dict)


def make_plan(*, quick: bool = False, gpu: bool | None = None) -> Plan:
    """The seed's sweep on a GPU (``quick``: the bar cases and a few more); a tiny fp32
    version on the CPU."""
    gpu = torch.cuda.is_available() if gpu is None else gpu
    if not gpu:
        return Plan(
            batches=(1, 2),
            histories=(64, 128),
            targets=(16, 0),
            new=16,
            layers=2,
            hidden=64,
            heads=2,
            head_dim=32,
            page_size=16,
            dtype=torch.float32,
            device="cpu",
            graphs=False,
            note="CPU, reference backend, tiny fp32 shapes: says nothing about GPU speed",
        )
    if quick:
        return Plan(batches=(1, 8), histories=(1024, 4096))
    return Plan()


# --- floors ---------------------------------------------------------------------------------


def attention_pairs(history: int, new: int, targets: int) -> int:
    """Valid (query, key) pairs of one sequence's rows ``history-new .. history+targets-1``."""
    h0 = history - new
    hist_rows = new * h0 + new * (new + 1) // 2  # row at position p sees p + 1 keys
    return hist_rows + targets * (history + 1)


def layer_kernels(plan: Plan, batch: int, history: int, targets: int, cached: bool) -> list:
    """(name, FLOPs, bytes read + written) of every kernel of one layer, as the block launches
    them on CUDA (layer.py); a kernel's floor is FLOPs / matmul rate + bytes / bandwidth."""
    e = torch.finfo(plan.dtype).bits // 8
    hd, hid = plan.heads * plan.head_dim, plan.hidden
    new = plan.new if cached else history
    n = batch * (new + targets)  # query rows
    pairs = batch * attention_pairs(history, new, targets)
    kv_read = batch * (history + targets) * 2 * hd  # every key/value read once
    out = [
        ("layernorm_in", 0, 2 * n * hid * e),
        # SiLU in the GEMM's epilogue (backends/triton/projection.py; when the chooser takes cuBLAS plus
        # a SiLU pass instead, that pass's 2 * n * 4 * hd * e bytes come on top).
        ("uvqk_matmul_silu", 2 * n * hid * 4 * hd, (n * hid + hid * 4 * hd + n * 4 * hd) * e),
        ("attention", 4 * plan.heads * plan.head_dim * pairs, (2 * n * hd + kv_read) * e),
        ("layernorm_mul_u", 0, 3 * n * hd * e),
        ("out_matmul_residual", 2 * n * hd * hid, (n * hd + hd * hid + 2 * n * hid) * e),
    ]
    if cached:
        out.append(("append_kv", 0, 2 * batch * new * 2 * hd * e))
    return out


def floor_ms(
    plan: Plan,
    batch: int,
    history: int,
    targets: int,
    cached: bool,
    ceil: dict,
    *,
    overlap: bool = False,
) -> float:
    """Sum over the block's kernels of FLOPs / matmul rate + bytes / copy bandwidth.

    ``overlap``: each kernel's max of the two instead of their sum (a kernel that streams its
    bytes while it computes can reach it; the sum cannot be beaten by one that does not)."""
    flops_rate = ceil["bf16_matmul_tflops"] * 1e12
    bw = ceil["copy_tbps"] * 1e12
    combine = max if overlap else (lambda a, b: a + b)
    per_layer = sum(
        combine(f / flops_rate, b / bw)
        for _, f, b in layer_kernels(plan, batch, history, targets, cached)
    )
    return plan.layers * per_layer * 1e3


# --- measuring ------------------------------------------------------------------------------


def _fill_random(cache) -> None:
    """Random K/V in every page (an FP8 pool: quantised random rows, one layer at a time)."""
    if cache.scales is None:
        cache.pool.normal_()
        return
    from hstu_kernels.reference import fp8

    for layer in range(cache.pool.shape[0]):
        x8, scale = fp8.quantize(torch.randn(cache.pool.shape[1:], device=cache.pool.device))
        cache.pool[layer].copy_(x8)
        cache.scales[layer].copy_(scale)


def _bench(fn, device: str) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=60, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _capture(fn, pool) -> torch.cuda.CUDAGraph:
    """``fn`` captured into a CUDA graph, after two warm-up runs on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph


def _profile(fn, title: str, log) -> None:
    """Print the kernels of three calls of ``fn``, by GPU time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    log(f"--- profile: {title} (3 calls)")
    log(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
    )


def _backends(
    plan: Plan, batch: int, history: int, new: int, targets: int, kv_dtype=None
) -> tuple[str, str]:
    """The attention backends ``auto`` picks for one case: ``(cached, uncached)``, i.e. the
    paged call over the cache (a pool of ``kv_dtype``) and the jagged call over whole
    sequences (the choice can depend on the grid's size)."""
    from hstu_kernels import explain

    common = {"device": plan.device, "dtype": plan.dtype, "head_dim": plan.head_dim,
              "batch": batch, "heads": plan.heads}  # fmt: skip
    # the cached layer takes the paged call's split partials unsummed (partials=True)
    paged = explain(
        "paged", page_size=plan.page_size, max_seqlen_q=new + targets, partials=True,
        kv_dtype=kv_dtype, **common,
    )  # fmt: skip
    jagged = explain("jagged", max_seqlen_q=history + targets, **common)
    return paged.choice or "none", jagged.choice or "none"


def measure(
    plan: Plan,
    ceilings: dict,
    log=print,
    progress: bool = True,
    checkpoint=None,
    profile: bool = False,
) -> list[dict[str, Any]]:
    """Time every case of ``plan``; one entry per case (DESIGN.md §7). ``checkpoint(entries)``
    is called every 8 cases (so a run cut short still leaves its results). ``profile``: also
    print each case's top kernels (torch.profiler) for both paths."""
    from hstu_kernels.kvcache import build_jagged_metadata
    from hstu_kernels.model import HSTUBlock
    from hstu_kernels.model.graphs import CachedBlockGraphs

    dev = plan.device
    max_hist = max(plan.histories)
    block = HSTUBlock(
        plan.layers, plan.hidden, plan.heads, plan.head_dim,
        scaling_seqlen=max_hist + max(plan.targets), dtype=plan.dtype, device=dev,
    )  # fmt: skip
    max_b = max(plan.batches)
    pages = max_b * -(-max_hist // plan.page_size) + 2
    runners = {}
    for kv_dtype in plan.kv_dtypes:
        cache = block.make_cache(num_pages=pages, page_size=plan.page_size, kv_dtype=kv_dtype)
        _fill_random(cache)  # cached K/V: random, never zeros
        runners[kv_dtype] = CachedBlockGraphs(
            block, cache, batch_buckets=plan.batches,
            max_tokens=max_b * (plan.new + max(plan.targets)), use_graphs=plan.graphs,
        )  # fmt: skip
    pool = torch.cuda.graph_pool_handle() if plan.graphs else None
    gen = torch.Generator().manual_seed(0)

    def randn(rows: int) -> torch.Tensor:
        return torch.randn(rows, plan.hidden, generator=gen).to(dev, plan.dtype)

    # Longest histories first (the bar cases lead): a backend that tunes on the first call of
    # a shape bucket then tunes on history 4096, not on the shortest history.
    top = max(plan.histories)
    cases = [(t, b, top) for t in plan.targets for b in plan.batches]
    cases += [
        (t, b, h)
        for t in plan.targets
        for b in plan.batches
        for h in sorted(plan.histories, reverse=True)
        if h != top
    ]
    if progress:
        common.progress().start("block", len(cases))
    entries = []
    for targets, batch, history in cases:
        new = min(plan.new, history)
        cached = history - new
        users = list(range(batch))
        t_by_kv, x_q = {}, None
        for kv_dtype, runner in runners.items():
            cache = runner.cache
            cache.clear()
            if cached:
                cache.prepare(users, [0] * batch, [cached] * batch, [0] * batch)
            meta = cache.prepare(users, [cached] * batch, [new] * batch, [targets] * batch)
            x_q = randn(meta.num_tokens) if x_q is None else x_q
            # Repeated calls append the same K/V to the same slots: the cache stays as it is.
            t_by_kv[kv_dtype] = _bench(lambda x_q=x_q, meta=meta, r=runner: r(x_q, meta), dev)
        jmeta = build_jagged_metadata([history] * batch, [targets] * batch, dev)
        x_full = randn(jmeta.num_tokens)
        t_full = _bench(lambda x=x_full, m=jmeta: block.forward_uncached(x, m), dev)
        t_full_graph = None
        if plan.graphs and plan.baseline_graphs:
            # The same uncached block replayed from a CUDA graph: what the baseline costs
            # without its host overhead (the seed's baseline has none of it; both are kept).
            graph = _capture(lambda x=x_full, m=jmeta: block.forward_uncached(x, m), pool)
            t_full_graph = _bench(graph.replay, dev)
            del graph
        if profile:
            _profile(lambda x_q=x_q, meta=meta, r=runner: r(x_q, meta), f"B={batch} H={history} "
                     f"T={targets} KV cache", log)  # fmt: skip
            _profile(lambda x=x_full, m=jmeta: block.forward_uncached(x, m), f"B={batch} "
                     f"H={history} T={targets} no cache", log)  # fmt: skip
        del x_full
        for kv_dtype, t_cached in t_by_kv.items():
            fp8 = kv_dtype is not None
            cached_attention, uncached_attention = _backends(
                plan, batch, history, new, targets, kv_dtype
            )
            entry = {
                "bench": "block",
                "case": f"B={batch} H={history} T={targets}",
                "impl": f"kvcache+{'graphs' if plan.graphs else 'eager'}" + ("+fp8" if fp8 else ""),
                "cached_attention": cached_attention,
                "uncached_attention": uncached_attention,
                "batch": batch,
                "heads": plan.heads,
                "head_dim": plan.head_dim,
                "page_size": plan.page_size,
                "layers": plan.layers,
                "hidden": plan.hidden,
                "history": history,
                "cached": cached,
                "targets": targets,
                "dtype": str(plan.dtype).removeprefix("torch."),
                "kv_dtype": str(kv_dtype or plan.dtype).removeprefix("torch."),
                "time_ms": round(t_cached, 4),
                "baseline_ms": round(t_full, 4),
                "speedup": round(t_full / t_cached, 3),
            }
            if t_full_graph is not None:
                entry["baseline_graph_ms"] = round(t_full_graph, 4)
                entry["speedup_vs_graph_baseline"] = round(t_full_graph / t_cached, 3)
            if ceilings and not fp8:
                entry["floor_ms"] = round(
                    floor_ms(plan, batch, history, targets, True, ceilings), 4
                )
                entry["baseline_floor_ms"] = round(
                    floor_ms(plan, batch, history, targets, False, ceilings), 4
                )
                entry["floor_overlap_ms"] = round(
                    floor_ms(plan, batch, history, targets, True, ceilings, overlap=True), 4
                )
                entry["baseline_floor_overlap_ms"] = round(
                    floor_ms(plan, batch, history, targets, False, ceilings, overlap=True), 4
                )
            if plan.note:
                entry["note"] = plan.note
            entries.append(entry)
        if checkpoint is not None and len(entries) % 8 == 0:
            checkpoint(entries)
        if progress:
            times = " / ".join(f"{t:.3f}" for t in t_by_kv.values())
            common.progress().step(f"B={batch} H={history} T={targets}: {times} / {t_full:.3f} ms")
    for runner in runners.values():
        log(f"graph buckets captured: {runner.captured}; waits inside graphs: "
            f"{runner.graph_waits}")  # fmt: skip
    from hstu_kernels.backends.triton import rows

    if rows._BROKEN:
        log(f"the layer's Triton row kernels were OFF: {rows._BROKEN[0]}")
    return entries


# --- reporting ------------------------------------------------------------------------------


def summary(entries: list[dict[str, Any]], card: str) -> str:
    """A table of the longest-history cases, with the H100 bars where they apply (the 16-bit
    pools), and each FP8 pool's time against the 16-bit one."""
    fp8 = [e for e in entries if e["impl"].endswith("+fp8")]
    entries = [e for e in entries if not e["impl"].endswith("+fp8")]
    top = max(e["history"] for e in entries)
    rows = [e for e in entries if e["history"] == top]
    nan = float("nan")
    lines = [
        f"block on {card}, history {top} ({rows[0]['cached']} cached). ms per call; floors as "
        "sum/overlapped; uncached eager and from a CUDA graph",
        f"{'B':>3} {'T':>4} {'cached':>8} {'floor':>13} {'uncached':>9} {'graph':>8} "
        f"{'floor':>13} {'speedup':>8}  bar (H100: cached / uncached)",
    ]
    for e in sorted(rows, key=lambda e: (-e["targets"], e["batch"])):
        b = BARS.get((e["batch"], e["targets"]))
        verdict = ""
        if b and top == 4096:
            best = min(e["baseline_ms"], e.get("baseline_graph_ms", e["baseline_ms"]))
            ok = ["ok" if t <= lim else "MISS" for t, lim in ((e["time_ms"], b[0]), (best, b[1]))]
            verdict = f"<= {b[0]} / {b[1]}: {ok[0]} / {ok[1]}"
        f1 = f"{e.get('floor_ms', nan):.3f}/{e.get('floor_overlap_ms', nan):.3f}"
        f2 = f"{e.get('baseline_floor_ms', nan):.3f}/{e.get('baseline_floor_overlap_ms', nan):.3f}"
        lines.append(
            f"{e['batch']:>3} {e['targets']:>4} {e['time_ms']:>8.3f} {f1:>13} "
            f"{e['baseline_ms']:>9.3f} {e.get('baseline_graph_ms', nan):>8.3f} {f2:>13} "
            f"{e['speedup']:>7.2f}x  {verdict}"
        )
    same = {(e["case"], e["impl"] + "+fp8"): e for e in entries}
    for e in fp8:
        bf = same.get((e["case"], e["impl"]))
        if bf is not None and e["history"] == top:
            lines.append(
                f"FP8 pool, {e['case']}: {e['time_ms']:.3f} ms, {e['time_ms'] / bf['time_ms']:.3f}x"
                f" the {bf['kv_dtype']} pool's {bf['time_ms']:.3f}"
            )
    return "\n".join(lines)


def plot(entries: list[dict[str, Any]], card: str, out: Path) -> Path:
    """Like the seed's charts: ms per call against history (cached solid, baseline dashed),
    and the speed-up, one row per target count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in entries if not e["impl"].endswith("+fp8")]  # the 16-bit pools
    targets = sorted({e["targets"] for e in entries}, reverse=True)
    batches = sorted({e["batch"] for e in entries})
    fig, axes = plt.subplots(len(targets), 2, figsize=(12, 4.2 * len(targets)), squeeze=False)
    for row, t in enumerate(targets):
        ax, ax2 = axes[row]
        for i, b in enumerate(batches):
            pts = sorted(
                (e["history"], e["time_ms"], e["baseline_ms"], e["speedup"],
                 e.get("baseline_graph_ms"))
                for e in entries
                if e["targets"] == t and e["batch"] == b
            )  # fmt: skip
            if not pts:
                continue
            h = [p[0] for p in pts]
            ax.plot(h, [p[2] for p in pts], "--", color=f"C{i}", label=f"B={b} no cache")
            if all(p[4] is not None for p in pts):
                ax.plot(h, [p[4] for p in pts], ":", color=f"C{i}", label=f"B={b} no cache, graph")
            ax.plot(h, [p[1] for p in pts], "-o", ms=3, color=f"C{i}", label=f"B={b} KV cache")
            if all(p[4] is not None for p in pts):
                ax2.plot(
                    h, [p[4] / p[1] for p in pts], "-o", ms=3, color=f"C{i}",
                    label=f"B={b} over no cache, graph",
                )  # fmt: skip
                ax2.plot(
                    h, [p[3] for p in pts], "--", lw=0.8, color=f"C{i}",
                    label=f"B={b} over no cache, eager",
                )  # fmt: skip
            else:
                ax2.plot(h, [p[3] for p in pts], "-o", ms=3, color=f"C{i}", label=f"B={b}")
        ax.set_yscale("log")
        e0 = entries[0]
        ax.set_xlabel(
            f"history length (tokens; last {e0['history'] - e0['cached']} new with the cache)"
        )
        ax.set_ylabel(f"ms per call ({e0['layers']} layers)")
        ax.set_title(f"HSTU block, {t} targets")
        ax.legend(fontsize=7, ncol=2)
        ax2.set_xlabel("history length (tokens)")
        ax2.set_ylabel("speed-up of KV cache + CUDA graphs")
        ax2.set_title(f"speed-up, {t} targets")
        ax2.axhline(1.0, color="grey", lw=0.8)
        ax2.legend(fontsize=7)
    e0 = entries[0]
    fig.suptitle(
        f"HSTU block ({e0['layers']} layers, hidden {e0['hidden']}, {e0['heads']}x"
        f"{e0['head_dim']} heads, {e0['dtype']}, pages of {e0['page_size']}) on {card}"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run(
    *,
    quick: bool = False,
    path: Path | None = None,
    plan: Plan | None = None,
    log=print,
    make_plot: bool = True,
    profile: bool = False,
) -> list[dict[str, Any]]:
    """Measure, write this card's results file (``block`` entries) and the sweep plot."""
    plan = plan or make_plan(quick=quick)
    if plan.note:
        log(f"block: {plan.note}")
    ceilings = common.measure_ceilings() if plan.device == "cuda" else {}
    path = path or common.results_path(quick=quick)

    def checkpoint(entries: list[dict[str, Any]]) -> None:
        common.write_results("block", entries, ceilings=ceilings or None, path=path)

    entries = measure(plan, ceilings, log=log, checkpoint=checkpoint, profile=profile)
    checkpoint(entries)
    card = common.card_name()
    log(summary(entries, card))
    if ceilings:
        log(f"ceilings: {ceilings}")
    log(f"results -> {path}")
    if make_plot:
        try:
            png = plot(entries, card, path.with_name(f"{path.stem}-block-sweep.png"))
            log(f"plot -> {png}")
        except ImportError as exc:
            log(f"no plot ({exc})")
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.block", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer cases (the bar cases included)")
    parser.add_argument("--batches", type=str, default=None, help="e.g. 1,8")
    parser.add_argument("--histories", type=str, default=None, help="e.g. 1024,4096")
    parser.add_argument("--targets", type=str, default=None, help="e.g. 256,0")
    parser.add_argument("--no-graphs", action="store_true", help="run the cached path eagerly")
    parser.add_argument(
        "--no-baseline-graphs", action="store_true", help="skip the graph-replayed baseline"
    )
    parser.add_argument("--results", type=Path, default=None, help="results JSON to write")
    parser.add_argument("--profile", action="store_true", help="print each case's top kernels")
    parser.add_argument(
        "--kv-dtypes",
        default="bf16",
        help="the cached path's pools, comma-separated: bf16 (the block's dtype) and/or fp8",
    )
    args = parser.parse_args(argv)
    plan = make_plan(quick=args.quick)
    ints = lambda s: tuple(int(v) for v in s.split(","))
    if args.batches:
        plan = replace(plan, batches=ints(args.batches))
    if args.histories:
        plan = replace(plan, histories=ints(args.histories))
    if args.targets:
        plan = replace(plan, targets=ints(args.targets))
    if args.no_graphs:
        plan = replace(plan, graphs=False)
    if args.no_baseline_graphs:
        plan = replace(plan, baseline_graphs=False)
    kinds = {"bf16": None, "fp8": torch.float8_e4m3fn}
    names = [n.strip() for n in args.kv_dtypes.split(",") if n.strip()]
    if not names or set(names) - set(kinds):
        parser.error(f"--kv-dtypes: expected bf16 and/or fp8, got {args.kv_dtypes!r}")
    plan = replace(plan, kv_dtypes=tuple(kinds[n] for n in names))
    run(plan=plan, path=args.results, profile=args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
