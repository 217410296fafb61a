"""Measure the DSL layer's costs on a GPU: compile, warm-cache load, host overhead, speed.

``python -m bench.dsl_costs [--perf] [--backends cutedsl-ampere,triton]``

Prints one line per number (the figures quoted in ``docs/cutedsl.md``):

- first-call compile time of one variant (empty disk cache, this process);
- warm-cache load time of that variant in a fresh process (disk cache hit);
- host time per call: the compiled tvm-ffi function called directly, and the public op with
  ``validate=False`` (what a CUDA-graph-less serving loop pays), on a tiny problem so that the
  GPU never is the bottleneck;
- with ``--perf``: the performance-bar shapes (bench/kernels.py's B=8 cases), each backend
  named, timed with ``triton.testing.do_bench`` (median).
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import hstu_kernels as hk
from hstu_kernels import settings
from hstu_kernels.testing import make_paged_case

VARIANT = (torch.bfloat16, 128, 32, True)


def _arch() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def compile_and_load_times() -> None:
    from hstu_kernels.backends.cutedsl import ampere
    from hstu_kernels.backends.cutedsl import compile as cc

    with tempfile.TemporaryDirectory() as tmp, settings.override(cutedsl_cache=Path(tmp)):
        cc.clear_memory_cache()
        start = time.perf_counter()
        ampere.get_kernel(_arch(), *VARIANT)
        print(f"first-call compile (bf16 D=128 page 32 paged): {time.perf_counter() - start:.2f} s")
        code = (
            "import time; t = time.perf_counter(); import torch; "
            "from hstu_kernels.backends.cutedsl import ampere, compile as cc; "
            "t1 = time.perf_counter(); "
            f"ampere.get_kernel({_arch()!r}, torch.bfloat16, 128, 32, True); "
            "t2 = time.perf_counter(); s = list(cc.compile_stats().values())[0]; "
            "print(f\"fresh process: imports {t1 - t:.2f} s, kernel from {s['source']} "
            '{(t2 - t1) * 1e3:.1f} ms")'
        )
        env = {**os.environ, cc.CACHE_ENV: tmp}  # the child reads its settings from it
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        print("warm-cache load:", (out.stdout + out.stderr).strip().splitlines()[-1])


def host_overhead(reps: int = 2000) -> None:
    from hstu_kernels.backends.cutedsl import ampere

    dtype = torch.bfloat16
    case = make_paged_case([40], [8], [4], page_size=32, heads=1, head_dim=128, dtype=dtype,
                           device="cuda", seed=0)  # fmt: skip
    out = torch.empty_like(case.q)
    fn, _ = ampere.get_kernel(_arch(), dtype, 128, 32, True)
    pt = case.page_table
    args = (case.q, case.k_new, case.v_new, out, case.kv_cache, case.cu_q, case.num_targets,
            pt.page_indptr, pt.page_ids, pt.last_page_len, 0.088, 1 / 44, 1,
            torch.zeros(1, 1, 1, 128, device="cuda"), 1)  # fmt: skip

    def op():
        hk.paged_hstu_attention(
            case.q, case.k_new, case.v_new, case.kv_cache, pt, case.cu_q,
            num_targets=case.num_targets, scaling_seqlen=44, max_seqlen_q=12,
            backend="cutedsl-ampere", validate=False, out=out,
        )  # fmt: skip

    for name, call in (("compiled fn (tvm-ffi)", lambda: fn(*args)), ("public op", op)):
        for _ in range(50):
            call()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            call()
        host = (time.perf_counter() - start) / reps * 1e6
        torch.cuda.synchronize()
        print(f"host time per call, {name}: {host:.1f} us")


def perf(backends: list[str]) -> None:
    from triton.testing import do_bench

    from bench.kernels import _call, _inputs, full_cases

    dtype = torch.bfloat16
    print(f"card: {torch.cuda.get_device_name()}")
    for case in full_cases():
        if case.batch != 8:
            continue
        pc = _inputs(case, dtype, "cuda")
        for name in backends:
            try:
                fn = _call(case, pc, name)
                fn()
                torch.cuda.synchronize()
                ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
                print(f"{case.name:28s} {name:16s} {ms * 1e3:9.1f} us "
                      f"{case.flops() / ms / 1e9:7.1f} TFLOP/s")  # fmt: skip
            except Exception as exc:  # report and go on: one backend must not hide the others
                print(f"{case.name:28s} {name:16s} failed: {type(exc).__name__}: {exc}")
        del pc
        torch.cuda.empty_cache()


SWEEP = {  # tile shapes "BM,BN,threads", each with the SiLU of the default (tanh for bf16)
    ("jagged", 256): ["128,64,256", "64,64,128"],
    ("jagged", 128): ["128,64,128", "128,32,128"],
    ("delta", 256): ["128,64,256", "64,64,128"],
    ("delta", 128): ["128,64,128", "64,128,128"],
}


def sweep() -> None:
    """Time each candidate tile shape of the B=8 bench cases, calling the kernel directly."""
    from triton.testing import do_bench

    from bench.kernels import _inputs, full_cases
    from hstu_kernels.backends.cutedsl import ampere

    dtype = torch.bfloat16
    for case in full_cases():
        if case.batch != 8:
            continue
        pc = _inputs(case, dtype, "cuda")
        paged = case.kind == "delta"
        scaling = case.history + case.targets
        for tile in SWEEP[(case.kind, case.head_dim)]:
            with settings.override(cutedsl_tile=tuple(int(x) for x in tile.split(","))):
                fn, cfg = ampere.get_kernel(_arch(), dtype, case.head_dim, 32, paged)
            if paged:
                pt = pc.page_table
                out = torch.empty_like(pc.q)
                rows = case.new + case.targets
                args = (pc.q, pc.k_new, pc.v_new, out, pc.kv_cache, pc.cu_q, pc.num_targets,
                        pt.page_indptr, pt.page_ids, pt.last_page_len)  # fmt: skip
            else:
                out = torch.empty_like(pc.q_full)
                rows = scaling
                args = (pc.q_full, pc.k_full, pc.v_full, out, pc.q_full.view(-1), pc.cu_full,
                        pc.num_targets, pc.cu_full, pc.cu_full, pc.cu_full)  # fmt: skip
            nm = -(-rows // cfg.block_m)
            ws = torch.zeros(1, 1, 1, case.head_dim, device="cuda")
            call = functools.partial(fn, *args, case.head_dim**-0.5, 1.0 / scaling, nm, ws, 1)
            try:
                ms = do_bench(call, warmup=25, rep=100, return_mode="median")
            except Exception as exc:  # a tile shape that fails must not hide the others
                print(f"sweep {case.name:24s} tile {tile:12s} failed: {exc}")
                continue
            print(f"sweep {case.name:24s} tile {tile:12s} {ms * 1e3:8.1f} us "
                  f"{case.flops() / ms / 1e9:6.1f} TFLOP/s")  # fmt: skip
        del pc
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--perf", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--backends", default="cutedsl-ampere,triton")
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    if not args.no_compile:
        compile_and_load_times()
    host_overhead()
    if args.perf:
        perf(args.backends.split(","))
    if args.sweep:
        sweep()


if __name__ == "__main__":
    main()
