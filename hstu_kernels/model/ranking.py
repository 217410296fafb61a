"""End-to-end HSTU ranking inference: embeddings -> HSTU block -> a score per candidate.

:class:`HSTURankingModel` scores a :class:`~hstu_kernels.model.requests.RequestBatch` in one
of three modes (:data:`MODES`):

- ``"baseline"``: no cache, no graphs: every history token and every candidate of every user
  is embedded and run through the block (jagged attention over whole sequences);
- ``"kvcache"``: only the history tokens the KV cache does not hold yet (and the candidates)
  are embedded and computed; the block appends their K/V and attends over the cached history;
- ``"kvcache+graphs"``: as ``"kvcache"``, with the block replayed from CUDA graphs (on a CPU
  model, which has no graphs, it runs the block eagerly: the same as ``"kvcache"``).

All three give the same scores up to rounding (the block's ``scaling_seqlen`` is a model
constant, so cached and recomputed attention agree). In the cached modes the cache's
``prepare`` issues the host-to-device onload of offloaded users on its own stream and returns
at once; the embedding lookup then runs on the compute stream while the copies are in flight,
and each layer waits only for its own layer's pages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hstu_kernels.dispatch import check_backend_name
from hstu_kernels.kvcache.manager import KVCacheManager
from hstu_kernels.kvcache.metadata import build_jagged_metadata
from hstu_kernels.model.block import HSTUBlock
from hstu_kernels.model.embeddings import EmbeddingLookup, TorchEmbeddings
from hstu_kernels.model.graphs import CachedBlockGraphs
from hstu_kernels.model.requests import RequestBatch
from hstu_kernels.types import check_kv_dtype, check_storage_dtype, is_int

__all__ = [
    "MODES",
    "HSTURankingModel",
    "PackedInput",
    "RankingConfig",
    "RankingHead",
    "pack_requests",
]

MODES = ("baseline", "kvcache", "kvcache+graphs")


@dataclass(frozen=True)
class RankingConfig:
    """Shape of the ranking model. Defaults are the seed's configuration (8 layers, hidden
    1024, 4 heads of 256, sequences up to 4096 history tokens + 256 candidates, bf16)."""

    num_layers: int = 8
    hidden: int = 1024
    heads: int = 4
    head_dim: int = 256
    max_batch: int = 16
    max_history: int = 4096
    max_targets: int = 256
    num_items: int = 1_000_000
    num_actions: int = 16
    num_tasks: int = 1
    page_size: int = 32
    dtype: torch.dtype = torch.bfloat16
    backend: str = "auto"
    seed: int = 0
    # the KV cache's pages: None (as dtype) or torch.float8_e4m3fn (an FP8 pool with scales)
    kv_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        for name in (
            "num_layers",
            "hidden",
            "heads",
            "head_dim",
            "max_batch",
            "max_history",
            "max_targets",
            "num_items",
            "num_actions",
            "num_tasks",
            "page_size",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size: expected a power of two, got {self.page_size}")
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise TypeError(f"dtype: expected a floating-point torch.dtype, got {self.dtype!r}")
        check_backend_name(self.backend)
        check_kv_dtype(self.kv_dtype, self.dtype)
        if not is_int(self.seed):
            raise TypeError(f"seed: expected an int, got {self.seed!r}")

    @property
    def scaling_seqlen(self) -> int:
        """The attention's score divisor: the longest sequence the model takes."""
        return self.max_history + self.max_targets

    @classmethod
    def tiny(cls, **overrides) -> RankingConfig:
        """A CPU-sized model (2 layers, hidden 64, 2 heads of 32, fp32, histories <= 256)."""
        args = dict(
            num_layers=2,
            hidden=64,
            heads=2,
            head_dim=32,
            max_batch=4,
            max_history=256,
            max_targets=16,
            num_items=1000,
            num_actions=8,
            page_size=16,
            dtype=torch.float32,
        )
        args.update(overrides)
        return cls(**args)


