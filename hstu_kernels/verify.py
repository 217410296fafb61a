"""First-use parity checks: a backend that has never been run on an arch does not serve
``backend="auto"`` there until it has passed one on this device.

A backend lists the archs its GPU verification in this repository covers
(``Backend.verified_archs``). On any other arch it serves, the dispatcher's first ``auto``
choice of it in a process runs :func:`parity_check`: a few small paged and jagged calls of
its own ops against the PyTorch reference (odd lengths, a one-token history, targets and none,
outputs poisoned; the DESIGN.md §5 tolerance), a few milliseconds once compiled. The verdict,
passed or failed, is kept on disk per card, backend and library, Triton and torch versions
(``settings.tuning_cache``), so a later process does not repeat it. If it fails, a warning says
so once, the backend declines every ``auto`` call on that arch (in this process and, from the
kept verdict, in later ones), and ``explain()`` gives the reason; a forced backend
(``backend="<name>"``) is never checked.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

import torch

from hstu_kernels.tuning import TuningCache

__all__ = ["parity_check", "verdict"]

_LOCK = threading.Lock()
_VERDICTS = TuningCache("first-use-checks", encode=lambda v: v, decode=str)
_PASSED = "passed"


def _device_of(arch: str) -> torch.device:
    return torch.device("cpu") if arch == "cpu" else torch.device("cuda")


def verdict(backend: Any, arch: str) -> str | None:
    """``None`` if ``backend`` may serve ``auto`` calls on ``arch`` here (verified in the
    repository, or its first-use check passed on this device), else why not."""
    verified = backend.verified_archs
    if verified is None or arch in verified:
        return None
    device = _device_of(arch)
    key = (backend.name, arch)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if capturing and _VERDICTS.get(device, key) is None:
        return "first-use parity check not run yet (a CUDA graph is being captured)"
    with _LOCK:
        found = _VERDICTS.get(device, key)
        if found is None:
            failure = parity_check(backend, device)
            found = _PASSED if failure is None else failure
            _VERDICTS.put(device, key, found)
            if failure is not None:
                warnings.warn(
                    f"hstu_kernels: backend {backend.name!r} failed its first-use parity check "
                    f"on this {arch} device ({failure}); backend='auto' uses the next backend",
                    RuntimeWarning,
                    stacklevel=4,
                )
    if found == _PASSED:
        return None
    return f"failed its first-use parity check on this device ({found})"


def _cases(backend: Any) -> list[tuple[torch.dtype, int, int]]:
    dtypes = [d for d in (torch.bfloat16, torch.float16, torch.float32) if d in backend.dtypes]
    head_dims = sorted(backend.head_dims) if backend.head_dims else [64]
    page_sizes = sorted(backend.page_sizes) if backend.page_sizes else [32]
    return [(dtypes[0], head_dims[0], page_sizes[0])]


def parity_check(backend: Any, device: torch.device) -> str | None:
    """Run ``backend``'s paged and jagged ops on small random batches on ``device`` against the
    reference; ``None`` if every output element is finite and within the tolerance, else
    what went wrong (an exception counts as a failure)."""
    from hstu_kernels import reference
    from hstu_kernels.testing import hstu_tolerance, make_paged_case, poisoned_like

    try:
        for dtype, head_dim, page_size in _cases(backend):
            case = make_paged_case(
                [1, 2 * page_size + 3, page_size], [1, page_size + 1, 0], [3, 0, 5],
                page_size=page_size, heads=2, head_dim=head_dim, device=device, seed=7,
            )  # fmt: skip
            spec = case.spec()
            ref32 = case.reference_full(torch.float32)
            ref_lowp = case.reference_full(dtype)
            q, k, v, kv = (t.to(dtype) for t in (case.q, case.k_new, case.v_new, case.kv_cache))
            results = []
            if "paged" in backend.ops:
                out = poisoned_like(q)
                backend.ops["paged"](q, k, v, kv, case.page_table, case.cu_q, case.num_targets,
                                     max(n + t for n, t in zip(case.new, case.targets)), spec,
                                     out)  # fmt: skip
                results.append(("paged", out, ref32[case.rows], ref_lowp[case.rows]))
            if "jagged" in backend.ops:
                qf, kf, vf = (t.to(dtype) for t in (case.q_full, case.k_full, case.v_full))
                out = poisoned_like(qf)
                backend.ops["jagged"](qf, kf, vf, case.cu_full, case.num_targets,
                                      case.max_total, spec, out)  # fmt: skip
                results.append(("jagged", out, ref32, ref_lowp))
            if "append_kv" in backend.ops:
                got = torch.full_like(kv, float("nan"))
                want = got.clone()
                backend.ops["append_kv"](got, case.page_table, k, v, case.cu_q, case.num_targets)
                reference.append_kv(want, case.page_table, k, v, case.cu_q, case.num_targets)
                if not torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0)):
                    return "append_kv differs from the reference"
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            for op, out, r32, rlow in results:
                if not torch.isfinite(out).all():
                    return f"{op}: non-finite output elements"
                err = (out.float() - r32.float()).abs().max().item()
                tol = hstu_tolerance(r32, rlow)
                if err > tol:
                    return f"{op}: max error {err:.3g} > tolerance {tol:.3g}"
    except Exception as exc:  # a kernel that cannot run here fails its check
        return f"{type(exc).__name__}: {exc}"
    return None
