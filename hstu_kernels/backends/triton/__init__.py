"""The Triton backend: jagged and paged HSTU attention and ``append_kv`` for sm_80 and newer,
and the HSTU layer's LayerNorm row kernels and fused projection GEMM (``rows``, ``projection``,
``fusion``: the layer ops of :mod:`hstu_kernels.layer_ops`).

The default on Ampere/Ada GPUs (head dims 64/128/256, pages of 16..256 tokens) and a candidate
on Hopper. Registering it imports nothing from Triton: the kernels are imported on the first
call, so discovery works where Triton is missing. On a CPU the backend serves only when
``TRITON_INTERPRET=1`` (the Triton interpreter, for tests), and then with the lowest priority.
The mask features ``num_contexts`` (a contextual prefix) and ``max_attn_len`` (a local
window) are served by both attention ops: a query tile visits only the key tiles inside its
rows' windows.
"""

from __future__ import annotations

import importlib.util

import torch

from hstu_kernels import settings
from hstu_kernels.dispatch import Backend, register

__all__ = ["probe"]


def probe(arch: str) -> str | None:
    """``None`` if the backend can run on ``arch`` here, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if arch == "cpu":
        if not settings.get().triton_interpret:
            return "arch cpu needs the Triton interpreter (TRITON_INTERPRET=1)"
        return None
    if not arch.startswith("sm_"):
        return f"arch {arch} is not a CUDA arch"
    try:
        major = int(arch[3:-1])
    except ValueError:
        return f"arch {arch} is not understood"
    if major < 8:
        return f"arch {arch} is older than sm_80 (bf16 tensor cores needed)"
    return None


# The registered ops import the kernels on first call (importing the backend stays cheap).


def _jagged(q, k, v, cu_seqlens, num_targets, max_seqlen, spec, out):
    from hstu_kernels.backends.triton import ops

    ops.jagged(q, k, v, cu_seqlens, num_targets, max_seqlen, spec, out)


def _paged(q, k_new, v_new, kv_cache, page_table, cu_seqlens_q, num_targets, max_seqlen_q, spec,
           out, kv_scales=None):  # fmt: skip
    from hstu_kernels.backends.triton import ops

    ops.paged(q, k_new, v_new, kv_cache, page_table, cu_seqlens_q, num_targets, max_seqlen_q,
              spec, out, kv_scales)  # fmt: skip


def _paged_partials(q, k_new, v_new, kv_cache, page_table, cu_seqlens_q, num_targets,
                    max_seqlen_q, spec, kv_scales=None):  # fmt: skip
    from hstu_kernels.backends.triton import ops

    return ops.paged_partials(q, k_new, v_new, kv_cache, page_table, cu_seqlens_q, num_targets,
                              max_seqlen_q, spec, kv_scales)  # fmt: skip


def _append_kv(kv_cache, page_table, k, v, cu_seqlens, num_targets, kv_scales=None):
    from hstu_kernels.backends.triton import ops

    ops.append_kv(kv_cache, page_table, k, v, cu_seqlens, num_targets, kv_scales)


def _layernorm(x, weight, bias, eps):
    from hstu_kernels.backends.triton import rows

    return rows.layernorm(x, weight, bias, eps)


def _layernorm_mul(a, u, weight, bias, eps):
    from hstu_kernels.backends.triton import rows

    return rows.layernorm_mul(a, u, weight, bias, eps)


def _plan_rows(shape, x_dtype, out_dtype, device, eps, stride_u, param_dtype):
    from hstu_kernels.backends.triton import rows

    return rows.plan_rows(shape, x_dtype, out_dtype, device, eps, stride_u, param_dtype)


def _project_silu(h, weight):
    from hstu_kernels.backends.triton import projection

    return projection.project_silu(h, weight)


def _project_silu_append(h, weight, append, separate):
    from hstu_kernels.backends.triton import fusion

    return fusion.project_appending(h, weight, append, separate)


def _notes(op: str) -> str | None:
    """The layer ops' fast paths this process switched off (a kernel that did not build)."""
    import sys

    if op in ("layernorm", "layernorm_mul"):
        rows = sys.modules.get("hstu_kernels.backends.triton.rows")
        if rows is not None and rows._BROKEN:
            return f"its LayerNorm kernels are off, torch ops run ({rows._BROKEN[0]})"
    if op in ("project_silu", "project_silu_append"):
        proj = sys.modules.get("hstu_kernels.backends.triton.projection")
        if proj is not None and proj._BROKEN:
            return f"its projection kernels are off, cuBLAS + torch ops run ({proj._BROKEN[0]})"
        if proj is not None and proj._TMA_BROKEN:
            return f"its TMA projection kernel is off ({proj._TMA_BROKEN[0]})"
    return None


def _planner(name: str):
    def plan(batch):
        from hstu_kernels.backends.triton import ops

        return getattr(ops, name)(batch)

    return plan


register(
    Backend(
        name="triton",
        ops={
            "jagged": _jagged,
            "paged": _paged,
            "paged_partials": _paged_partials,
            "append_kv": _append_kv,
            "layernorm": _layernorm,
            "layernorm_mul": _layernorm_mul,
            "project_silu": _project_silu,
            "project_silu_append": _project_silu_append,
        },
        dtypes=frozenset({torch.bfloat16, torch.float16, torch.float32}),
        head_dims=frozenset({64, 128, 256}),
        page_sizes=frozenset(2**i for i in range(4, 9)),
        # fp8_kv: e4m3 pages read through pointer loads (a 16-bit matmul of the stored codes,
        # scales in fp32) and written by a quantising append; run on an H200 (sm_90).
        features=frozenset({"contexts", "window", "fp8_kv"}),
        # The Ampere/Ada default, and on Hopper too: measured faster than cutedsl-ampere (10)
        # on an H100 in every bench case (bench/results/h100-80gb-hbm3.json). On Blackwell a
        # fallback below the DSL kernels (unmeasured); on the CPU interpreter below the
        # reference.
        priority={
            "sm_80": 20,
            "sm_86": 20,
            "sm_87": 20,
            "sm_89": 20,
            "sm_90": 20,
            "sm_120": 20,
            "cpu": -10,
            "*": 5,
        },
        planners={
            "jagged": _planner("plan_jagged"),
            "paged": _planner("plan_paged"),
            "paged_partials": _planner("plan_paged_partials"),
            "append_kv": _planner("plan_append_kv"),
            "layernorm": _plan_rows,
        },
        probe=probe,
        notes=_notes,
        # Run by this project on H100s and an H200 (and the CPU interpreter in CI); on other
        # GPUs its first auto use runs the parity check (hstu_kernels/verify.py).
        verified_archs=frozenset({"sm_90", "cpu"}),
        description="Triton kernels (sm_80+; CPU only under TRITON_INTERPRET=1)",
    )
)