@dataclass(frozen=True)
class PackedInput:
    """The ids of a batch packed as jagged rows.

    Sequence ``b``'s rows are its uncomputed history tokens (``new[b]`` of them, history
    positions ``H_b - new[b] .. H_b - 1``), then its ``T_b`` candidates (position ``H_b``).
    Candidates carry the action id ``num_actions`` (a reserved "to be ranked" id).

    The four id tensors are views of one int64 buffer (pinned when CUDA is present), so moving
    a batch to the GPU is one asynchronous copy.
    """

    buffer: torch.Tensor  # int64 [3 * rows + sum T_b]
    histories: tuple[int, ...]
    new: tuple[int, ...]
    targets: tuple[int, ...]

    @property
    def rows(self) -> int:
        return sum(self.new) + sum(self.targets)

    @property
    def items(self) -> torch.Tensor:
        """int64 ``[rows]``"""
        return self.buffer[: self.rows]

    @property
    def actions(self) -> torch.Tensor:
        """int64 ``[rows]``"""
        return self.buffer[self.rows : 2 * self.rows]

    @property
    def positions(self) -> torch.Tensor:
        """int64 ``[rows]``"""
        return self.buffer[2 * self.rows : 3 * self.rows]

    @property
    def target_rows(self) -> torch.Tensor:
        """int64 ``[sum T_b]``: the rows of the candidates, in batch order."""
        return self.buffer[3 * self.rows :]

    @property
    def max_seqlen(self) -> int:
        return max((n + t for n, t in zip(self.new, self.targets, strict=True)), default=0)

    def to(self, device: torch.device | str) -> PackedInput:
        """The ids on ``device`` (asynchronous from pinned memory)."""
        buffer = self.buffer.to(device, non_blocking=True)
        return PackedInput(buffer, self.histories, self.new, self.targets)


def pack_requests(
    batch: RequestBatch, num_actions: int, cached: Sequence[int] | None = None
) -> PackedInput:
    """Pack a batch's uncached history tokens and its candidates.

    ``cached[b]``: tokens of sequence ``b``'s history already in the KV cache (``None``: none,
    the whole history is computed, as the baseline does); ``cached[b] == H_b`` leaves only the
    candidates to compute.
    """
    if not isinstance(batch, RequestBatch):
        raise TypeError(f"batch: expected a RequestBatch, got {type(batch).__name__}")
    if not is_int(num_actions) or num_actions < 1:
        raise ValueError(f"num_actions: expected a positive int, got {num_actions!r}")
    reqs = batch.requests
    cached = [0] * len(reqs) if cached is None else list(cached)
    if len(cached) != len(reqs):
        raise ValueError(f"cached: expected {len(reqs)} entries, got {len(cached)}")
    for r, c in zip(reqs, cached, strict=True):
        if not 0 <= c <= r.history:
            raise ValueError(f"cached: expected 0..{r.history} for user {r.user_id}, got {c}")
    rows = sum(r.history - c + r.targets for r, c in zip(reqs, cached, strict=True))
    total = 3 * rows + sum(r.targets for r in reqs)
    # Filled in place through a numpy view: a few slice copies per user, no small tensors.
    buffer = torch.empty(total, dtype=torch.int64, pin_memory=torch.cuda.is_available())
    buf = buffer.numpy()
    items, actions, positions = buf[:rows], buf[rows : 2 * rows], buf[2 * rows : 3 * rows]
    targets = buf[3 * rows :]
    o = t_o = 0
    for r, c in zip(reqs, cached, strict=True):
        h, t = r.history, r.targets
        n = h - c
        items[o : o + n] = r.history_items.numpy()[c:]
        items[o + n : o + n + t] = r.candidates.numpy()
        actions[o : o + n] = r.history_actions.numpy()[c:]
        actions[o + n : o + n + t] = num_actions
        positions[o : o + n] = np.arange(c, h)
        positions[o + n : o + n + t] = h
        targets[t_o : t_o + t] = np.arange(o + n, o + n + t)
        o += n + t
        t_o += t
    return PackedInput(
        buffer,
        tuple(r.history for r in reqs),
        tuple(r.history - c for r, c in zip(reqs, cached, strict=True)),
        tuple(r.targets for r in reqs),
    )


