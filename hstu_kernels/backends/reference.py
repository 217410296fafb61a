"""The PyTorch reference as a backend: any device, any head dim, every feature; slow."""

from __future__ import annotations

import torch

from hstu_kernels import reference
from hstu_kernels.dispatch import Backend, register


def _jagged(q, k, v, cu_seqlens, num_targets, max_seqlen, spec, out):
    out.copy_(reference.jagged_hstu_attention(q, k, v, cu_seqlens, num_targets, spec))


def _paged(
    q, k_new, v_new, kv_cache, page_table, cu_seqlens_q, num_targets, max_seqlen_q, spec, out,
    kv_scales=None,
):  # fmt: skip
    result = reference.paged_hstu_attention(
        q, k_new, v_new, kv_cache, page_table, cu_seqlens_q, num_targets, spec, kv_scales
    )
    out.copy_(result)


register(
    Backend(
        name="reference",
        ops={
            "jagged": _jagged,
            "paged": _paged,
            "append_kv": reference.append_kv,
            "layernorm": reference.layernorm,
            "layernorm_mul": reference.layernorm_mul,
            "project_silu": reference.project_silu,
            "project_silu_append": reference.project_silu_append,
        },
        dtypes=frozenset({torch.bfloat16, torch.float16, torch.float32}),
        page_sizes=frozenset(2**i for i in range(4, 9)),
        features=frozenset({"contexts", "window", "fp8_kv"}),
        priority={"*": 0},
        description="PyTorch reference (fp32 math, one sequence at a time)",
    )
)
