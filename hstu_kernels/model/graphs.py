"""CUDA graphs of the cached HSTU block, one per (batch size, token count) bucket.

A call pads its batch to the smallest bucket that holds it: the metadata is rebuilt into the
bucket's static buffer (empty sequences fill the batch slots, one padding sequence of target
rows fills the token count; padding sees only the cache's reserved dummy page and appends
nothing, so it can corrupt neither the cache nor real rows), ``x`` is copied into the static
input, and the graph is replayed. The bucket also fixes the bound on rows per sequence the
attention is launched for (``max_seqlen_q``, a bucket of the longest sequence, not the
token count: the grid and the kernels' work split follow it), and whether the padding rows
need a slot of their own (only when the batch fills its bucket but the tokens do not). Every graph is captured on first use of its bucket, after
warm-up runs on the real batch (which lets the backends tune on real shapes; appends are
idempotent), and all graphs share one memory pool (they replay one at a time, in stream
order).

The per-layer waits for onloaded pages (``cache.wait_layer``) are captured as event-wait nodes
(the manager's events are ``external``), so layer ``l`` waits only for layer ``l``'s pages on
every replay. If this CUDA/PyTorch cannot capture such waits, the runner captures without them
and waits for all layers before each replay instead (``graph_waits`` says which).

Those wait nodes are not free: on an H100 each costs ~2.5 µs of idle GPU (8 layers: ~20 µs of
a ~0.4 ms call), and most calls have nothing to wait for (no user of the batch came back from
the host pool, nothing was offloaded). So a bucket has a second graph, captured without the
waits on first need, which a call replays when ``cache.transfers_pending()`` says every copy
issued so far has finished (a host query of an event; it never blocks): the waits would then
all be satisfied already. ``skip_idle_waits=False`` always replays the graph with the waits.

``use_graphs=False`` (and any call on the CPU, or larger than the largest bucket) runs the block
eagerly, unpadded.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from hstu_kernels.kvcache.manager import KVCacheManager
from hstu_kernels.kvcache.metadata import BatchMetadata, build_paged_metadata, paged_layout_size
from hstu_kernels.model.block import HSTUBlock
from hstu_kernels.model.layer import CachedPlans

__all__ = ["CachedBlockGraphs", "default_token_buckets"]


def default_token_buckets(max_tokens: int, per_octave: int = 4) -> list[int]:
    """Token-count buckets up to ``max_tokens``: 16, 32, 64, then ``per_octave`` evenly spaced
    steps per power of two (128, 160, 192, 224, 256, 320, ...), so padding wastes <= 25%."""
    out = [16, 32, 64]
    base = 64
    while out[-1] < max_tokens:
        step = base // per_octave
        out += [base + step * i for i in range(1, per_octave + 1)]
        base *= 2
    return [t for t in out if t < max_tokens] + [next(t for t in out if t >= max_tokens)]


@dataclass
class _Bucket:
    batch: int  # sequences of the graph (padding slot included)
    tokens: int
    max_rows: int  # max_seqlen_q of the attention launches
    pad_slot: bool
    x: torch.Tensor
    meta_buffer: torch.Tensor
    # waits (True: the per-layer page waits captured) -> (graph, its output, the plans it
    # launches: they hold buffers the graph points to)
    graphs: dict[bool, tuple[torch.cuda.CUDAGraph, torch.Tensor, CachedPlans]] = field(
        default_factory=dict
    )
    replays: int = 0
    waiting_replays: int = 0  # of which replayed the graph with the waits


class CachedBlockGraphs:
    """Runs :meth:`HSTUBlock.forward_cached` through CUDA graphs.

    Args:
        block: the block (its parameters must not be replaced after a capture).
        cache: the block's KV cache manager.
        batch_buckets: graph batch sizes (sorted; a batch uses the smallest that holds it).
        token_buckets: graph token counts (default :func:`default_token_buckets` of
            ``max_tokens``).
        max_tokens: the largest token count to serve with graphs (when ``token_buckets`` is
            not given).
        use_graphs: ``False`` runs every call eagerly (the switch for comparing and
            debugging).
        warmup: eager runs on the real batch before a bucket's first capture.
        skip_idle_waits: replay a graph without the per-layer page waits when no copy is
            pending (see the module docstring); ``False``: always the graph with them.

    Call it as ``runner(x, meta)`` with ``meta = cache.prepare(...)`` (unpadded); it returns
    the block's output for the real rows ``[meta.num_real_tokens, hidden]`` (a fresh tensor).
    """

    def __init__(
        self,
        block: HSTUBlock,
        cache: KVCacheManager,
        *,
        batch_buckets: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
        token_buckets: Sequence[int] | None = None,
        max_tokens: int = 16384,
        use_graphs: bool = True,
        warmup: int = 2,
        skip_idle_waits: bool = True,
    ) -> None:
        self.block = block
        self.cache = cache
        self.batch_buckets = sorted(set(batch_buckets))
        self.token_buckets = sorted(set(token_buckets or default_token_buckets(max_tokens)))
        if not self.batch_buckets or self.batch_buckets[0] < 1 or self.token_buckets[0] < 1:
            raise ValueError("batch_buckets, token_buckets: expected positive sizes")
        self.use_graphs = bool(use_graphs) and cache.device.type == "cuda"
        self.warmup = warmup
        self.skip_idle_waits = skip_idle_waits
        # per-layer waits inside the graphs (see the module docstring)
        self.graph_waits = cache.transfers.external_events
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.page_capacity = cache.config.num_pages + self.batch_buckets[-1] + 1

    @property
    def captured(self) -> list[tuple[int, int, int, bool]]:
        """The (batch, tokens, max rows per sequence, padding slot) buckets captured so far."""
        return [k for k, b in self._buckets.items() if b.graphs]

    def bucket_for(self, batch: int, tokens: int) -> tuple[int, int] | None:
        """The smallest (batch, tokens) bucket that holds a batch, or ``None`` if none does."""
        i = bisect.bisect_left(self.batch_buckets, batch)
        j = bisect.bisect_left(self.token_buckets, tokens)
        if i == len(self.batch_buckets) or j == len(self.token_buckets):
            return None
        return self.batch_buckets[i], self.token_buckets[j]

    def _key(self, meta: BatchMetadata) -> tuple[int, int, int, bool] | None:
        bt = self.bucket_for(meta.num_real, meta.num_real_tokens)
        if bt is None:
            return None
        batch, tokens = bt
        pad_rows = tokens - meta.num_real_tokens
        pad_slot = batch == meta.num_real and pad_rows > 0
        longest = max(meta.max_seqlen_q, pad_rows)
        rows = self.token_buckets[bisect.bisect_left(self.token_buckets, longest)]
        return batch, tokens, min(rows, tokens), pad_slot

    def __call__(self, x: torch.Tensor, meta: BatchMetadata) -> torch.Tensor:
        if meta.batch_size != meta.num_real:
            raise ValueError("meta: expected the unpadded metadata of cache.prepare(...)")
        key = self._key(meta) if self.use_graphs else None
        if key is None:
            return self.block.forward_cached(x, meta, self.cache)
        self.block._check_x(x, meta.num_tokens)
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = self._new_bucket(*key)
        padded = self._fill(b, x, meta)
        waits = self.graph_waits and (not self.skip_idle_waits or self.cache.transfers_pending())
        if waits not in b.graphs:
            waits = self._capture(b, padded, waits)
            b.x[: x.shape[0]].copy_(x)  # the warm-up runs accumulated into it
        if not self.graph_waits:
            self.cache.wait_all()  # stream waits, outside the graph
        graph, out, _ = b.graphs[waits]
        graph.replay()
        b.replays += 1
        b.waiting_replays += waits
        return out[: meta.num_real_tokens].clone()

    def _new_bucket(self, batch: int, tokens: int, max_rows: int, pad_slot: bool) -> _Bucket:
        dev = self.cache.device
        size = paged_layout_size(batch + int(pad_slot), self.page_capacity)
        return _Bucket(
            batch=batch + int(pad_slot),
            tokens=tokens,
            max_rows=max_rows,
            pad_slot=pad_slot,
            x=torch.zeros(tokens, self.block.hidden, dtype=self.block.dtype, device=dev),
            meta_buffer=torch.zeros(size, dtype=torch.int32, device=dev),
        )

    def _fill(self, b: _Bucket, x: torch.Tensor, meta: BatchMetadata) -> BatchMetadata:
        """Copy the batch into the bucket's static inputs (padding rows keep old, finite
        values: they are targets of the padding sequence, whose outputs are dropped; each
        replay adds that sequence's bounded layer outputs to them, in place)."""
        b.x[: x.shape[0]].copy_(x)
        return build_paged_metadata(
            meta.page_lists,
            meta.cached_lengths,
            meta.new_lengths,
            meta.target_lengths,
            page_size=meta.page_size,
            device=self.cache.device,
            user_ids=meta.user_ids,
            pad_batch=b.batch,
            pad_tokens=b.tokens,
            page_capacity=self.page_capacity,
            dummy_page=self.cache.dummy_page,
            out=b.meta_buffer,
            pad_slot=False,
        )

    def _run(
        self, b: _Bucket, meta: BatchMetadata, waits: bool, plans: CachedPlans
    ) -> torch.Tensor:
        # b.x is the graph's own input, refilled by every call: the first layer's residual
        # may go into it (no copy of x inside the graph)
        return self.block.forward_cached(
            b.x, meta, self.cache, max_seqlen_q=b.max_rows, wait_for_pages=waits,
            overwrite_x=True, plans=plans,
        )  # fmt: skip

    def _capture(self, b: _Bucket, meta: BatchMetadata, waits: bool) -> bool:
        """Capture the bucket's graph with (``waits``) or without the per-layer page waits;
        the first capture of a bucket runs the warm-up first. Returns which one it captured
        (without, where this CUDA/PyTorch refuses waits inside a capture)."""
        # Planned outside the capture (the plans' buffers must outlive it: the graph keeps them)
        plans = self.block.plan_cached(meta, max_seqlen_q=b.max_rows, kv_dtype=self.cache.kv_dtype)
        if not b.graphs:
            side = torch.cuda.Stream(self.cache.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self._run(b, meta, True, plans)
            torch.cuda.current_stream().wait_stream(side)
        try:
            b.graphs[waits] = self._capture_once(b, meta, waits, plans)
        except RuntimeError:
            if not waits:
                raise
            # This CUDA/PyTorch refused the event waits inside a capture: wait outside.
            torch.cuda.synchronize()
            self.graph_waits = False
            waits = False
            if waits not in b.graphs:
                b.graphs[waits] = self._capture_once(b, meta, waits, plans)
        return waits

    def _capture_once(
        self, b: _Bucket, meta: BatchMetadata, waits: bool, plans: CachedPlans
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, CachedPlans]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._run(b, meta, waits, plans)
        return graph, out, plans
