"""Paged KV cache for HSTU inference: page pool, allocator with LRU eviction, host
offload/onload, and the batch metadata builder (DESIGN.md §2, §3).

- :class:`KVCacheManager` / :class:`KVCacheConfig`: the cache of a whole model;
  ``prepare(...)`` turns a batch into :class:`BatchMetadata`;
- :func:`build_paged_metadata` / :func:`build_jagged_metadata`: metadata without a manager;
- :class:`PageAllocator`: the free list.
"""

from hstu_kernels.kvcache.allocator import OutOfPagesError, PageAllocator
from hstu_kernels.kvcache.manager import (
    KVCacheConfig,
    KVCacheError,
    KVCacheManager,
    LayerIndexError,
)
from hstu_kernels.kvcache.metadata import (
    BatchMetadata,
    JaggedMetadata,
    build_jagged_metadata,
    build_paged_metadata,
    paged_layout_size,
)

__all__ = [
    "BatchMetadata",
    "JaggedMetadata",
    "KVCacheConfig",
    "KVCacheError",
    "LayerIndexError",
    "KVCacheManager",
    "OutOfPagesError",
    "PageAllocator",
    "build_jagged_metadata",
    "build_paged_metadata",
    "paged_layout_size",
]
