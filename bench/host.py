"""Host-overhead benchmark: µs of host time per eager call of each public op and of each plan's
``run``, for every backend that serves the shape here, beside torch SDPA on the same machine;
and the cold start (a fresh process's import, then its first paged call).

``python -m bench.host [--quick]``; part of ``python -m bench``. The shapes are tiny, so the GPU
is never the bottleneck: a call's time is what the host spends on it (argument checks, plan
lookup, launch). Each figure is the wall time of ``reps`` back-to-back calls after a warm-up,
divided by ``reps``: the median of 5 rounds, each of which times every call form of every
backend in turn (the GPU machine's host speed drifts during a run). Entries: ``{"bench": "host", "case": "<op>
<how>", "impl": <backend>, "host_us": ...}`` (cold start: ``time_ms``).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import hstu_kernels as hk
from bench import common
from hstu_kernels.dispatch import Request, device_arch, registry
from hstu_kernels.testing import make_paged_case

HEADS, HEAD_DIM, PAGE_SIZE = 2, 128, 32
HISTORIES, NEW, TARGETS = [70, 45], [8, 5], [8, 3]  # tiny: the host is the bottleneck


def per_call_us(
    fns: dict[Any, Callable[[], object]], reps: int, device: str, rounds: int = 5
) -> dict[Any, float]:
    """Host µs per call of each of ``fns``: ``reps`` back-to-back calls, timed in ``rounds``
    rounds that each time every call in turn (so a drift of the machine's speed during the run
    reaches all of them alike), the median over rounds; after a warm-up of each. A call that
    raises in its warm-up is reported and left out."""
    usable = {}
    for key, fn in fns.items():
        try:
            for _ in range(20):
                fn()
        except Exception as exc:
            print(f"host: {key}: {type(exc).__name__}: {exc}")
            continue
        usable[key] = fn
    samples: dict[Any, list[float]] = {key: [] for key in usable}
    for _ in range(rounds):
        for key, fn in usable.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            samples[key].append((time.perf_counter() - t0) / reps * 1e6)
    if device == "cuda":
        torch.cuda.synchronize()
    return {key: statistics.median(v) for key, v in samples.items()}


def _serves(op: str, name: str, dtype: torch.dtype, device: str, page_size: int | None) -> bool:
    request = Request(op, device_arch(torch.device(device)), dtype, HEAD_DIM, page_size)
    return registry().explain(request, name).choice is not None


def _calls(case: Any, dtype: torch.dtype, device: str, backend: str) -> dict[str, Callable]:
    """Every call form of the three ops for ``backend`` on ``case``: name -> call."""
    q, k, v = (t.to(dtype) for t in (case.q, case.k_new, case.v_new))
    kv = case.kv_cache.to(dtype)
    pt, cu, nt = case.page_table, case.cu_q, case.num_targets
    qf, kf, vf = (t.to(dtype) for t in (case.q_full, case.k_full, case.v_full))
    cu_full = case.cu_full
    scaling, max_q, max_full = case.max_total, max(case.new[i] + case.targets[i]
                                                   for i in range(2)), case.max_total  # fmt: skip
    out, out_full = torch.empty_like(q), torch.empty_like(qf)
    calls: dict[str, Callable] = {}
    if _serves("paged", backend, dtype, device, PAGE_SIZE):
        paged = hk.plan_paged_attention(
            pt, cu, nt, heads=HEADS, head_dim=HEAD_DIM, dtype=dtype, page_size=PAGE_SIZE,
            scaling_seqlen=scaling, backend=backend,
        )  # fmt: skip
        calls["paged plan.run"] = lambda: paged.run(q, k, v, kv, out)
        if backend == "auto":
            print(f"host: paged auto -> {paged.backend}")
        pkw = dict(num_targets=nt, scaling_seqlen=scaling, backend=backend, out=out)
        calls["paged op"] = lambda: hk.paged_hstu_attention(q, k, v, kv, pt, cu, **pkw)
        calls["paged op validate=False"] = lambda: hk.paged_hstu_attention(
            q, k, v, kv, pt, cu, **pkw, max_seqlen_q=max_q, validate=False
        )
    if _serves("jagged", backend, dtype, device, None):
        jagged = hk.plan_jagged_attention(
            cu_full, nt, heads=HEADS, head_dim=HEAD_DIM, dtype=dtype, backend=backend
        )
        calls["jagged plan.run"] = lambda: jagged.run(qf, kf, vf, out_full)
        jkw = dict(num_targets=nt, backend=backend, out=out_full)
        calls["jagged op"] = lambda: hk.hstu_attention(qf, kf, vf, cu_full, **jkw)
        calls["jagged op validate=False"] = lambda: hk.hstu_attention(
            qf, kf, vf, cu_full, **jkw, max_seqlen=max_full, scaling_seqlen=max_full,
            validate=False,
        )  # fmt: skip
    if _serves("append_kv", backend, dtype, device, PAGE_SIZE):
        append = hk.plan_append_kv(
            pt, cu, nt, heads=HEADS, head_dim=HEAD_DIM, dtype=dtype, page_size=PAGE_SIZE,
            backend=backend,
        )  # fmt: skip
        calls["append plan.run"] = lambda: append.run(kv, k, v)
        akw = dict(num_targets=nt, backend=backend)
        calls["append op"] = lambda: hk.append_kv(kv, pt, k, v, cu, **akw)
        calls["append op validate=False"] = lambda: hk.append_kv(
            kv, pt, k, v, cu, **akw, validate=False
        )
    return calls


# (hidden, heads, head_dim, histories, new, targets) of the layer cases: the tiny batch above,
# and the seed's layer at its last B=1 request (4096 history tokens, 256 of them new, 256
# candidates), where the eager cached block's host time is spent in the e2e benchmark
LAYER_CASES = {
    "layer": (256, HEADS, HEAD_DIM, HISTORIES, NEW, TARGETS),
    "seed layer": (1024, 4, 256, [4096], [256], [256]),
}


def _layer_calls(dtype: torch.dtype, device: str, label: str) -> dict[str, Callable]:
    """One cached HSTU layer of ``LAYER_CASES[label]`` and each step of it, on one batch:
    where an eager layer's host time goes."""
    from hstu_kernels import layer_ops
    from hstu_kernels.model import HSTUBlock
    from hstu_kernels.types import CacheAppend

    hidden, heads, dim, histories, new, targets = LAYER_CASES[label]
    scaling = max(histories) + max(targets)
    block = HSTUBlock(1, hidden, heads, dim, scaling_seqlen=scaling, dtype=dtype, device=device)
    users = list(range(len(histories)))
    pages = sum(-(-h // PAGE_SIZE) for h in histories) + 1
    cache = block.make_cache(pages, PAGE_SIZE)
    before = [h - n for h, n in zip(histories, new, strict=True)]
    cache.prepare(users, [0] * len(users), before, [0] * len(users))
    meta = cache.prepare(users, before, new, targets)
    layer, kv = block.layers[0], cache.layer_cache(0)
    plans = block.plan_cached(meta)
    x = torch.randn(meta.num_tokens, hidden, device=device, dtype=dtype)
    ops = layer_ops.kernels("auto", torch.device(device), dtype)
    h = ops.layernorm(x, layer.norm_in_weight, layer.norm_in_bias, layer.eps)
    append = CacheAppend(kv, meta.page_table, meta.cu_seqlens_q, meta.num_targets)
    uvqk = ops.project_silu(h, layer.uvqk_weight)
    shape = (meta.num_tokens, heads, dim)
    u, q, k, v = uvqk[0], uvqk[2].view(shape), uvqk[3].view(shape), uvqk[1].view(shape)
    attn = plans.attention.run_partials(q, k, v, kv)
    a = attn[0].view(-1, heads * dim) if attn.shape[0] == 1 else attn.view(
        attn.shape[0], -1, heads * dim)  # fmt: skip
    y = ops.layernorm_mul(a, u, layer.norm_attn_weight, layer.norm_attn_bias, layer.eps)
    kw = dict(scaling_seqlen=scaling, plans=plans)
    return {
        f"{label} forward_cached": lambda: layer.forward_cached(x, meta, kv, **kw),
        f"{label}: block plan_cached": lambda: block.plan_cached(meta),
        f"{label}: layernorm": lambda: ops.layernorm(
            x, layer.norm_in_weight, layer.norm_in_bias, layer.eps
        ),
        f"{label}: project_silu_append": lambda: ops.project_silu_append(
            h, layer.uvqk_weight, append, lambda: ops.project_silu(h, layer.uvqk_weight)
        ),
        f"{label}: attention run_partials": lambda: plans.attention.run_partials(q, k, v, kv),
        f"{label}: layernorm_mul": lambda: ops.layernorm_mul(
            a, u, layer.norm_attn_weight, layer.norm_attn_bias, layer.eps
        ),
        f"{label}: residual addmm": lambda: torch.addmm(x, y, layer.out_weight.t()),
    }


def _sdpa_call(case: Any, dtype: torch.dtype, device: str) -> Callable:
    """torch SDPA over the same jagged batch padded to ``[B, heads, L, D]`` (causal)."""
    length = max(h + t for h, t in zip(case.histories, case.targets, strict=True))
    x = torch.randn(len(case.histories), HEADS, length, HEAD_DIM, device=device, dtype=dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return lambda: sdpa(x, x, x, is_causal=True)


COLD_START = """
import time, torch
t0 = time.perf_counter()
import hstu_kernels as hk
t1 = time.perf_counter()
from hstu_kernels.testing import make_paged_case
c = make_paged_case({histories}, {new}, {targets}, page_size=32, heads={heads}, head_dim={dim},
                    dtype=torch.bfloat16, device="cuda", seed=0)
torch.cuda.synchronize()
t2 = time.perf_counter()
out = hk.paged_hstu_attention(c.q, c.k_new, c.v_new, c.kv_cache, c.page_table, c.cu_q,
                              num_targets=c.num_targets)
torch.cuda.synchronize()
t3 = time.perf_counter()
exp = hk.explain("paged", head_dim={dim}, page_size=32, batch={batch}, heads={heads},
                 max_seqlen_q={rows})
print("COLD", t1 - t0, t3 - t2, exp.choice)
"""


def cold_start(batch: int, history: int, new: int, targets: int, heads: int, dim: int) -> tuple:
    """A fresh process (disk caches as they are): seconds to import, seconds of its first
    paged call (the data made before it is not counted), the backend it got."""
    code = COLD_START.format(histories=[history] * batch, new=[new] * batch,
                             targets=[targets] * batch, heads=heads, dim=dim, batch=batch,
                             rows=new + targets)  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    line = [x for x in run.stdout.splitlines() if x.startswith("COLD")]
    if run.returncode or not line:
        raise RuntimeError(f"cold-start process failed: {run.stderr[-2000:]}")
    _, imp, first, choice = line[-1].split()
    return float(imp), float(first), choice


COLD_CASES = {  # the seed's delta shapes: B=8 + 256 targets goes to hopper, B=1 to triton
    "delta B=8 h=4 D=256 +256 targets": (8, 4096, 128, 256, 4, 256),
    "delta B=1 h=4 D=256 +256 targets": (1, 4096, 128, 256, 4, 256),
}


def run(*, quick: bool = False, path: Path | None = None) -> list[dict]:
    """Run the host benchmark, write its entries and return them."""
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    reps = (200 if quick else 2000) if gpu else 20
    if not gpu:
        print("host: no GPU -- reference backend on the CPU (host times of the CPU path)")
    case = make_paged_case(HISTORIES, NEW, TARGETS, page_size=PAGE_SIZE, heads=HEADS,
                           head_dim=HEAD_DIM, dtype=torch.float32, device=device, seed=0)  # fmt: skip
    if gpu:  # the reference's host time is its GPU time: not a launch-overhead figure
        arch = device_arch(case.q.device)
        names = [n for n, b in registry().backends.items()
                 if n != "reference" and b.probe(arch) is None]  # fmt: skip
    else:  # (the Triton interpreter, if on, would time Python, not launches)
        names = ["reference"]
    entries: list[dict] = []
    base = dict(bench="host", heads=HEADS, head_dim=HEAD_DIM, page_size=PAGE_SIZE,
                batch=len(HISTORIES))  # fmt: skip
    backends = ["auto", *names] if gpu else names
    calls: dict[tuple[str, str], Callable] = {}
    for backend in backends:
        try:
            found = _calls(case, dtype, device, backend)
        except Exception as exc:  # a backend that cannot plan here is reported, not fatal
            print(f"host: {backend}: {type(exc).__name__}: {exc}")
            continue
        calls.update({(name, backend): fn for name, fn in found.items()})
    for label in LAYER_CASES if gpu else ["layer"]:  # the layer's ops, backend="auto"
        try:
            layer = _layer_calls(dtype, device, label)
        except Exception as exc:
            print(f"host: the {label} cases: {type(exc).__name__}: {exc}")
            continue
        calls.update({(name, "auto" if gpu else "reference"): fn for name, fn in layer.items()})
    calls[("sdpa causal", "torch SDPA")] = _sdpa_call(case, dtype, device)
    common.progress().start("host", 1)
    for (name, impl), us in per_call_us(calls, reps, device).items():
        entries.append({**base, "case": name, "impl": impl, "host_us": round(us, 2)})
        print(f"host: {name:28s} {impl:18s} {us:8.1f} us", flush=True)
    common.progress().step("calls, interleaved")
    # (written now too: a cold-start case that runs out of time leaves these)
    common.write_results("host", entries, path=path or common.results_path(quick=quick))
    if gpu and not quick:
        for name, shape in COLD_CASES.items():
            cold_start(*shape)  # warms the disk caches (compile, tuning) if they were cold
            imp, first, choice = cold_start(*shape)
            entries.append({"bench": "host", "case": f"cold start {name}", "impl": choice,
                            "import_ms": round(imp * 1e3, 1), "time_ms": round(first * 1e3, 1)})  # fmt: skip
            print(
                f"host: cold start {name}: import {imp:.2f} s, first call {first:.2f} s ({choice})"
            )
    common.write_results("host", entries, path=path or common.results_path(quick=quick))
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    run(quick=args.quick, path=args.results)


if __name__ == "__main__":
    main()
