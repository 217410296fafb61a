"""Kernel benchmark: jagged and paged (delta) HSTU attention, every backend beside torch SDPA.

``python -m bench.kernels [--quick]``. Each case is timed with ``triton.testing.do_bench``
(median, L2 flushed between runs, random data; GPU calls replayed from a CUDA graph where they
can be captured, as deployed, so that host overhead is reported apart as ``host_us``) for every
registered backend that can serve it
(forced with ``backend=NAME``, so new backends appear without edits), the PyTorch reference
where it fits, and torch SDPA flash attention (causal, same shapes) as the peer. Reported:
time, TFLOP/s (``4 * heads * D * valid (q, k) pairs``, pairs counted exactly from the HSTU
mask), KV bytes read per second (paged), and the floor from the card's measured ceilings.
Results go to ``bench/results/<card>.json`` (DESIGN.md §7). Without a GPU it runs tiny shapes
on the reference backend and says so.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import hstu_kernels as hk
from bench import common
from hstu_kernels.dispatch import Request, device_arch, registry
from hstu_kernels.testing import make_paged_case


@dataclass(frozen=True)
class Case:
    """One benchmark shape: ``batch`` equal sequences of ``history`` + ``targets`` tokens."""

    kind: str  # "jagged" or "delta"
    batch: int
    heads: int
    head_dim: int
    history: int
    targets: int
    new: int  # new history rows (delta); == history for jagged
    page_size: int = 32
    contexts: int = 0  # num_contexts C
    window: int = 0  # max_attn_len W

    @property
    def name(self) -> str:
        mask = f" C={self.contexts} W={self.window}" if self.contexts or self.window else ""
        return f"{self.kind} B={self.batch} h={self.heads} D={self.head_dim}{mask}"

    def _window_start(self, p: int) -> int:
        """The first history key a row at ``P = min(p, H)`` sees (DESIGN.md §1 on ids)."""
        P, w = min(p, self.history), self.window
        return P - w if w and P - w >= self.contexts else 0

    def pairs(self) -> int:
        """Valid (query, key) pairs of the HSTU mask (DESIGN.md §1), whole batch, one head."""
        h, n, t = self.history, self.new, self.targets
        if not (self.contexts or self.window):
            history_rows = n * (2 * h - n + 1) // 2  # row at position p sees p + 1 keys
            return self.batch * (history_rows + t * (h + 1))  # targets: all history + themselves
        total = 0
        for p in range(h - n, h):  # history rows up to themselves; context rows: all history
            last = h - 1 if p < self.contexts else p
            total += last - self._window_start(p) + 1
        total += t * (h - self._window_start(h) + 1)  # targets: their window and themselves
        return self.batch * total

    def flops(self) -> float:
        return 4.0 * self.heads * self.head_dim * self.pairs()

    def kv_bytes(self, elsize: int) -> int:
        """K and V read by the paged kernel: the whole cached history plus target rows."""
        return 2 * self.batch * (self.history + self.targets) * self.heads * self.head_dim * elsize


def full_cases() -> list[Case]:
    h, t = 4096, 256
    return [
        Case("jagged", 8, 4, 256, h, t, h),
        Case("jagged", 8, 8, 128, h, t, h),
        Case("delta", 8, 4, 256, h, t, 128),
        Case("delta", 8, 8, 128, h, t, 128),
        Case("delta", 1, 4, 256, h, t, 128),
        # contextual prefix and local window (the published HSTU models' options)
        *(
            Case(kind, 8, 4, 256, h, t, h if kind == "jagged" else 128, contexts=c, window=w)
            for kind in ("jagged", "delta")
            for c, w in ((0, 1024), (32, 0), (32, 1024))
        ),
    ]


def quick_cases(gpu: bool) -> list[Case]:
    if gpu:
        return [Case("jagged", 2, 2, 128, 1024, 64, 1024), Case("delta", 2, 2, 128, 1024, 64, 32)]
    return [
        Case("jagged", 2, 2, 64, 96, 8, 96),
        Case("delta", 2, 2, 64, 96, 8, 16, 16),
        Case("delta", 2, 2, 64, 96, 8, 16, 16, contexts=3, window=20),
    ]


def _bench(fn, quick: bool) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, return_mode="median")


def _graphed(fn):
    """A CUDA graph replaying ``fn`` (the deployed path: no host overhead in the timing), or
    ``None`` where ``fn`` cannot be captured."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception:
        torch.cuda.synchronize()
        return None
    return graph


