"""Argument checks for the public ops.

Structural checks (types, shapes, dtypes, devices, contiguity) read no tensor values and run on
every call. Value checks (offsets monotone, page ids inside the pool, last_page_len in range)
need the values on the host: they gather every small tensor into one buffer and copy it once,
so they cost a single device-to-host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hstu_kernels.types import PageTable

ATTENTION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int,
    dtypes: tuple[torch.dtype, ...],
    device: torch.device | None = None,
    contiguous: bool = True,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        expected = " or ".join(_dtype_name(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype {expected}, got {_dtype_name(t.dtype)}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")
    return t


def check_packed(names: tuple[str, ...], first: object, *others: object) -> None:
    """Packed ``[tokens, heads, head_dim]`` tensors of one dtype, shape and device (the first
    one's)."""
    q = check_tensor(names[0], first, ndim=3, dtypes=ATTENTION_DTYPES)
    for name, t in zip(names[1:], others, strict=True):
        t = check_tensor(name, t, ndim=3, dtypes=ATTENTION_DTYPES, device=q.device)
        if t.dtype != q.dtype:
            raise TypeError(
                f"{name}: expected dtype {_dtype_name(q.dtype)} (as {names[0]}), "
                f"got {_dtype_name(t.dtype)}"
            )
        if t.shape != q.shape:
            raise ValueError(
                f"{name}: expected shape {tuple(q.shape)} (as {names[0]}), got {tuple(t.shape)}"
            )
    if q.shape[1] < 1 or q.shape[2] < 1:
        raise ValueError(f"{names[0]}: expected heads >= 1 and head_dim >= 1, got {tuple(q.shape)}")


def check_offsets(name: str, cu: object, device: torch.device) -> torch.Tensor:
    cu = check_tensor(name, cu, ndim=1, dtypes=(torch.int32,), device=device)
    if cu.shape[0] < 2:
        raise ValueError(f"{name}: expected [batch + 1] >= 2 entries, got {cu.shape[0]}")
    return cu


def check_num_targets(num_targets: object, batch: int, device: torch.device) -> torch.Tensor:
    """An int32 ``[batch]`` tensor; ``None`` means no targets (zeros)."""
    if num_targets is None:
        return torch.zeros(batch, dtype=torch.int32, device=device)
    nt = check_tensor("num_targets", num_targets, ndim=1, dtypes=(torch.int32,), device=device)
    if nt.shape[0] != batch:
        raise ValueError(f"num_targets: expected shape [{batch}] (batch), got {tuple(nt.shape)}")
    return nt


def check_kv_cache(kv_cache: object, q: torch.Tensor, q_name: str = "q") -> int:
    """``[num_pages, 2, page_size, heads, head_dim]`` matching ``q``; returns the page size."""
    kv = check_tensor("kv_cache", kv_cache, ndim=5, dtypes=ATTENTION_DTYPES, device=q.device)
    if kv.dtype != q.dtype:
        raise TypeError(
            f"kv_cache: expected dtype {_dtype_name(q.dtype)} (as {q_name}), "
            f"got {_dtype_name(kv.dtype)}"
        )
    _, two, page_size, heads, head_dim = kv.shape
    if two != 2:
        raise ValueError(
            f"kv_cache: expected [num_pages, 2, page_size, heads, head_dim], got {tuple(kv.shape)}"
        )
    if (heads, head_dim) != tuple(q.shape[1:]):
        raise ValueError(
            f"kv_cache: expected heads, head_dim = {tuple(q.shape[1:])} (as {q_name}), "
            f"got {(heads, head_dim)}"
        )
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"kv_cache: expected a power-of-two page size, got {page_size}")
    if kv.shape[0] < 1:
        raise ValueError("kv_cache: expected at least one page, got 0")
    return page_size


def check_page_table(page_table: object, batch: int, device: torch.device) -> PageTable:
    if not isinstance(page_table, PageTable):
        raise TypeError(f"page_table: expected a PageTable, got {type(page_table).__name__}")
    fields = ("page_indptr", "page_ids", "last_page_len")
    for f in fields:
        check_tensor(
            f"page_table.{f}", getattr(page_table, f), ndim=1, dtypes=(torch.int32,), device=device
        )
    if page_table.page_indptr.shape[0] != batch + 1:
        raise ValueError(
            f"page_table.page_indptr: expected shape [{batch + 1}] (batch + 1), "
            f"got {tuple(page_table.page_indptr.shape)}"
        )
    if page_table.last_page_len.shape[0] != batch:
        raise ValueError(
            f"page_table.last_page_len: expected shape [{batch}] (batch), "
            f"got {tuple(page_table.last_page_len.shape)}"
        )
    return page_table


