"""What every benchmark shares: the card's name and ceilings, and the results file.

Results live in ``bench/results/<card>.json`` in the format of DESIGN.md §7. Each benchmark
(``kernel``, ``block``, ``e2e``) replaces only its own entries, so the file always holds the
latest run of each.
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def card_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def card_slug(name: str | None = None) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100-80gb-hbm3"``."""
    name = (name or card_name()).lower().removeprefix("nvidia").strip()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cpu"


def card_arch() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def versions() -> dict[str, str]:
    import hstu_kernels

    out = {"torch": torch.__version__, "hstu_kernels": hstu_kernels.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import cutlass

        out["cutlass_dsl"] = cutlass.__version__
    except Exception:  # the DSL is optional
        pass
    return out


def measure_ceilings() -> dict[str, float]:
    """The card's bf16 matmul rate (TFLOP/s) and device copy bandwidth (TB/s, read + write),
    measured on random data."""
    if not torch.cuda.is_available():
        return {}
    from triton.testing import do_bench

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    tflops = 2 * n**3 / (ms * 1e-3) / 1e12
    src = torch.randn(512 * 2**20, device="cuda", dtype=torch.float32)  # 2 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    tbps = 2 * src.numel() * 4 / (ms * 1e-3) / 1e12
    return {"bf16_matmul_tflops": round(tflops, 1), "copy_tbps": round(tbps, 3)}


def results_path(slug: str | None = None, *, quick: bool = False) -> Path:
    """``bench/results/<card>.json``; a ``--quick`` run's go to ``<card>-quick.json``, so that
    a smoke run never replaces a full run's figures."""
    return RESULTS_DIR / f"{slug or card_slug()}{'-quick' if quick else ''}.json"


def load_results(path: Path) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    return {"results": []}


def write_results(
    bench: str,
    entries: list[dict[str, Any]],
    *,
    ceilings: dict[str, float] | None = None,
    path: Path | None = None,
) -> Path:
    """Replace ``bench``'s entries in this card's results file (other benches' stay)."""
    path = path or results_path()
    data = load_results(path)
    # A package this run lacks (the DSL, say) keeps the version the other benches' rows ran
    # with, rather than vanishing from the file.
    merged_versions = {**data.get("versions", {}), **versions()}
    data.update(
        card=card_name(),
        arch=card_arch(),
        date=datetime.date.today().isoformat(),
        versions=merged_versions,
    )
    if ceilings:
        data["ceilings"] = ceilings
    kept = [r for r in data.get("results", []) if r.get("bench") != bench]
    for e in entries:
        if e.get("bench") != bench:
            raise ValueError(f"entry {e} does not belong to bench {bench!r}")
    data["results"] = kept + entries
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


class Progress:
    """One progress display for a whole run of the suite: each member adds its cases
    (:meth:`start`) and ticks them off (:meth:`step`); the display shows the suite's cases
    done and known so far, the member and its current case, and the elapsed time. It writes
    to stderr: through tqdm where it is installed, otherwise one line per case."""

    def __init__(self) -> None:
        self.total = 0
        self.done = 0
        self.member = ""
        self._t0: float | None = None
        self._bar: Any = None

    def start(self, member: str, cases: int) -> None:
        """``member`` begins ``cases`` cases."""
        import time

        if self._t0 is None:
            self._t0 = time.perf_counter()
        self.member = member
        self.total += cases
        if self._bar is None:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                import sys

                self._bar = tqdm(total=self.total, unit="case", file=sys.stderr, desc="bench")
        else:
            self._bar.total = self.total
            self._bar.refresh()

    def step(self, case: str = "") -> None:
        """One case of the current member finished (``case``: what it was)."""
        import sys
        import time

        self.done += 1
        label = f"{self.member}: {case}" if case else self.member
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=False)
            self._bar.update(1)
        else:
            elapsed = time.perf_counter() - (self._t0 or time.perf_counter())
            print(f"[bench {self.done}/{self.total} {elapsed:5.0f} s] {label}", file=sys.stderr,
                  flush=True)  # fmt: skip

    def close(self) -> None:
        """End the display (the next :meth:`start` begins a new one)."""
        if self._bar is not None:
            self._bar.close()
        self.__init__()


_PROGRESS = Progress()


def progress() -> Progress:
    """The process-wide display every member reports to (one across ``python -m bench``)."""
    return _PROGRESS