def _host_us(fn, calls: int = 50) -> float:
    """Host time per eager call (launch overhead; the GPU queue absorbs the kernels)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def _time_gpu(fn, quick: bool, capture: bool) -> tuple[float, str]:
    """Median time of ``fn`` replayed from a CUDA graph where it can be captured, else eager."""
    graph = _graphed(fn) if capture else None
    if graph is None:
        return _bench(fn, quick), "eager"
    ms = _bench(graph.replay, quick)
    del graph
    return ms, "cuda-graph"


def _wall_ms(fn, reps: int = 3) -> float:
    """CPU timing (no GPU): median wall time of a few calls."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def _sdpa_peer(case: Case, dtype: torch.dtype, device: str):
    """torch SDPA flash attention, causal, on the same shapes (dense, not paged)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    total = case.history + case.targets
    rows = total if case.kind == "jagged" else case.new + case.targets
    g = torch.Generator(device=device).manual_seed(0)
    shape_q = (case.batch, case.heads, rows, case.head_dim)
    shape_k = (case.batch, case.heads, total, case.head_dim)
    q = torch.randn(shape_q, device=device, dtype=dtype, generator=g)
    k = torch.randn(shape_k, device=device, dtype=dtype, generator=g)
    v = torch.randn(shape_k, device=device, dtype=dtype, generator=g)
    if case.contexts or case.window:
        # The HSTU mask itself, as a boolean band (SDPA has no window option): the
        # memory-efficient backend takes an explicit mask, flash does not.
        p = torch.arange(total - rows, total, device=device)[:, None]
        j = torch.arange(total, device=device)[None, :]
        h, c, w = case.history, case.contexts, case.window
        pc = torch.clamp(p, max=h)
        start = torch.where((w > 0) & (pc - w >= c), pc - w, torch.zeros_like(pc))
        last = torch.where(p < c, torch.full_like(p, h - 1), torch.clamp(p, max=h - 1))
        band = ((j >= start) & (j <= last)) | (j == p)
        mask, note = band, "HSTU mask (explicit, memory-efficient backend)"
        pairs = case.batch * int(band.sum())

        def masked():
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                return sdpa(q, k, v, attn_mask=mask)

        return masked, 4.0 * case.heads * case.head_dim * pairs, note
    if rows == total:
        mask, note = None, "causal"
        pairs = case.batch * total * (total + 1) // 2
    else:
        from torch.nn.attention.bias import causal_lower_right

        mask, note = causal_lower_right(rows, total), "causal (lower right)"
        pairs = case.batch * (rows * (total - rows) + rows * (rows + 1) // 2)

    def fn():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            if mask is None:
                return sdpa(q, k, v, is_causal=True)
            return sdpa(q, k, v, attn_mask=mask)

    return fn, 4.0 * case.heads * case.head_dim * pairs, note


def _inputs(case: Case, dtype: torch.dtype, device: str):
    pc = make_paged_case(
        [case.history] * case.batch, [case.new] * case.batch, [case.targets] * case.batch,
        page_size=case.page_size, heads=case.heads, head_dim=case.head_dim, dtype=dtype,
        device=device, seed=1, spare_pages=1,
    )  # fmt: skip
    return pc


def _call(case: Case, pc, backend: str):
    """A no-argument function running one backend on the case (validation off: no syncs)."""
    scaling = case.history + case.targets
    if case.kind == "jagged":
        out = torch.empty_like(pc.q_full)
        return lambda: hk.hstu_attention(
            pc.q_full, pc.k_full, pc.v_full, pc.cu_full, num_targets=pc.num_targets,
            scaling_seqlen=scaling, max_seqlen=scaling, backend=backend, validate=False, out=out,
            num_contexts=case.contexts, max_attn_len=case.window,
        )  # fmt: skip
    out = torch.empty_like(pc.q)
    return lambda: hk.paged_hstu_attention(
        pc.q, pc.k_new, pc.v_new, pc.kv_cache, pc.page_table, pc.cu_q,
        num_targets=pc.num_targets, scaling_seqlen=scaling,
        max_seqlen_q=case.new + case.targets, backend=backend, validate=False, out=out,
        num_contexts=case.contexts, max_attn_len=case.window,
    )  # fmt: skip


def _backends_for(
    case: Case, dtype: torch.dtype, device: str, forced_only: bool = False
) -> tuple[list[str], dict]:
    """The backends that can serve ``case`` and the reasons of the others. Backends ranked
    below zero on the arch (forced only: not yet verified there, e.g. a kernel that has not
    run) are left out unless ``forced_only``: a kernel that faults would take the CUDA context,
    and every later measurement, with it."""
    op = "jagged" if case.kind == "jagged" else "paged"
    page = case.page_size if op == "paged" else None
    arch = device_arch(torch.device(device))
    features = frozenset(
        name for name, on in (("contexts", case.contexts), ("window", case.window)) if on
    )
    request = Request(op, arch, dtype, case.head_dim, page, features)
    names, skipped = [], {}
    for name, backend in registry().backends.items():
        why = backend.refusal(request)
        if why is None and backend.rank(arch) < 0 and device != "cpu" and not forced_only:
            why = f"forced only on {arch} (not verified there; --forced-only-backends times it)"
        if why is None:
            names.append(name)
        else:
            skipped[name] = why
    return names, skipped


def _entry(case: Case, impl: str, ms: float, flops: float, ceilings: dict, dtype) -> dict:
    e: dict[str, Any] = {
        "bench": "kernel",
        "case": case.kind,
        "impl": impl,
        "batch": case.batch,
        "heads": case.heads,
        "head_dim": case.head_dim,
        "history": case.history,
        "targets": case.targets,
        "time_ms": round(ms, 5),
        "tflops": round(flops / (ms * 1e-3) / 1e12, 1),
    }
    if case.contexts:
        e["num_contexts"] = case.contexts
    if case.window:
        e["max_attn_len"] = case.window
    if case.kind == "delta":
        e["page_size"] = case.page_size
        e["cached"] = case.history - case.new
        if not impl.startswith("torch"):
            elsize = torch.empty((), dtype=dtype).element_size()
            e["kv_tbps"] = round(case.kv_bytes(elsize) / (ms * 1e-3) / 1e12, 3)
    if ceilings:
        elsize = torch.empty((), dtype=dtype).element_size()
        compute_ms = case.flops() / (ceilings["bf16_matmul_tflops"] * 1e12) * 1e3
        byte_ms = (
            (case.kv_bytes(elsize) if case.kind == "delta" else 0)
            / (ceilings["copy_tbps"] * 1e12)
            * 1e3
        )
        e["floor_ms"] = round(max(compute_ms, byte_ms), 5)
        e["pct_of_floor"] = round(100 * e["floor_ms"] / ms, 1)
    return e


def run(*, quick: bool = False, path: Path | None = None, forced_only: bool = False) -> list[dict]:
    """Run the kernel benchmark, write its entries to the results file and return them.
    ``forced_only`` also times the backends that are only used when forced (see
    :func:`_backends_for`)."""
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    if not gpu:
        print("kernels: no GPU -- tiny shapes, reference backend only (these times say nothing)")
    ceilings = common.measure_ceilings() if gpu and not quick else {}
    # Without a GPU the reference backend runs the tiny cases only (the full shapes took it
    # minutes and measure nothing).
    cases = quick_cases(gpu) if quick or not gpu else full_cases()
    entries: list[dict] = []
    rows = []
    common.progress().start("kernels", len(cases))
    for case in cases:
        pc = _inputs(case, dtype, device)
        names, skipped = _backends_for(case, dtype, device, forced_only)
        ref_out = None
        for name in ["reference", *[n for n in names if n != "reference"]]:
            if name not in names:
                continue
            if name == "reference" and gpu and case.batch * case.history > 8 * 4096 * 2:
                skipped[name] = "too slow at this size"
                continue
            fn = _call(case, pc, name)
            timing, host = "eager", None
            try:
                out = fn()
                if gpu:
                    torch.cuda.synchronize()
                    # The reference reads metadata on the host: it cannot be graph-captured.
                    ms, timing = _time_gpu(fn, quick, capture=name != "reference")
                    host = None if name == "reference" else _host_us(fn)
                else:
                    ms = _wall_ms(fn)
            except Exception as exc:  # one backend failing must not hide the others
                rows.append((case.name, name, f"failed: {type(exc).__name__}: {exc}"[:90]))
                continue
            notes = [timing]
            if host is not None:
                notes.append(f"host {host:.0f} us/call")
            if name == "reference":
                ref_out = out.float()
            elif ref_out is not None:
                notes.append(f"max|out-ref|={(out.float() - ref_out).abs().max().item():.2e}")
            e = _entry(case, name, ms, case.flops(), ceilings, dtype)
            e["timing"] = timing
            if host is not None:
                e["host_us"] = round(host, 1)
            entries.append(e)
            rows.append((case.name, name, _fmt(e, "  ".join(notes))))
        for name, why in skipped.items():
            rows.append((case.name, name, f"skipped: {why}"))
        if gpu:
            fn, flops, note = _sdpa_peer(case, dtype, device)
            try:
                fn()
                ms, timing = _time_gpu(fn, quick, capture=True)
                e = _entry(case, "torch-sdpa-flash", ms, flops, {}, dtype)
                e["timing"] = timing
                entries.append(e)
                rows.append((case.name, "torch-sdpa-flash", _fmt(e, f"{note}, {timing}")))
            except Exception as exc:
                rows.append((case.name, "torch-sdpa-flash", f"failed: {exc}"[:90]))
        del pc
        if gpu:
            torch.cuda.empty_cache()
        common.progress().step(case.name)
    written = common.write_results("kernel", entries, ceilings=ceilings or None,
                                   path=path or common.results_path(quick=quick))  # fmt: skip
    print(f"\nkernels on {common.card_name()} ({dtype}); results: {written}")
    if ceilings:
        print(f"ceilings: {ceilings}")
    width = max(len(r[0]) for r in rows)
    for case_name, impl, text in rows:
        print(f"{case_name:<{width}}  {impl:<18} {text}")
    return entries


def _fmt(e: dict, extra: str = "") -> str:
    us = e["time_ms"] * 1e3
    parts = [f"{us:9.1f} us", f"{e['tflops']:6.1f} TFLOP/s"]
    if "kv_tbps" in e:
        parts.append(f"{e['kv_tbps']:.2f} TB/s KV")
    if "pct_of_floor" in e:
        parts.append(f"{e['pct_of_floor']:.0f}% of floor {e['floor_ms'] * 1e3:.0f} us")
    if extra:
        parts.append(extra)
    return "  ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small shapes")
    parser.add_argument("--results", type=Path, default=None, help="results JSON path")
    parser.add_argument(
        "--forced-only-backends",
        action="store_true",
        help="also time backends that are not yet verified on this GPU (forced only)",
    )
    args = parser.parse_args(argv)
    run(quick=args.quick, path=args.results, forced_only=args.forced_only_backends)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