class RankingHead(nn.Module):
    """Scores each candidate from its output row: LayerNorm -> MLP -> ``num_tasks`` logits."""

    def __init__(
        self,
        hidden: int,
        num_tasks: int,
        *,
        inner: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, v in (("hidden", hidden), ("num_tasks", num_tasks), ("inner", inner or 1)):
            if not is_int(v) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        check_storage_dtype(dtype)
        inner = inner or max(hidden // 2, 1)
        kw = dict(dtype=dtype, device=device)
        self.norm = nn.LayerNorm(hidden, **kw)
        self.fc1 = nn.Linear(hidden, inner, **kw)
        self.fc2 = nn.Linear(inner, num_tasks, **kw)
        # Seeded (not the global RNG), so two models built alike score alike.
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                std = 0.1 if p.dim() == 1 else p.shape[1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std + (p is self.norm.weight))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """``[n, hidden]`` -> logits ``[n, num_tasks]``."""
        return self.fc2(nn.functional.silu(self.fc1(self.norm(rows))))


class HSTURankingModel(nn.Module):
    """Embeddings, an :class:`~hstu_kernels.model.block.HSTUBlock` and a :class:`RankingHead`.

    A history token's input is ``item + action + position`` embeddings; a candidate's is
    ``item + <candidate action> + position H_b`` (every candidate of a user sits at the same
    position, as the HSTU mask treats them alike).

    Args:
        config: the model's shape.
        device: where the parameters live.
        embeddings: a lookup serving features ``"item"`` (``num_items`` rows) and ``"action"``
            (``num_actions + 1`` rows: the last one marks candidates), each ``hidden`` wide;
            default: :class:`~hstu_kernels.model.embeddings.TorchEmbeddings`.
    """

    def __init__(
        self,
        config: RankingConfig,
        *,
        device: torch.device | str = "cpu",
        embeddings: EmbeddingLookup | None = None,
    ) -> None:
        super().__init__()
        c = self.config = config
        if embeddings is None:
            tables = {"item": (c.num_items, c.hidden), "action": (c.num_actions + 1, c.hidden)}
            embeddings = TorchEmbeddings(tables, dtype=c.dtype, device=device, seed=c.seed)
        dims = dict(embeddings.dims)
        if dims.get("item") != c.hidden or dims.get("action") != c.hidden:
            raise ValueError(
                f"embeddings: expected features 'item' and 'action' of width {c.hidden}, got {dims}"
            )
        self.embeddings = embeddings
        gen = torch.Generator().manual_seed(c.seed + 7919)
        pos = torch.randn(c.max_history + 1, c.hidden, generator=gen) * 0.02
        self.positions = nn.Embedding.from_pretrained(pos.to(dtype=c.dtype, device=device))
        self.block = HSTUBlock(
            c.num_layers,
            c.hidden,
            c.heads,
            c.head_dim,
            scaling_seqlen=c.scaling_seqlen,
            dtype=c.dtype,
            device=device,
            backend=c.backend,
            seed=c.seed,
        )
        self.head = RankingHead(c.hidden, c.num_tasks, dtype=c.dtype, device=device, seed=c.seed)
        # One graph runner per cache (its graphs point into that cache's pool). The runner
        # holds its cache, so an entry lives until release_graphs(cache).
        self._graphs: dict[KVCacheManager, CachedBlockGraphs] = {}

    @property
    def device(self) -> torch.device:
        return self.block.device

    def make_cache(self, num_pages: int | None = None, *, host_pages: int = 0) -> KVCacheManager:
        """A KV cache for this model; by default big enough for ``max_batch`` users of
        ``max_history`` tokens each (plus the reserved dummy page)."""
        c = self.config
        if num_pages is None:
            num_pages = c.max_batch * -(-c.max_history // c.page_size) + 1
        return self.block.make_cache(
            num_pages, c.page_size, host_pages=host_pages, kv_dtype=c.kv_dtype
        )

    def embed(self, packed: PackedInput) -> torch.Tensor:
        """The block's input rows ``[rows, hidden]`` for packed ids (on the model's device)."""
        e = self.embeddings({"item": packed.items, "action": packed.actions})
        x = e["item"] + e["action"]
        x += self.positions(packed.positions)
        return x.to(self.config.dtype)

    def _check_batch(self, batch: RequestBatch) -> None:
        c = self.config
        if not isinstance(batch, RequestBatch):
            raise TypeError(f"batch: expected a RequestBatch, got {type(batch).__name__}")
        if batch.size > c.max_batch:
            raise ValueError(f"batch: {batch.size} users, the model takes up to {c.max_batch}")
        users = [r.user_id for r in batch.requests]
        if len(set(users)) != len(users):
            raise ValueError(f"batch: a user appears twice ({users})")
        for r in batch.requests:
            fields = (
                ("history_items", r.history_items, c.num_items),
                ("history_actions", r.history_actions, c.num_actions),
                ("candidates", r.candidates, c.num_items),
            )
            for name, ids, _ in fields:
                if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
                    raise TypeError(
                        f"batch: user {r.user_id}'s {name}: expected an int64 or int32 tensor, got "
                        f"{getattr(ids, 'dtype', type(ids).__name__)}"
                    )
                if ids.dim() != 1 or ids.device.type != "cpu":
                    raise ValueError(
                        f"batch: user {r.user_id}'s {name}: expected a 1-D tensor on the CPU, got "
                        f"shape {tuple(ids.shape)} on {ids.device}"
                    )
            if r.history_actions.shape != r.history_items.shape:
                raise ValueError(
                    f"batch: user {r.user_id}'s history_actions: expected one per history item "
                    f"({r.history}), got {r.history_actions.shape[0]}"
                )
            if not isinstance(r.new, int) or isinstance(r.new, bool) or not 0 <= r.new <= r.history:
                raise ValueError(
                    f"batch: user {r.user_id}'s new: expected an int in 0..{r.history} (its "
                    f"history), got {r.new!r}"
                )
            if not 1 <= r.history <= c.max_history or r.targets > c.max_targets:
                raise ValueError(
                    f"batch: user {r.user_id} has {r.history} history tokens and {r.targets} "
                    f"candidates; the model takes 1..{c.max_history} and <= {c.max_targets}"
                )
            # Ids outside the tables would fail inside the embedding lookup, after the cache
            # was prepared; the candidate action id is reserved for candidates.
            for name, ids, size in fields:
                values = (
                    ids.numpy()
                )  # (numpy's min and max: 3.9 against 5.8 us for torch's, 4096 ids)
                if values.size and not 0 <= values.min() <= values.max() < size:
                    raise ValueError(
                        f"batch: user {r.user_id}'s {name}: expected ids in 0..{size - 1}, got "
                        f"ids in {int(values.min())}..{int(values.max())}"
                    )

    @torch.inference_mode()
    def score(
        self,
        batch: RequestBatch,
        mode: str = "baseline",
        cache: KVCacheManager | None = None,
    ) -> torch.Tensor:
        """Logits ``[sum_b T_b, num_tasks]`` of every candidate, users in batch order.

        ``mode`` is one of :data:`MODES`; the cached modes need ``cache`` (from
        :meth:`make_cache`) and update it: each user's whole history is cached afterwards.
        A user's history must extend what the cache holds for it (histories only grow).
        """
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self._check_batch(batch)
        if mode == "baseline":
            if cache is not None:
                raise ValueError("cache: the baseline mode uses no cache (pass None)")
            return self._score_baseline(batch)
        if not isinstance(cache, KVCacheManager):
            raise TypeError(f"cache: mode {mode!r} needs a KVCacheManager, got {cache!r}")
        return self._score_cached(batch, cache, graphs=mode == "kvcache+graphs")

    def _score_baseline(self, batch: RequestBatch) -> torch.Tensor:
        device = self.device
        packed = pack_requests(batch, self.config.num_actions).to(device)
        meta = build_jagged_metadata(batch.histories, batch.targets, device)
        y = self.block.forward_uncached(self.embed(packed), meta)
        return self.head(y.index_select(0, packed.target_rows))

    def _score_cached(
        self, batch: RequestBatch, cache: KVCacheManager, *, graphs: bool
    ) -> torch.Tensor:
        users = batch.user_ids
        cached = [cache.cached_length(u) for u in users]
        for u, c, h in zip(users, cached, batch.histories, strict=True):
            if c > h:
                raise ValueError(
                    f"batch: user {u} has {h} history tokens but the cache holds {c} of them "
                    "(a history must extend what is cached)"
                )
        new = [h - c for h, c in zip(batch.histories, cached, strict=True)]
        device = self.device
        # Issues the onload of offloaded users on the cache's copy stream and returns without
        # waiting: the host packing and the embedding lookup below overlap the copies, and
        # each layer of the block waits only for its own layer's pages.
        before = cache.snapshot()
        meta = cache.prepare(users, cached, new, batch.targets)
        try:
            packed = pack_requests(batch, self.config.num_actions, cached).to(device)
            x = self.embed(packed)
            if graphs:
                y = self.graph_runner(cache)(x, meta)
            else:
                y = self.block.forward_cached(x, meta, cache)
            return self.head(y.index_select(0, packed.target_rows))
        except BaseException:
            # The cache must not record tokens that were never written (cache.rollback).
            cache.rollback(before)
            raise

    def graph_runner(self, cache: KVCacheManager) -> CachedBlockGraphs:
        """The CUDA-graph runner of the block over ``cache`` (made on first use; it captures
        one graph per (batch, tokens) bucket the first time a batch needs it)."""
        runner = self._graphs.get(cache)
        if runner is None:
            c = self.config
            buckets = [b for b in (1, 2, 4, 8, 16, 32, 64) if b < c.max_batch] + [c.max_batch]
            runner = CachedBlockGraphs(
                self.block,
                cache,
                batch_buckets=buckets,
                max_tokens=c.max_batch * (c.max_history + c.max_targets),
            )
            self._graphs[cache] = runner
        return runner

    def release_graphs(self, cache: KVCacheManager) -> None:
        """Drop the graph runner of ``cache`` (its graphs and their memory), if any."""
        self._graphs.pop(cache, None)
