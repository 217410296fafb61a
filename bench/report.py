"""Render results files (DESIGN.md §7) as markdown: ``python -m bench.report [FILE ...]``.

With no arguments it renders every ``bench/results/*.json``. The README's results tables are
this output, so they can be regenerated from the JSON at any time.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench import common

# Column order; a column appears only if some entry of the table has the field.
COLUMNS = (
    ("case", "case"),
    ("impl", "impl"),
    ("backend", "backend"),
    ("batch", "batch"),
    ("heads", "heads"),
    ("head_dim", "head dim"),
    ("page_size", "page"),
    ("layers", "layers"),
    ("hidden", "hidden"),
    ("history", "history"),
    ("cached", "cached"),
    ("targets", "targets"),
    ("num_contexts", "C"),
    ("max_attn_len", "W"),
    ("batches", "batches"),
    ("time_ms", "time (ms)"),
    ("tflops", "TFLOP/s"),
    ("kv_tbps", "KV TB/s"),
    ("baseline_ms", "baseline (ms)"),
    ("speedup", "speedup"),
    ("import_ms", "import (ms)"),
    ("host_us", "host µs per call"),
)
TITLES = {
    "kernel": "Attention kernels",
    "block": "HSTU block",
    "e2e": "End-to-end ranking inference",
    "host": "Host time per eager call",
}


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if value >= 100:
            return f"{value:.1f}"
        if value >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def table(entries: list[dict[str, Any]]) -> str:
    """A markdown table of ``entries`` with the columns they use."""
    cols = [(k, title) for k, title in COLUMNS if any(k in e for e in entries)]
    lines = [
        "| " + " | ".join(t for _, t in cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    for e in entries:
        lines.append("| " + " | ".join(_fmt(e[k]) if k in e else "" for k, _ in cols) + " |")
    return "\n".join(lines)


def render(data: dict[str, Any]) -> str:
    """Markdown for one results file: card, versions, date, then one table per bench."""
    versions = ", ".join(f"{k} {v}" for k, v in sorted(data.get("versions", {}).items()))
    out = [f"### {data.get('card', '?')} ({data.get('arch', '?')}), {data.get('date', '?')}", ""]
    if versions:
        out += [f"Versions: {versions}.", ""]
    ceilings = data.get("ceilings") or {}
    if ceilings:
        parts = []
        if "bf16_matmul_tflops" in ceilings:
            parts.append(f"bf16 matmul {ceilings['bf16_matmul_tflops']} TFLOP/s")
        if "copy_tbps" in ceilings:
            parts.append(f"copy {ceilings['copy_tbps']} TB/s")
        out += [f"Measured ceilings: {', '.join(parts)}.", ""]
    results = data.get("results", [])
    benches = list(dict.fromkeys(r.get("bench", "?") for r in results))
    for bench in benches:
        entries = [r for r in results if r.get("bench") == bench]
        out += [f"#### {TITLES.get(bench, bench)}", "", table(entries), ""]
    return "\n".join(out)


def render_files(paths: Iterable[Path]) -> str:
    """Markdown for several results files, one section each."""
    return "\n".join(render(common.load_results(p)) for p in paths)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("files", nargs="*", type=Path, help="results files (default: all)")
    args = parser.parse_args(argv)
    files = args.files or sorted(common.RESULTS_DIR.glob("*.json"))
    if not files:
        print(f"no results in {common.RESULTS_DIR}", file=sys.stderr)
        return 1
    print(render_files(files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
