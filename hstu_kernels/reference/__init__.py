"""PyTorch reference implementations: the definition of correctness for every backend."""

from hstu_kernels.reference.attention import (
    gather_history_kv,
    jagged_hstu_attention,
    paged_hstu_attention,
)
from hstu_kernels.reference.kv import append_kv, append_positions
from hstu_kernels.reference.layer import (
    layernorm,
    layernorm_mul,
    project_silu,
    project_silu_append,
    sum_partials,
)
from hstu_kernels.reference.mask import hstu_mask

__all__ = [
    "append_kv",
    "append_positions",
    "gather_history_kv",
    "hstu_mask",
    "jagged_hstu_attention",
    "layernorm",
    "layernorm_mul",
    "paged_hstu_attention",
    "project_silu",
    "project_silu_append",
    "sum_partials",
]
