"""PNG plots of a results file, written beside it: ``<card>-<bench>.png``.

One chart per bench: grouped bars of ``time_ms`` per case, one bar per implementation, with
speed-ups over the baseline written above the bars when entries carry them. ``e2e`` gets a
chart of its own (total ms per batch size for each mode, and the speed-up).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import common

__all__ = ["plot_e2e", "plot_grouped", "write_plots"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on the GPU machine or CI
    import matplotlib.pyplot as plt

    return plt


def _case_label(e: dict[str, Any]) -> str:
    """One bar group per case *and shape*: the kernel bench names its cases by kind only
    (``jagged``, ``delta``), several shapes each."""
    label = str(e.get("case", ""))
    shape = []
    if "batch" in e:
        shape.append(f"B={e['batch']}")
    if "heads" in e and "head_dim" in e:
        shape.append(f"{e['heads']}x{e['head_dim']}")
    if e.get("num_contexts") or e.get("max_attn_len"):
        shape.append(f"C={e.get('num_contexts', 0)} W={e.get('max_attn_len', 0)}")
    return " ".join([label, *shape]).strip() or "?"


def plot_grouped(entries: Sequence[dict[str, Any]], title: str, out: Path) -> Path:
    """Bars of ``time_ms``: one group per case, one bar per ``impl``."""
    plt = _pyplot()
    cases = list(dict.fromkeys(_case_label(e) for e in entries))
    impls = list(dict.fromkeys(str(e.get("impl", "?")) for e in entries))
    width = 0.8 / max(len(impls), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(cases) * max(len(impls), 1) / 2), 4.5))
    for j, impl in enumerate(impls):
        offset = (j - (len(impls) - 1) / 2) * width
        for i, case in enumerate(cases):
            hit = [e for e in entries if _case_label(e) == case and str(e.get("impl")) == impl]
            if not hit:
                continue
            (bar,) = ax.bar([i + offset], [hit[0]["time_ms"]], width, color=f"C{j}")
            if "speedup" in hit[0]:
                ax.annotate(
                    f"{hit[0]['speedup']:.2f}x",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
        ax.bar([], [], color=f"C{j}", label=impl)  # one legend entry per impl
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=30 if len(cases) > 6 else 0, ha="right", fontsize=8)
    ax.set_ylabel("time (ms)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_e2e(
    entries: Sequence[dict[str, Any]],
    title: str,
    out: Path,
    reference: dict[int, float] | None = None,
) -> Path:
    """Total ms per case (all batches of it) for each mode, by batch size, plus speed-ups.
    ``reference``: published speed-ups by batch size, drawn as markers (the seed's L20)."""
    plt = _pyplot()
    batches = sorted({e["batch"] for e in entries if "batch" in e})
    impls = list(dict.fromkeys(str(e.get("impl", "?")) for e in entries))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    width = 0.8 / max(len(impls), 1)
    for j, impl in enumerate(impls):
        ys = []
        for b in batches:
            hit = [e for e in entries if e.get("batch") == b and str(e.get("impl")) == impl]
            ys.append(hit[0]["time_ms"] if hit else 0.0)
        xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(batches))]
        ax.bar(xs, ys, width, label=impl, color=f"C{j}")
        sp = [
            (b, e["speedup"])
            for b in batches
            for e in entries
            if e.get("batch") == b and str(e.get("impl")) == impl and "speedup" in e
        ]
        if sp:
            xs2, ys2 = [str(b) for b, _ in sp], [s for _, s in sp]
            ax2.plot(xs2, ys2, marker="o", label=impl, color=f"C{j}")
            for x, s in zip(xs2, ys2, strict=True):
                ax2.annotate(
                    f"{s:.2f}x", (x, s), textcoords="offset points", xytext=(0, 6), fontsize=8
                )
    ax.set_xticks(range(len(batches)))
    ax.set_xticklabels([str(b) for b in batches])
    ax.set_xlabel("users per batch")
    ax.set_ylabel("total time per case (ms)")
    ax.set_title("time per case")
    ax.legend(fontsize=8)
    shown = [b for b in batches if reference and b in reference]
    if shown:
        ax2.plot(
            [str(b) for b in shown],
            [reference[b] for b in shown],
            "kx",
            ms=9,
            label="seed, L20 (kvcache+graphs)",
        )
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set_ylim(bottom=0)
    ax2.set_xlabel("users per batch")
    ax2.set_ylabel("speed-up over baseline")
    ax2.set_title("speed-up")
    ax2.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_plots(path: Path) -> list[Path]:
    """One PNG per bench of the results file at ``path``; returns the files written.

    A bench that draws its own plot (a ``<stem>-<bench>-*.png`` beside the results, e.g.
    ``bench.block``'s sweep) gets no generic one."""
    data = common.load_results(path)
    card = data.get("card", path.stem)
    written = []
    results = data.get("results", [])
    for bench in dict.fromkeys(r.get("bench", "?") for r in results):
        entries = [r for r in results if r.get("bench") == bench and "time_ms" in r]
        if not entries:
            continue
        out = path.with_name(f"{path.stem}-{bench}.png")
        if any(path.parent.glob(f"{path.stem}-{bench}-*.png")):
            continue
        title = f"{bench} on {card}"
        if bench == "e2e":
            from bench.e2e import TARGET_SPEEDUP

            written.append(plot_e2e(entries, title, out, TARGET_SPEEDUP))
        else:
            written.append(plot_grouped(entries, title, out))
    return written
