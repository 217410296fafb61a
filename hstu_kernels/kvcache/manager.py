"""The KV cache manager: page pool, per-user page lists, LRU eviction, host offload/onload.

Typical use, once per batch::

    meta = cache.prepare(user_ids, cached_lengths, new_lengths, num_targets)
    for layer in range(num_layers):
        cache.wait_layer(layer)              # this layer's onloaded pages are in place
        append_kv(cache.layer_cache(layer), meta.page_table, k, v, meta.cu_seqlens_q, ...)
        paged_hstu_attention(q, k, v, cache.layer_cache(layer), meta.page_table, ...)

(:class:`hstu_kernels.model.HSTUBlock` does the loop.) ``prepare`` checks the request,
makes room (evicting least-recently-used users that are not in the batch, to the host pool if
there is one), brings back users whose pages were offloaded, allocates pages for the new
tokens and builds the batch's metadata — without synchronizing the host. A bad request raises
:class:`KVCacheError` (or a ``ValueError`` naming a padding argument) and leaves the cache
exactly as it was. A request that fails after ``prepare`` is undone with
:meth:`KVCacheManager.snapshot` / :meth:`KVCacheManager.rollback`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from hstu_kernels.kvcache.allocator import PageAllocator
from hstu_kernels.kvcache.metadata import BatchMetadata, build_paged_metadata, check_padding
from hstu_kernels.kvcache.transfer import TransferEngine
from hstu_kernels.types import check_device, check_kv_dtype, check_storage_dtype

__all__ = ["CacheSnapshot", "KVCacheConfig", "KVCacheError", "KVCacheManager"]

DUMMY_PAGE = 0


class KVCacheError(ValueError):
    """A request the cache cannot serve (unknown user, wrong lengths, pool too small)."""


class LayerIndexError(IndexError, ValueError):
    """A layer index outside the cache's layers (an IndexError, and a ValueError as every
    other bad argument)."""


@dataclass(frozen=True)
class KVCacheConfig:
    """Shape of the cache.

    ``num_pages`` device pages per layer, one of which (page 0) is reserved as the dummy page
    that CUDA-graph padding rows attend to. ``host_pages``: pages of the pinned host pool that
    evicted users are offloaded to (0: evicted users are dropped). ``dtype``: the model's K/V
    (the attention inputs); ``kv_dtype``: how the pool stores them, ``None`` as ``dtype``, or
    ``torch.float8_e4m3fn``: an FP8 pool, e4m3 pages with one fp32 scale per token and head
    beside them (:mod:`hstu_kernels.reference.fp8`; 1.97x the tokens of a bf16 pool in the same
    bytes at head dim 256, scales included).
    """

    num_layers: int
    num_pages: int
    page_size: int
    heads: int
    head_dim: int
    dtype: torch.dtype = torch.bfloat16
    device: torch.device | str = "cuda"
    host_pages: int = 0
    kv_dtype: torch.dtype | None = None

    @property
    def fp8(self) -> bool:
        """Whether the pool stores e4m3 pages with scales."""
        return check_kv_dtype(self.kv_dtype, self.dtype)

    @property
    def pool_dtype(self) -> torch.dtype:
        """The dtype of the pool's pages."""
        return self.kv_dtype or self.dtype

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_pages", "page_size", "heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if self.num_pages < 2:
            raise ValueError(f"num_pages: expected >= 2 (page 0 is reserved), got {self.num_pages}")
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size: expected a power of two, got {self.page_size}")
        if not isinstance(self.host_pages, int) or self.host_pages < 0:
            raise ValueError(f"host_pages: expected an int >= 0, got {self.host_pages!r}")
        check_storage_dtype(self.dtype)
        check_kv_dtype(self.kv_dtype, self.dtype)
        device = check_device("device", self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                "device: 'cuda' (the default) but this machine has no CUDA GPU; pass device='cpu'"
            )


@dataclass
class _User:
    length: int  # history tokens cached
    gpu_pages: list[int] | None = None  # set while resident on the device
    host_pages: list[int] | None = None  # set while offloaded

    @property
    def on_gpu(self) -> bool:
        return self.gpu_pages is not None


