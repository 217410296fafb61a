"""Argument checks for the public ops.

Structural checks (types, shapes, dtypes, devices, contiguity) read no tensor values and run on
every call. Value checks (offsets monotone, page ids inside the pool, last_page_len in range)
need the values on the host: they gather every small tensor into one buffer and copy it once,
so they cost a single device-to-host sync.
"""

from __future__ import annotations

import numpy as np
import torch

from hstu_kernels.types import FP8_POOL_DTYPE, BatchLayout, PageTable, check_page_table_values

ATTENTION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
POOL_DTYPES = (*ATTENTION_DTYPES, FP8_POOL_DTYPE)


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


def check_kv_cache(
    kv_cache: object, q: torch.Tensor, q_name: str = "q", kv_scales: object = None
) -> int:
    """``[num_pages, 2, page_size, heads, head_dim]`` matching ``q`` (its dtype, or an FP8 pool
    with ``kv_scales``: :func:`check_kv_scales`); returns the page size."""
    kv = check_tensor("kv_cache", kv_cache, ndim=5, dtypes=POOL_DTYPES, device=q.device)
    if kv.dtype != q.dtype and kv.dtype != FP8_POOL_DTYPE:
        raise TypeError(
            f"kv_cache: expected dtype {_dtype_name(q.dtype)} (as {q_name}) or "
            f"{_dtype_name(FP8_POOL_DTYPE)} (an FP8 pool), got {_dtype_name(kv.dtype)}"
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
    check_kv_scales(kv_scales, kv)
    return page_size


def check_kv_scales(kv_scales: object, kv_cache: torch.Tensor) -> None:
    """An FP8 pool's scales: fp32 ``[num_pages, 2, page_size, heads]`` beside it, contiguous
    (:mod:`hstu_kernels.reference.fp8`); a 16-bit pool has none."""
    if kv_cache.dtype != FP8_POOL_DTYPE:
        if kv_scales is not None:
            raise ValueError(
                f"kv_scales: given for a {_dtype_name(kv_cache.dtype)} pool (only an FP8 pool, "
                f"{_dtype_name(FP8_POOL_DTYPE)}, has scales)"
            )
        return
    if kv_scales is None:
        raise ValueError(
            "kv_scales: an FP8 pool needs its scales, fp32 [num_pages, 2, page_size, heads]"
        )
    s = check_tensor(
        "kv_scales", kv_scales, ndim=4, dtypes=(torch.float32,), device=kv_cache.device
    )
    want = tuple(kv_cache.shape[:4])
    if tuple(s.shape) != want:
        raise ValueError(
            f"kv_scales: expected shape {want} ([num_pages, 2, page_size, heads] of kv_cache), "
            f"got {tuple(s.shape)}"
        )


def check_page_table(
    page_table: object, batch: int, device: torch.device, page_size: int | None = None
) -> PageTable:
    """A :class:`PageTable` of ``batch`` sequences on ``device``; built for ``page_size`` if
    it says what it was built for."""
    if not isinstance(page_table, PageTable):
        raise TypeError(f"page_table: expected a PageTable, got {type(page_table).__name__}")
    if page_size is not None and page_table.page_size not in (None, page_size):
        raise ValueError(
            f"page_table: built for pages of {page_table.page_size} tokens, but the cache's "
            f"pages hold {page_size}"
        )
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


def read_layout(
    cu_seqlens: torch.Tensor,
    cu_name: str,
    num_targets: torch.Tensor | None,
    page_table: PageTable | None = None,
    page_size: int | None = None,
    *,
    check: bool = True,
    rows: int | None = None,
    writes: bool = False,
) -> BatchLayout:
    """Copy a batch's metadata to the host (one concatenation, one copy: a single sync on
    CUDA) and, if ``check``, validate its values; returns its :class:`BatchLayout`.
    ``num_targets=None``: no targets. ``rows``: the packed tensors' row count, which
    ``cu_seqlens[-1]`` must equal (else the plan checks it against the tensors it runs on,
    as it checks the pool size against ``page_id_range``).
    """
    raw = read_metadata(cu_seqlens, num_targets, page_table)
    return layout_of(raw, cu_seqlens.shape[0] - 1, cu_name, num_targets is not None, page_size,
                     check=check, rows=rows, paged=page_table is not None, writes=writes)  # fmt: skip


def read_metadata(
    cu_seqlens: torch.Tensor, num_targets: torch.Tensor | None, page_table: PageTable | None
) -> np.ndarray:
    """The metadata tensors' values on the host, concatenated (int32): one concatenation and
    one copy, a single sync on CUDA."""
    parts = [cu_seqlens] if num_targets is None else [cu_seqlens, num_targets]
    if page_table is not None:
        parts += [page_table.page_indptr, page_table.last_page_len, page_table.page_ids]
    return torch.cat(parts).cpu().numpy()


def layout_of(
    raw: np.ndarray,
    batch: int,
    cu_name: str,
    has_targets: bool,
    page_size: int | None,
    *,
    check: bool = True,
    rows: int | None = None,
    paged: bool = False,
    writes: bool = False,
) -> BatchLayout:
    """:func:`read_layout` of values already read (:func:`read_metadata`); ``writes``: the
    call appends (then no page receiving new tokens may be listed for two sequences)."""
    host = raw.astype(np.int64)
    if not has_targets:
        host = np.concatenate([host[: batch + 1], np.zeros(batch, np.int64), host[batch + 1 :]])
    cu, host = host[: batch + 1], host[batch + 1 :]
    targets, host = host[:batch], host[batch:]
    lengths = np.diff(cu)
    if check:
        if cu[0] != 0:
            raise ValueError(f"{cu_name}: expected {cu_name}[0] == 0, got {cu[0]}")
        if rows is not None and cu[-1] != rows:
            raise ValueError(
                f"{cu_name}: expected {cu_name}[-1] == {rows} (rows of the packed tensors), "
                f"got {cu[-1]}"
            )
        bad = np.flatnonzero(lengths < 0)
        if bad.size:
            raise ValueError(f"{cu_name}: expected non-decreasing offsets, decreasing at {bad[0]}")
        bad = np.flatnonzero((targets < 0) | (targets > lengths))
        if bad.size:
            b = int(bad[0])
            raise ValueError(
                f"num_targets: expected 0 <= num_targets[{b}] <= {lengths[b]} "
                f"(rows of sequence {b}), got {targets[b]}"
            )
    if not paged:
        return BatchLayout(tuple(lengths.tolist()), tuple(targets.tolist()))

    indptr, host = host[: batch + 1], host[batch + 1 :]
    last, ids = host[:batch], host[batch:]
    npages = np.diff(indptr)
    histories = (npages - 1) * page_size + last
    if check:
        check_page_table_values(indptr, ids.shape[0], last, page_size)
    id_range = (int(ids.min()), int(ids.max())) if ids.size else None
    layout = BatchLayout(
        tuple(lengths.tolist()), tuple(targets.tolist()), tuple(histories.tolist()), id_range
    )
    if check:
        check_layout(layout, cu_name)
        if writes:
            _check_written_pages(indptr, ids, histories, lengths - targets, page_size)
    return layout


def _check_written_pages(
    indptr: np.ndarray, ids: np.ndarray, histories: np.ndarray, new: np.ndarray, page_size: int
) -> None:
    """An append writes each sequence's new history into its last pages: none of those may
    be listed by another sequence of the batch (whose K/V it would overwrite). Pages shared
    only for reading (a common prefix) are fine."""
    batch = new.shape[0]
    owner = np.repeat(np.arange(batch), np.diff(indptr))
    position = np.arange(ids.shape[0]) - indptr[owner]  # page index within its sequence
    first = (histories - new) // page_size  # first page receiving a new token
    written = (new[owner] > 0) & (position >= first[owner])
    pairs = np.unique(np.stack([ids, owner]), axis=1)  # (page, owner), once each
    pages, counts = np.unique(pairs[0], return_counts=True)
    shared = set(pages[counts > 1].tolist())
    for j in np.flatnonzero(written):
        page = int(ids[j])
        if page in shared:
            others = sorted(set(owner[ids == page].tolist()) - {int(owner[j])})
            raise ValueError(
                f"page_table.page_ids: page {page} receives new tokens of sequence "
                f"{int(owner[j])} but is also listed for sequence {others[0]} (an append would "
                "overwrite its K/V)"
            )


def check_layout(layout: BatchLayout, cu_name: str, num_contexts: int = 0) -> None:
    """The checks of a batch's host values that need no device tensor: targets within their
    sequences, new history within the history and (``num_contexts``) every history long
    enough for the contextual prefix. (Page ids are checked against the pool by the plan's
    run, which sees it.)"""
    lengths, targets, histories = layout.query_lengths, layout.num_targets, layout.history_lengths
    if len(targets) != len(lengths) or (histories is not None and len(histories) != len(lengths)):
        raise ValueError(
            "layout: expected one entry per sequence in query_lengths, num_targets and "
            "history_lengths"
        )
    for b, (n, t) in enumerate(zip(lengths, targets, strict=True)):
        if n < 0 or not 0 <= t <= n:
            raise ValueError(
                f"num_targets: expected 0 <= num_targets[{b}] <= {n} (rows of sequence {b}), "
                f"got {t}"
            )
    if histories is None:
        if num_contexts:
            _check_contexts(num_contexts, [n - t for n, t in zip(lengths, targets, strict=True)])
        return
    for b, (n, t, h) in enumerate(zip(lengths, targets, histories, strict=True)):
        if h < 1:
            raise ValueError(f"page_table: sequence {b} has a history of {h} tokens (>= 1 needed)")
        if n - t > h:
            raise ValueError(
                f"{cu_name}: sequence {b} has {n - t} new history rows but its page table "
                f"holds a history of only {h} tokens"
            )
    if num_contexts:
        _check_contexts(num_contexts, list(histories))


def _check_contexts(num_contexts: int, histories: list[int]) -> None:
    short = [b for b, h in enumerate(histories) if h < num_contexts]
    if short:
        raise ValueError(
            f"num_contexts: expected every history to hold the {num_contexts} context tokens, "
            f"sequence {short[0]} has {histories[short[0]]}"
        )
