"""hstu_kernels: HSTU attention with a paged KV cache, for inference.

Public API (everything else is internal):

- :func:`hstu_attention`: jagged HSTU attention over whole sequences (no cache);
- :func:`paged_hstu_attention`: new history + target rows over a paged KV cache;
- :func:`append_kv`: write new history K/V into their pages;
- :class:`PageTable`, :class:`AttentionSpec`: the value types they take;
- :func:`explain`: which backend serves a call, and why.
"""

from hstu_kernels.dispatch import BackendError, explain
from hstu_kernels.ops import append_kv, hstu_attention, paged_hstu_attention
from hstu_kernels.types import AttentionSpec, PageTable

__version__ = "0.1.0"

__all__ = [
    "AttentionSpec",
    "BackendError",
    "PageTable",
    "__version__",
    "append_kv",
    "explain",
    "hstu_attention",
    "paged_hstu_attention",
]
