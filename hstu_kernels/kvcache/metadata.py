"""Batch metadata: the small int32 tensors the ops take, built in one host buffer and moved to
the device with one non-blocking copy (no host synchronization).

Two forms: :func:`build_paged_metadata` for the cached path (page table, query offsets,
targets, append positions) and :func:`build_jagged_metadata` for the uncached path (offsets of
whole sequences). The paged form can be padded to a CUDA-graph bucket: extra batch slots hold
empty sequences, and one last *padding sequence* holds the padding rows, all marked as targets
(so nothing is appended to the cache) and attending only a reserved dummy page.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hstu_kernels.types import BatchLayout, PageTable, check_device, is_page_size

__all__ = [
    "BatchMetadata",
    "JaggedMetadata",
    "build_jagged_metadata",
    "build_paged_metadata",
    "check_padding",
    "paged_layout_size",
]


def _host_buffer(n: int, device: torch.device) -> torch.Tensor:
    # Pinned memory lets the copy below be asynchronous; torch's caching host allocator keeps
    # the block alive until that copy has run, so a fresh buffer per batch is safe.
    pin = device.type == "cuda"
    return torch.empty(n, dtype=torch.int32, pin_memory=pin)


def _to_device(host: torch.Tensor, device: torch.device, out: torch.Tensor | None) -> torch.Tensor:
    """``host`` on ``device``: a new tensor, or the leading entries of ``out`` (a buffer
    :func:`check_padding` accepted)."""
    if out is None:
        return host.to(device, non_blocking=True)
    out[: host.numel()].copy_(host, non_blocking=True)
    return out[: host.numel()]


@dataclass(frozen=True)
class JaggedMetadata:
    """Offsets of whole sequences (history + targets) for :func:`hstu_kernels.hstu_attention`.

    ``cu_seqlens [B+1]`` and ``num_targets [B]`` are int32 views into one device buffer;
    ``max_seqlen`` and ``num_tokens`` are host ints (known without a sync).
    """

    cu_seqlens: torch.Tensor
    num_targets: torch.Tensor
    lengths: tuple[int, ...]
    targets: tuple[int, ...]
    max_seqlen: int
    num_tokens: int

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def layout(self) -> BatchLayout:
        """The host values of the tensors, for a plan (no sync needed)."""
        return BatchLayout(self.lengths, self.targets)


def build_jagged_metadata(
    history_lengths: Sequence[int],
    num_targets: Sequence[int],
    device: torch.device | str,
) -> JaggedMetadata:
    """Metadata of a batch of whole sequences, ``H_b`` history + ``T_b`` target tokens each."""
    device = check_device("device", device)
    hist, tgt = _int_list("history_lengths", history_lengths), _int_list("num_targets", num_targets)
    if len(hist) != len(tgt) or not hist:
        raise ValueError(
            f"history_lengths, num_targets: expected one entry per sequence (>= 1), got "
            f"{len(hist)} and {len(tgt)}"
        )
    lengths = [h + t for h, t in zip(hist, tgt, strict=True)]
    batch = len(lengths)
    host = _host_buffer(2 * batch + 1, device)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    host.numpy()[:] = cu + tgt
    dev = _to_device(host, device, None)
    return JaggedMetadata(
        cu_seqlens=dev[: batch + 1],
        num_targets=dev[batch + 1 :],
        lengths=tuple(lengths),
        targets=tuple(tgt),
        max_seqlen=max(max(lengths), 1),
        num_tokens=cu[-1],
    )


def _int_list(name: str, values: Sequence[int]) -> list[int]:
    out = []
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name}[{i}]: expected a non-negative int, got {v!r}")
        out.append(v)
    return out


@dataclass(frozen=True)
class BatchMetadata:
    """Everything the cached path needs about one batch, on the device.

    Tensor fields are int32 views into ``buffer`` (one device allocation, filled by one
    non-blocking copy):

    - ``page_table``: every sequence's pages; its history length is ``cached + new``;
    - ``cu_seqlens_q [B+1]``: offsets of the packed query rows (``new_b + targets_b`` each);
    - ``num_targets [B]``;
    - ``append_start [B]``: history position of each sequence's first new token (its cached
      length): the append positions of :func:`hstu_kernels.append_kv`.

    Host fields (tuples of ints, no sync needed) describe the real batch (``page_lists``: each
    real sequence's pages); ``batch_size`` and
    ``num_tokens`` count padding too when the metadata was padded for a CUDA-graph bucket
    (``num_real``/``num_real_tokens`` are the real ones; the real rows come first).
    """

    page_table: PageTable
    cu_seqlens_q: torch.Tensor
    num_targets: torch.Tensor
    append_start: torch.Tensor
    buffer: torch.Tensor
    user_ids: tuple
    cached_lengths: tuple[int, ...]
    new_lengths: tuple[int, ...]
    target_lengths: tuple[int, ...]
    max_seqlen_q: int
    num_tokens: int
    batch_size: int
    page_size: int
    page_lists: tuple[tuple[int, ...], ...] = ()
    # the host values of the tensors (padding included), for a plan: no sync needed
    layout: BatchLayout | None = None

    @property
    def num_real(self) -> int:
        """Sequences of the real batch (without padding slots)."""
        return len(self.new_lengths)

    @property
    def num_real_tokens(self) -> int:
        """Query rows of the real batch (without padding rows)."""
        return sum(self.new_lengths) + sum(self.target_lengths)

    @property
    def history_lengths(self) -> tuple[int, ...]:
        """``H_b = cached + new`` of every real sequence."""
        return tuple(c + n for c, n in zip(self.cached_lengths, self.new_lengths, strict=True))

    @property
    def max_total_length(self) -> int:
        """``max_b (H_b + T_b)`` over the real batch (the default ``scaling_seqlen``)."""
        return max(h + t for h, t in zip(self.history_lengths, self.target_lengths, strict=True))


def paged_layout_size(batch: int, page_capacity: int) -> int:
    """Entries of the int32 buffer of :class:`BatchMetadata` for ``batch`` sequences."""
    return 5 * batch + 2 + page_capacity


def check_padding(
    batch: int,
    real_tokens: int,
    num_pages: int,
    *,
    device: torch.device,
    pad_batch: int | None = None,
    pad_tokens: int | None = None,
    page_capacity: int | None = None,
    dummy_page: int | None = None,
    out: torch.Tensor | None = None,
    pad_slot: bool = True,
) -> None:
    """Raise ValueError unless :func:`build_paged_metadata` can pad a batch of ``batch``
    sequences, ``real_tokens`` rows and ``num_pages`` page ids as asked (a caller that changes
    state to build the batch, the KV cache manager, asks first)."""
    for name, v in (("pad_batch", pad_batch), ("pad_tokens", pad_tokens),
                    ("page_capacity", page_capacity)):  # fmt: skip
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise ValueError(f"{name}: expected an int >= 0 or None, got {v!r}")
    extra = 0
    if pad_batch is not None or pad_tokens is not None:
        if pad_batch is None or pad_tokens is None or dummy_page is None:
            raise ValueError("pad_batch, pad_tokens and dummy_page must be given together")
        if pad_batch < batch or pad_tokens < real_tokens:
            raise ValueError(
                f"pad_batch, pad_tokens: expected >= the batch ({batch} sequences, "
                f"{real_tokens} rows), got {pad_batch}, {pad_tokens}"
            )
        extra = pad_batch + int(pad_slot) - batch
        if extra == 0 and pad_tokens > real_tokens:
            raise ValueError(
                f"pad_slot: the {pad_tokens - real_tokens} padding rows need a free slot, but "
                f"the batch fills all {pad_batch}"
            )
    ids = num_pages + extra
    capacity = ids if page_capacity is None else page_capacity
    if capacity < ids:
        raise ValueError(f"page_capacity: the batch needs {ids} page ids, got {capacity}")
    if capacity > ids and dummy_page is None:
        raise ValueError("dummy_page: needed to fill page_ids up to page_capacity")
    if out is not None:
        size = paged_layout_size(batch + extra, capacity)
        if (
            not isinstance(out, torch.Tensor)
            or out.dtype != torch.int32
            or out.device != device
            or out.dim() != 1
            or not out.is_contiguous()
            or out.numel() < size
        ):
            got = (
                f"{out.dtype} [{out.numel()}] on {out.device}"
                if isinstance(out, torch.Tensor)
                else type(out).__name__
            )
            raise ValueError(
                f"out: expected a contiguous 1-d int32 buffer on {device} with >= {size} "
                f"entries, got {got}"
            )


def build_paged_metadata(
    page_lists: Sequence[Sequence[int]],
    cached_lengths: Sequence[int],
    new_lengths: Sequence[int],
    num_targets: Sequence[int],
    *,
    page_size: int,
    device: torch.device | str,
    user_ids: Sequence = (),
    pad_batch: int | None = None,
    pad_tokens: int | None = None,
    page_capacity: int | None = None,
    dummy_page: int | None = None,
    out: torch.Tensor | None = None,
    pad_slot: bool = True,
) -> BatchMetadata:
    """Build the cached path's metadata from host lists, with one host-to-device copy.

    Sequence ``b`` owns ``page_lists[b]`` (exactly ``ceil((cached_b + new_b) / page_size)``
    pages, at least one), has ``cached_b`` tokens in the cache already, ``new_b`` new history
    tokens and ``num_targets[b]`` targets.

    Padding for a CUDA-graph bucket (all three of ``pad_batch``, ``pad_tokens``,
    ``dummy_page`` given): the batch becomes ``pad_batch + 1`` sequences and ``pad_tokens``
    rows; slots ``B .. pad_batch-1`` are empty sequences, slot ``pad_batch`` holds the padding
    rows. ``pad_slot=False`` adds no slot beyond ``pad_batch``: the padding rows go to slot
    ``pad_batch - 1``, which must then be an empty one (``B < pad_batch``) unless there are no
    padding rows. The padding slot holds its rows as targets, and every padding slot uses
    ``dummy_page`` (a history of one token). ``page_capacity``
    fixes the length of ``page_ids`` (unused entries point at ``dummy_page``), so the buffer
    layout depends only on the bucket. ``out``: a device int32 buffer to copy into (a graph's
    static input); its leading ``paged_layout_size(...)`` entries are used.
    """
    device = check_device("device", device)
    if not is_page_size(page_size):
        raise ValueError(f"page_size: expected a power-of-two int, got {page_size!r}")
    cached = _int_list("cached_lengths", cached_lengths)
    new = _int_list("new_lengths", new_lengths)
    tgt = _int_list("num_targets", num_targets)
    batch = len(cached)
    if not (len(new) == len(tgt) == len(page_lists) == batch) or batch == 0:
        raise ValueError(
            "page_lists, cached_lengths, new_lengths, num_targets: expected one entry per "
            f"sequence (>= 1), got {len(page_lists)}, {batch}, {len(new)}, {len(tgt)}"
        )
    indptr, last = [0], []
    for b in range(batch):
        h = cached[b] + new[b]
        need = -(-h // page_size)
        if h < 1 or len(page_lists[b]) != need:
            raise ValueError(
                f"page_lists[{b}]: a history of {h} tokens (>= 1) in pages of {page_size} "
                f"needs {need} pages, got {len(page_lists[b])}"
            )
        indptr.append(indptr[-1] + need)
        last.append(h - (need - 1) * page_size)
    real_ids = indptr[-1]
    rows = [n + t for n, t in zip(new, tgt, strict=True)]
    real_tokens = sum(rows)
    starts = list(cached)
    targets = list(tgt)

    check_padding(
        batch, real_tokens, real_ids, device=device, pad_batch=pad_batch, pad_tokens=pad_tokens,
        page_capacity=page_capacity, dummy_page=dummy_page, out=out, pad_slot=pad_slot,
    )  # fmt: skip
    if pad_batch is not None:
        extra = pad_batch + int(pad_slot) - batch
        # Empty slots, then the padding sequence: its rows are targets, so append_kv writes
        # nothing, and they see only the dummy page; real rows never see them.
        if extra:
            rows += [0] * (extra - 1) + [pad_tokens - real_tokens]
            targets += [0] * (extra - 1) + [pad_tokens - real_tokens]
        for _ in range(extra):
            indptr.append(indptr[-1] + 1)
            last.append(1)
            starts.append(1)
    full_batch = len(rows)
    num_ids = indptr[-1]
    capacity = num_ids if page_capacity is None else page_capacity

    cu = [0]
    for n in rows:
        cu.append(cu[-1] + n)
    host = _host_buffer(paged_layout_size(full_batch, capacity), device)
    # (filled by slices: converting one long list of page ids cost more than the rest)
    head = indptr + last + cu + targets + starts
    values = host.numpy()
    values[: len(head)] = head
    ids = values[len(head) :]
    at = 0
    for pages in page_lists:
        ids[at : at + len(pages)] = pages
        at += len(pages)
    if at < capacity:
        ids[at:] = dummy_page  # the padding slots' and the unused ids
    lowest = int(ids[:num_ids].min())
    if lowest < 0:
        raise ValueError(f"page_lists: expected page ids >= 0, got {lowest}")
    dev = _to_device(host, device, out)
    b1 = full_batch + 1
    o = [0, b1, b1 + full_batch, 2 * b1 + full_batch, 2 * b1 + 2 * full_batch]
    o.append(2 * b1 + 3 * full_batch)
    table = PageTable._built(dev[o[0] : o[1]], dev[o[5] : o[5] + num_ids], dev[o[1] : o[2]],
                             page_size)  # fmt: skip
    return BatchMetadata(
        page_table=table,
        cu_seqlens_q=dev[o[2] : o[3]],
        num_targets=dev[o[3] : o[4]],
        append_start=dev[o[4] : o[5]],
        buffer=dev,
        user_ids=tuple(user_ids),
        cached_lengths=tuple(cached),
        new_lengths=tuple(new),
        target_lengths=tuple(tgt),
        max_seqlen_q=max(max(rows), 1),
        num_tokens=cu[-1],
        batch_size=full_batch,
        page_size=page_size,
        page_lists=tuple(tuple(p) for p in page_lists),
        layout=BatchLayout(
            query_lengths=tuple(rows),
            num_targets=tuple(targets),
            history_lengths=tuple(
                (indptr[b + 1] - indptr[b] - 1) * page_size + last[b] for b in range(full_batch)
            ),
            page_id_range=(lowest, int(ids[:num_ids].max())),
        ),
    )
