"""The whole benchmark suite: ``python -m bench [--quick] [--only kernels,block,e2e]``.

Detects the GPU, runs each benchmark of the suite that is present (``bench.kernels``,
``bench.block``, ``bench.e2e``), writes ``bench/results/<card>.json`` (DESIGN.md §7) and PNG
plots beside it, and prints a summary. Without a GPU it runs each benchmark's small
reference-backend version and says so: those numbers measure nothing about any GPU.

A suite member is a module ``bench.<name>`` with a function
``run(*, quick: bool = False, path: Path | None = None) -> list[dict] | None`` that writes
its entries into ``path`` (through ``bench.common.write_results``) and returns them. Keyword
arguments a member does not take are not passed.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from bench import common

SUITE = ("kernels", "block", "e2e", "host")
# (each member reports its cases to bench.common.progress(): one display for the whole run)


def _load(name: str) -> tuple[Any | None, str | None]:
    """The member module, or ``None`` and why it cannot run."""
    try:
        module = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"bench.{name}":
            return None, "not present in this checkout"
        return None, f"import failed: {exc}"
    except Exception as exc:
        return None, f"import failed: {type(exc).__name__}: {exc}"
    if not callable(getattr(module, "run", None)):
        return None, "has no run() function"
    return module, None


def _call_run(module: Any, **kwargs: Any) -> Any:
    """Call ``module.run`` with the keyword arguments it accepts."""
    params = inspect.signature(module.run).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return module.run(**kwargs)
    return module.run(**{k: v for k, v in kwargs.items() if k in params})


def describe_machine() -> str:
    """One line on what the suite runs on."""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"GPU: {torch.cuda.get_device_name()} (sm_{major}{minor}), torch {torch.__version__}"
    return (
        "No CUDA GPU found: running the small reference-backend version of each benchmark "
        "(tiny shapes on the CPU; these numbers say nothing about GPU performance)."
    )


def main(argv: list[str] | None = None) -> int:
    """Run the suite; returns the process exit code (1 if any member failed)."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer, smaller cases")
    parser.add_argument(
        "--only",
        default=",".join(SUITE),
        help=f"comma-separated members to run (default: {','.join(SUITE)})",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="results JSON to write (default: bench/results/<card>.json)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SUITE))
    if unknown:
        parser.error(f"--only: unknown members {unknown} (have {list(SUITE)})")

    path = args.results or common.results_path(quick=args.quick)
    print(describe_machine(), flush=True)
    print(f"results -> {path}" + ("  (quick run)" if args.quick else ""), flush=True)

    failed = []
    for i, name in enumerate(names, 1):
        module, why = _load(name)
        if module is None:
            print(f"[{i}/{len(names)}] {name}: skipped ({why})", flush=True)
            continue
        print(f"[{i}/{len(names)}] {name}: running ...", flush=True)
        t0 = time.perf_counter()
        try:
            entries = _call_run(module, quick=args.quick, path=path)
        except Exception:
            traceback.print_exc()
            print(f"[{i}/{len(names)}] {name}: FAILED", flush=True)
            failed.append(name)
            continue
        n = len(entries) if entries is not None else "?"
        print(
            f"[{i}/{len(names)}] {name}: done in {time.perf_counter() - t0:.1f} s, {n} entries",
            flush=True,
        )

    common.progress().close()
    if path.exists():
        from bench import report

        print()
        print(report.render(common.load_results(path)))
        if not args.no_plots:
            from bench import plots

            for png in plots.write_plots(path):
                print(f"plot -> {png}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