def _pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


@dataclass(frozen=True)
class CacheSnapshot:
    """The manager's bookkeeping at one moment (:meth:`KVCacheManager.snapshot`): every user's
    cached length and pages, in LRU order, and the counters. Page contents are not copied."""

    users: tuple[tuple[Hashable, int, tuple[int, ...] | None, tuple[int, ...] | None], ...]
    stats: tuple[tuple[str, int], ...]
    owner: int = 0  # id() of the manager it was taken of
    generation: int = 0  # the manager's count of state changes when it was taken


class KVCacheManager:
    """Paged KV cache of a whole model: ``pool [num_layers, num_pages, 2, page_size, heads, D]``
    (an FP8 pool: with ``scales [num_layers, num_pages, 2, page_size, heads]`` fp32 beside it;
    pages and their scales always move together).

    Users are identified by any hashable id. A user is *on the device* (pages in ``pool``),
    *offloaded* (pages in the host pool) or unknown. Methods that change state take effect in
    stream order on CUDA: host bookkeeping is immediate, copies are asynchronous.
    """

    def __init__(self, config: KVCacheConfig) -> None:
        self.config = config
        c = config
        device = torch.device(c.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        shape = (c.num_layers, c.num_pages, 2, c.page_size, c.heads, c.head_dim)
        self.pool = torch.zeros(shape, dtype=c.pool_dtype, device=device)
        # (scale 1 on unwritten slots: the dummy page reads as zeros, as a 16-bit pool's does)
        self.scales = torch.ones(shape[:-1], device=device) if c.fp8 else None
        self.host_pool: torch.Tensor | None = None
        self.host_scales: torch.Tensor | None = None
        self.host_allocator: PageAllocator | None = None
        if c.host_pages:
            host_shape = (c.num_layers, c.host_pages, *shape[2:])
            pin = device.type == "cuda"
            self.host_pool = torch.zeros(host_shape, dtype=c.pool_dtype, pin_memory=pin)
            if c.fp8:
                self.host_scales = torch.ones(host_shape[:-1], pin_memory=pin)
            self.host_allocator = PageAllocator(c.host_pages)
        self.allocator = PageAllocator(c.num_pages, reserved=[DUMMY_PAGE])
        planes = [(self.pool, self.host_pool)]
        if c.fp8:
            # e4m3 pages move as bytes: indexing and copies of uint8 exist everywhere
            host = None if self.host_pool is None else self.host_pool.view(torch.uint8)
            planes = [(self.pool.view(torch.uint8), host), (self.scales, self.host_scales)]
        self.transfers = TransferEngine(planes)
        self._users: OrderedDict[Hashable, _User] = OrderedDict()  # least recently used first
        # Counts the calls that changed users or pages (prepare, evict, drop, clear): a
        # rollback undoes one prepare, and refuses a snapshot older than that.
        self._generation = 0
        self.stats = {"offloaded": 0, "onloaded": 0, "dropped": 0}

    # --- queries -------------------------------------------------------------------------

    @property
    def page_size(self) -> int:
        return self.config.page_size

    @property
    def dummy_page(self) -> int:
        """The reserved page that padding rows of a CUDA-graph bucket attend to."""
        return DUMMY_PAGE

    def _check_layer(self, layer: object) -> int:
        n = self.config.num_layers
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n:
            raise LayerIndexError(f"layer: expected an int in 0..{n - 1}, got {layer!r}")
        return layer

    def layer_cache(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s cache ``[num_pages, 2, page_size, heads, D]`` (a view)."""
        return self.pool[self._check_layer(layer)]

    def layer_scales(self, layer: int) -> torch.Tensor | None:
        """Layer ``layer``'s scales ``[num_pages, 2, page_size, heads]`` (a view) for an FP8
        pool (the ops' ``kv_scales``), ``None`` for a 16-bit one."""
        layer = self._check_layer(layer)
        return None if self.scales is None else self.scales[layer]

    @property
    def kv_dtype(self) -> torch.dtype | None:
        """The plans' ``kv_dtype``: ``torch.float8_e4m3fn`` for an FP8 pool, else ``None``."""
        return self.config.pool_dtype if self.config.fp8 else None

    def cached_length(self, user_id: Hashable) -> int:
        """History tokens cached for ``user_id`` (on the device or offloaded); 0 if unknown."""
        u = self._users.get(user_id)
        return 0 if u is None else u.length

    def location(self, user_id: Hashable) -> str | None:
        """``"device"``, ``"host"`` or ``None`` (unknown)."""
        u = self._users.get(user_id)
        if u is None:
            return None
        return "device" if u.on_gpu else "host"

    def user_pages(self, user_id: Hashable) -> list[int]:
        """The device pages of a resident user, in history order."""
        u = self._users.get(user_id)
        if u is None or not u.on_gpu:
            raise KVCacheError(f"user_id: {user_id!r} has no pages on the device")
        return list(u.gpu_pages)

    def host_user_pages(self, user_id: Hashable) -> list[int]:
        """The host pages of an offloaded user, in history order."""
        u = self._users.get(user_id)
        if u is None or u.host_pages is None:
            raise KVCacheError(f"user_id: {user_id!r} has no pages on the host")
        return list(u.host_pages)

    @property
    def users(self) -> list[Hashable]:
        """Known users, least recently used first."""
        return list(self._users)

    # --- the per-batch entry point -------------------------------------------------------

    def prepare(
        self,
        user_ids: Sequence[Hashable],
        cached_lengths: Sequence[int],
        new_lengths: Sequence[int],
        num_targets: Sequence[int],
        *,
        pad_batch: int | None = None,
        pad_tokens: int | None = None,
        page_capacity: int | None = None,
        out: torch.Tensor | None = None,
    ) -> BatchMetadata:
        """Make room for a batch, bring its users' pages to the device, build its metadata.

        Args:
            user_ids: one distinct id per sequence.
            cached_lengths: history tokens of each user the caller believes are cached; must
                equal :meth:`cached_length` (0 for a new user).
            new_lengths: new history tokens of each sequence (appended by the model).
            num_targets: target tokens of each sequence (never cached).
            pad_batch, pad_tokens, page_capacity, out: pad the metadata to a CUDA-graph
                bucket, see :func:`~hstu_kernels.kvcache.metadata.build_paged_metadata`.

        After the call each user's cached length is ``cached + new`` and its pages are
        allocated; the model must append the new tokens' K/V (``meta.page_table`` describes
        the history *including* them). Before layer ``l`` reads the cache, the current stream
        must :meth:`wait_layer` ``(l)``.

        Raises:
            KVCacheError: duplicate or unknown user, lengths that disagree with the cache, an
                empty history, or a batch that does not fit in the pool even after evicting
                every other user. The cache is then unchanged.
        """
        ids, cached, new, tgt = self._check_request(
            user_ids, cached_lengths, new_lengths, num_targets
        )
        ps = self.page_size
        padded = pad_batch is not None or pad_tokens is not None or page_capacity is not None
        check_padding(
            len(ids), sum(new) + sum(tgt), sum(_pages_for(c + n, ps) for c, n in zip(cached, new)),
            device=self.device, pad_batch=pad_batch, pad_tokens=pad_tokens,
            page_capacity=page_capacity, dummy_page=DUMMY_PAGE if padded else None, out=out,
        )  # fmt: skip
        before = self.snapshot()
        try:
            meta = self._prepare(ids, cached, new, tgt, pad_batch, pad_tokens, page_capacity, out)
        except BaseException:  # nothing checkable is left to fail here, but a CUDA error can
            self.rollback(before)
            raise
        self._generation += 1
        return meta

    def _prepare(
        self,
        ids: list,
        cached: list[int],
        new: list[int],
        tgt: list[int],
        pad_batch: int | None,
        pad_tokens: int | None,
        page_capacity: int | None,
        out: torch.Tensor | None,
    ) -> BatchMetadata:
        ps = self.page_size
        in_batch = set(ids)
        need = 0
        for uid, c, n in zip(ids, cached, new, strict=True):
            u = self._users.get(uid)
            have = len(u.gpu_pages) if u is not None and u.on_gpu else 0
            need += _pages_for(c + n, ps) - have
        evictable = sum(
            len(u.gpu_pages) for uid, u in self._users.items() if u.on_gpu and uid not in in_batch
        )
        if need > self.allocator.num_free + evictable:
            raise KVCacheError(
                f"pool too small for this batch: it needs {need} more pages, "
                f"{self.allocator.num_free} are free and {evictable} could be evicted "
                f"(pool of {self.allocator.capacity} usable pages of {ps} tokens)"
            )

        # From here on nothing can fail: apply.
        offloads = self._make_room(need, in_batch)
        onloads = []
        onloaded_host_pages = []
        page_lists = []
        for uid, c, n in zip(ids, cached, new, strict=True):
            u = self._users.get(uid)
            total = _pages_for(c + n, ps)
            if u is None:
                u = self._users[uid] = _User(0, gpu_pages=[])
            elif not u.on_gpu:
                u.gpu_pages = self.allocator.allocate(len(u.host_pages))
                onloads.append((u.host_pages, list(u.gpu_pages)))
                onloaded_host_pages.extend(u.host_pages)
                u.host_pages = None
                self.stats["onloaded"] += 1
            u.gpu_pages += self.allocator.allocate(total - len(u.gpu_pages))
            u.length = c + n
            self._users.move_to_end(uid)
            page_lists.append(list(u.gpu_pages))
        self.transfers.transfer(offloads, onloads)
        if onloaded_host_pages:
            # Safe to hand out again: the next offload waits for this onload to finish.
            self.host_allocator.free(onloaded_host_pages)
        pad = {}
        if pad_batch is not None or pad_tokens is not None:
            pad = dict(pad_batch=pad_batch, pad_tokens=pad_tokens, dummy_page=DUMMY_PAGE)
        if page_capacity is not None:
            pad.update(page_capacity=page_capacity, dummy_page=DUMMY_PAGE)
        return build_paged_metadata(
            page_lists,
            cached,
            new,
            tgt,
            page_size=ps,
            device=self.device,
            user_ids=ids,
            out=out,
            **pad,
        )

    def _check_request(
        self,
        user_ids: Sequence[Hashable],
        cached_lengths: Sequence[int],
        new_lengths: Sequence[int],
        num_targets: Sequence[int],
    ) -> tuple[list, list[int], list[int], list[int]]:
        ids = list(user_ids)
        lists = []
        for name, values in (
            ("cached_lengths", cached_lengths),
            ("new_lengths", new_lengths),
            ("num_targets", num_targets),
        ):
            vals = [int(v) if isinstance(v, torch.Tensor) else v for v in values]
            if len(vals) != len(ids):
                raise KVCacheError(
                    f"{name}: expected one entry per user ({len(ids)}), got {len(vals)}"
                )
            for b, v in enumerate(vals):
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise KVCacheError(f"{name}[{b}]: expected an int >= 0, got {v!r}")
            lists.append(vals)
        cached, new, tgt = lists
        if not ids:
            raise KVCacheError("user_ids: expected at least one user")
        seen = set()
        for b, uid in enumerate(ids):
            if uid in seen:
                raise KVCacheError(f"user_ids: user {uid!r} appears twice in the batch")
            seen.add(uid)
            u = self._users.get(uid)
            if u is None and cached[b] > 0:
                raise KVCacheError(
                    f"user_ids[{b}]: unknown user {uid!r} (never cached, or evicted and dropped) "
                    f"but cached_lengths[{b}] = {cached[b]}"
                )
            if u is not None and u.length != cached[b]:
                raise KVCacheError(
                    f"cached_lengths[{b}]: the cache holds {u.length} tokens of user {uid!r}, "
                    f"the request says {cached[b]}"
                )
            if cached[b] + new[b] < 1:
                raise KVCacheError(
                    f"new_lengths[{b}]: user {uid!r} would have an empty history (cached 0, new 0)"
                )
        return ids, cached, new, tgt

    def _make_room(self, need: int, in_batch: set) -> list[tuple[list[int], list[int]]]:
        """Evict least-recently-used users outside the batch until ``need`` pages are free;
        returns the offload copies (device pages, host pages) to issue."""
        offloads = []
        for uid in list(self._users):
            if self.allocator.num_free >= need:
                break
            u = self._users.get(uid)  # None: dropped from the host pool just now
            if u is None or uid in in_batch or not u.on_gpu:
                continue
            host = self._host_room(len(u.gpu_pages), in_batch)
            if host is None:
                del self._users[uid]
                self.stats["dropped"] += 1
            else:
                offloads.append((u.gpu_pages, host))
                u.host_pages = host
                self.stats["offloaded"] += 1
            self.allocator.free(u.gpu_pages)
            u.gpu_pages = None
        return offloads

    def _host_room(self, n: int, in_batch: set) -> list[int] | None:
        """``n`` host pages, dropping least-recently-used offloaded users if needed; ``None``
        if there is no host pool or it cannot hold ``n`` pages."""
        alloc = self.host_allocator
        if alloc is None or n > alloc.capacity:
            return None
        droppable = sum(
            len(u.host_pages) for uid, u in self._users.items()
            if u.host_pages is not None and uid not in in_batch
        )  # fmt: skip
        if alloc.num_free + droppable < n:
            return None  # dropping would not make room: drop nobody
        for uid in list(self._users):
            if alloc.num_free >= n:
                break
            u = self._users[uid]
            if u.host_pages is not None and uid not in in_batch:
                alloc.free(u.host_pages)
                del self._users[uid]
                self.stats["dropped"] += 1
        if alloc.num_free < n:
            return None
        return alloc.allocate(n)

    # --- transactions ---------------------------------------------------------------------

    def snapshot(self) -> CacheSnapshot:
        """The bookkeeping now, for :meth:`rollback` (cheap: page lists, not page contents)."""
        users = tuple(
            (uid, u.length,
             None if u.gpu_pages is None else tuple(u.gpu_pages),
             None if u.host_pages is None else tuple(u.host_pages))
            for uid, u in self._users.items()
        )  # fmt: skip
        return CacheSnapshot(users, tuple(self.stats.items()), id(self), self._generation)

    def rollback(self, snapshot: CacheSnapshot) -> None:
        """Undo what happened since ``snapshot`` (a request that failed after
        :meth:`prepare`): users that came since are forgotten, and every other user's length,
        pages and LRU position are as they were; pages allocated since are freed (what the
        failed request appended is discarded).

        Except for evictions: a user that was evicted since stays evicted, offloaded (its host
        copy is intact) or dropped, because its device pages may have been handed to the
        failed request and written since (an onload, an append); likewise a user dropped
        from the host pool to make room. The state is consistent, and every user it keeps
        holds the K/V it held.
        """
        if not isinstance(snapshot, CacheSnapshot):
            raise TypeError(f"snapshot: expected a CacheSnapshot, got {type(snapshot).__name__}")
        if snapshot.owner != id(self):
            raise ValueError("snapshot: taken of another cache manager")
        if self._generation - snapshot.generation > 1:
            # Undoing several changes could hand one host page to two users (a user onloaded
            # since, whose host pages were reused by a later offload, would be restored onto
            # them): a rollback undoes the one prepare that followed the snapshot.
            raise ValueError(
                "snapshot: more than one prepare/evict/drop/clear since it was taken (a "
                "rollback undoes the one prepare that followed it)"
            )
        stats = dict(snapshot.stats)
        users: OrderedDict[Hashable, _User] = OrderedDict()
        for uid, length, gpu, host in snapshot.users:
            now = self._users.get(uid)
            if now is None:  # dropped since: its pages may be reused
                stats["dropped"] += 1
                continue
            if gpu is not None and not now.on_gpu:  # offloaded since: it stays offloaded
                users[uid] = _User(now.length, None, list(now.host_pages))
                stats["offloaded"] += 1
                continue
            users[uid] = _User(
                length, None if gpu is None else list(gpu), None if host is None else list(host)
            )
        self._users = users
        self.stats = stats
        self._generation = snapshot.generation
        self.allocator.reset(p for u in users.values() if u.on_gpu for p in u.gpu_pages)
        if self.host_allocator is not None:
            self.host_allocator.reset(
                p for u in users.values() if u.host_pages is not None for p in u.host_pages
            )

    # --- explicit control ----------------------------------------------------------------

    def wait_layer(self, layer: int) -> None:
        """Make the current stream wait for layer ``layer``'s transfers issued so far (the
        onloads of :meth:`prepare`, the offloads of :meth:`prepare` and :meth:`evict`; a no-op
        on the CPU, capturable into a CUDA graph)."""
        self.transfers.wait_layer(self._check_layer(layer))

    def transfers_pending(self) -> bool:
        """Whether a page copy issued by :meth:`prepare` (or :meth:`evict`) may still be
        running; ``False`` means every :meth:`wait_layer` would be satisfied already. A
        query of an event: it never blocks the host (always ``False`` on the CPU)."""
        return self.transfers.pending()

    def wait_all(self) -> None:
        """Make the current stream wait for every layer's transfers issued so far (see
        :meth:`wait_layer`)."""
        for layer in range(self.config.num_layers):
            self.transfers.wait_layer(layer)

    def evict(self, user_id: Hashable, *, offload: bool = True) -> None:
        """Move a resident user's pages to the host pool (or drop them if ``offload`` is
        false or the host pool cannot hold them)."""
        if not isinstance(offload, bool):
            raise TypeError(f"offload: expected a bool, got {offload!r}")
        u = self._users.get(user_id)
        if u is None or not u.on_gpu:
            raise KVCacheError(f"user_id: {user_id!r} has no pages on the device")
        self._generation += 1
        host = self._host_room(len(u.gpu_pages), {user_id}) if offload else None
        if host is None:
            del self._users[user_id]
            self.stats["dropped"] += 1
        else:
            self.transfers.transfer([(u.gpu_pages, host)], [])
            u.host_pages = host
            self.stats["offloaded"] += 1
        self.allocator.free(u.gpu_pages)
        u.gpu_pages = None

    def drop(self, user_id: Hashable) -> None:
        """Forget a user (device and host pages are freed)."""
        u = self._users.pop(user_id, None)
        if u is None:
            raise KVCacheError(f"user_id: unknown user {user_id!r}")
        self._generation += 1
        if u.on_gpu:
            self.allocator.free(u.gpu_pages)
        if u.host_pages is not None:
            self.host_allocator.free(u.host_pages)

    def clear(self) -> None:
        """Forget every user."""
        self._generation += 1
        for uid in list(self._users):
            self.drop(uid)

    def synchronize(self) -> None:
        """Block the host until every offload/onload copy has finished."""
        self.transfers.synchronize()

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if a page is owned twice, owned and free, or leaked."""
        for pool, alloc, attr in (
            ("device", self.allocator, "gpu_pages"),
            ("host", self.host_allocator, "host_pages"),
        ):
            if alloc is None:
                continue
            owned: dict[int, Hashable] = {}
            for uid, u in self._users.items():
                pages = getattr(u, attr)
                if pages is None:
                    continue
                if attr == "gpu_pages":
                    assert len(pages) == _pages_for(u.length, self.page_size), (uid, u)
                for p in pages:
                    assert p not in owned, f"{pool} page {p} owned by {owned[p]!r} and {uid!r}"
                    assert not alloc.is_free(p), f"{pool} page {p} of {uid!r} is on the free list"
                    assert p not in alloc.reserved, f"{pool} page {p} is reserved"
                    owned[p] = uid
            assert len(owned) + alloc.num_free == alloc.capacity, (
                f"{pool} pages leaked: {alloc.capacity - alloc.num_free - len(owned)}"
            )
        for uid, u in self._users.items():
            assert (u.gpu_pages is None) != (u.host_pages is None), f"user {uid!r}: {u}"
