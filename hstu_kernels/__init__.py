"""hstu_kernels: HSTU attention with a paged KV cache, for inference.

Public API (everything else is internal):

- :func:`hstu_attention`: jagged HSTU attention over whole sequences (no cache);
- :func:`paged_hstu_attention`: new history + target rows over a paged KV cache;
- :func:`append_kv`: write new history K/V into their pages;
- :func:`plan_paged_attention`, :func:`plan_jagged_attention`, :func:`plan_append_kv`: the
  same ops planned once per batch (validation, backend choice, kernel, grid), run with
  ``plan.run(...)`` for every layer at a few µs of host time each;
- :class:`PageTable`, :class:`BatchLayout`, :class:`AttentionSpec`: the value types they take;
- :func:`explain`: which backend serves a call, and why;
- :mod:`~hstu_kernels.settings`: every knob, read once from the environment.
"""

from hstu_kernels import settings
from hstu_kernels.dispatch import BackendError, explain
from hstu_kernels.ops import append_kv, clear_plan_cache, hstu_attention, paged_hstu_attention
from hstu_kernels.plan import (
    AppendPlan,
    JaggedAttentionPlan,
    PagedAttentionPlan,
    plan_append_kv,
    plan_jagged_attention,
    plan_paged_attention,
)
from hstu_kernels.tuning import reset_caches
from hstu_kernels.types import AttentionSpec, BatchLayout, PageTable

__version__ = "0.1.0"

__all__ = [
    "AppendPlan",
    "AttentionSpec",
    "BackendError",
    "BatchLayout",
    "JaggedAttentionPlan",
    "PageTable",
    "PagedAttentionPlan",
    "__version__",
    "append_kv",
    "clear_plan_cache",
    "explain",
    "hstu_attention",
    "paged_hstu_attention",
    "plan_append_kv",
    "plan_jagged_attention",
    "plan_paged_attention",
    "reset_caches",
    "settings",
]