def check_mask_params(num_contexts: object, max_attn_len: object) -> None:
    for name, val in (("num_contexts", num_contexts), ("max_attn_len", max_attn_len)):
        if not isinstance(val, int) or isinstance(val, bool):
            raise TypeError(f"{name}: expected an int, got {type(val).__name__}")
        if val < 0:
            raise ValueError(f"{name}: expected >= 0, got {val}")


def is_capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@dataclass(frozen=True)
class HostView:
    """The values of a batch's small metadata tensors, copied to the host in one sync."""

    lengths: list[int]  # rows per sequence in the packed tensors
    targets: list[int]
    histories: list[int] | None = None  # paged only: H_b from the page table


def read_and_check_values(
    cu_seqlens: torch.Tensor,
    cu_name: str,
    total: int,
    num_targets: torch.Tensor,
    page_table: PageTable | None = None,
    page_size: int | None = None,
    num_pages: int | None = None,
    *,
    check: bool = True,
) -> HostView:
    """Copy the metadata to the host (one sync) and, if ``check``, validate its values."""
    parts = [cu_seqlens, num_targets]
    if page_table is not None:
        ids = page_table.page_ids
        bounds = torch.stack([ids.min(), ids.max()]) if ids.numel() else ids.new_zeros(0)
        parts += [page_table.page_indptr, page_table.last_page_len, bounds]
    host = torch.cat([p.to(torch.int64) for p in parts]).tolist()
    batch = cu_seqlens.shape[0] - 1
    cu, host = host[: batch + 1], host[batch + 1 :]
    targets, host = host[:batch], host[batch:]
    lengths = [cu[b + 1] - cu[b] for b in range(batch)]
    if check:
        if cu[0] != 0:
            raise ValueError(f"{cu_name}: expected {cu_name}[0] == 0, got {cu[0]}")
        bad = [b for b in range(batch) if lengths[b] < 0]
        if bad:
            raise ValueError(f"{cu_name}: expected non-decreasing offsets, decreasing at {bad[0]}")
        if cu[-1] != total:
            raise ValueError(
                f"{cu_name}: expected {cu_name}[-1] == {total} (rows of the packed tensors), "
                f"got {cu[-1]}"
            )
        for b in range(batch):
            if not 0 <= targets[b] <= lengths[b]:
                raise ValueError(
                    f"num_targets: expected 0 <= num_targets[{b}] <= {lengths[b]} "
                    f"(rows of sequence {b}), got {targets[b]}"
                )
    if page_table is None:
        return HostView(lengths, targets)

    indptr, host = host[: batch + 1], host[batch + 1 :]
    last, bounds = host[:batch], host[batch:]
    npages = [indptr[b + 1] - indptr[b] for b in range(batch)]
    histories = [(npages[b] - 1) * page_size + last[b] for b in range(batch)]
    if check:
        if indptr[0] != 0:
            raise ValueError(f"page_table.page_indptr: expected [0] == 0, got {indptr[0]}")
        for b in range(batch):
            if npages[b] < 1:
                raise ValueError(
                    "page_table.page_indptr: expected every sequence to own >= 1 page, "
                    f"sequence {b} owns {npages[b]}"
                )
        if indptr[-1] != page_table.page_ids.shape[0]:
            raise ValueError(
                f"page_table.page_indptr: expected [-1] == len(page_ids) = "
                f"{page_table.page_ids.shape[0]}, got {indptr[-1]}"
            )
        if bounds and not (bounds[0] >= 0 and bounds[1] < num_pages):
            raise ValueError(
                f"page_table.page_ids: expected ids in 0..{num_pages - 1} (pages in kv_cache), "
                f"got ids in {bounds[0]}..{bounds[1]}"
            )
        for b in range(batch):
            if not 1 <= last[b] <= page_size:
                raise ValueError(
                    f"page_table.last_page_len: expected 1..{page_size} (page size), "
                    f"got {last[b]} for sequence {b}"
                )
            new = lengths[b] - targets[b]
            if new > histories[b]:
                raise ValueError(
                    f"{cu_name}: sequence {b} has {new} new history rows but its page table "
                    f"holds a history of only {histories[b]} tokens"
                )
    return HostView(lengths, targets, histories)
