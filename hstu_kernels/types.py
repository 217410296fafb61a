"""Small value types shared by the public ops, the reference and every backend."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "AttentionSpec",
    "BatchLayout",
    "CacheAppend",
    "PageTable",
    "PlannedBatch",
    "STORAGE_DTYPES",
    "check_device",
    "check_page_table_values",
    "check_kv_dtype",
    "check_storage_dtype",
    "is_finite_real",
    "is_int",
    "is_page_size",
]


def is_page_size(value: object) -> bool:
    """Whether ``value`` is a page size: a power-of-two int (not a bool)."""
    return (
        isinstance(value, int) and not isinstance(value, bool) and value >= 1
        and not value & (value - 1)
    )  # fmt: skip


@dataclass(frozen=True)
class PageTable:
    """Where each sequence's history K/V lives in a paged cache (DESIGN.md §2).

    All three tensors are int32 and live on the cache's device:

    - ``page_indptr [B+1]``: sequence ``b`` owns ``page_ids[page_indptr[b]:page_indptr[b+1]]``;
    - ``page_ids [page_indptr[B]]``: page numbers into the cache's first dimension, in order;
    - ``last_page_len [B]``: tokens used in each sequence's last page (1..page_size).

    History length of sequence ``b``: ``(num_pages_b - 1) * page_size + last_page_len[b]``.

    ``page_size``: the page size the table was built for, if known (:meth:`from_lists` and
    the KV cache manager set it); the ops then refuse a cache of another page size, which
    would read the wrong histories. Construction checks the three tensors' types, shapes and
    devices, and their values too when they live on the CPU (free there); device tables' values
    are checked by the ops (``validate=True``), where reading them costs the call's one sync.
    """

    page_indptr: torch.Tensor
    page_ids: torch.Tensor
    last_page_len: torch.Tensor
    page_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("page_indptr", "page_ids", "last_page_len"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"page_table.{name}: expected a torch.Tensor, got {type(t).__name__}"
                )
            if t.dtype != torch.int32:
                dtype = str(t.dtype).removeprefix("torch.")
                raise TypeError(f"page_table.{name}: expected dtype int32, got {dtype}")
            if t.dim() != 1:
                raise ValueError(
                    f"page_table.{name}: expected 1 dimensions, got shape {tuple(t.shape)}"
                )
        if self.page_indptr.shape[0] < 1:
            raise ValueError("page_table.page_indptr: expected [batch + 1] >= 1 entries, got 0")
        if self.last_page_len.shape[0] != self.page_indptr.shape[0] - 1:
            raise ValueError(
                f"page_table.last_page_len: expected shape [{self.page_indptr.shape[0] - 1}] "
                f"(one per sequence of page_indptr), got {tuple(self.last_page_len.shape)}"
            )
        devices = {t.device for t in (self.page_indptr, self.page_ids, self.last_page_len)}
        if len(devices) > 1:
            names = sorted(map(str, devices))
            raise ValueError(f"page_table: expected its three tensors on one device, got {names}")
        if self.page_size is not None and not is_page_size(self.page_size):
            raise ValueError(
                f"page_size: expected a power-of-two int or None, got {self.page_size!r}"
            )
        if self.device.type == "cpu":
            self._check_values()

    @classmethod
    def _built(
        cls,
        page_indptr: torch.Tensor,
        page_ids: torch.Tensor,
        last_page_len: torch.Tensor,
        page_size: int,
    ) -> PageTable:
        """A table of views into a metadata buffer whose host values were checked as it was
        filled (:func:`hstu_kernels.kvcache.build_paged_metadata`): the construction checks
        are skipped (on this project's CPU machine they took 33 of the builder's 47 µs at
        B=1, reading the values as a CPU table does)."""
        table = object.__new__(cls)
        fields = {"page_indptr": page_indptr, "page_ids": page_ids,
                  "last_page_len": last_page_len, "page_size": page_size}  # fmt: skip
        for name, value in fields.items():
            object.__setattr__(table, name, value)
        return table

    def _check_values(self) -> None:
        ids = self.page_ids.numpy()
        check_page_table_values(
            self.page_indptr.numpy(), ids.shape[0], self.last_page_len.numpy(), self.page_size
        )
        if ids.size and ids.min() < 0:
            raise ValueError(f"page_table.page_ids: expected ids >= 0, got {ids.min()}")

    @property
    def batch_size(self) -> int:
        return self.page_indptr.shape[0] - 1

    @property
    def device(self) -> torch.device:
        return self.page_indptr.device

    def history_lengths(self, page_size: int) -> torch.Tensor:
        """History length ``H_b`` of every sequence, int32 ``[B]``, computed on the device."""
        num_pages = self.page_indptr[1:] - self.page_indptr[:-1]
        return ((num_pages - 1) * page_size + self.last_page_len).to(torch.int32)

    def to(self, device: torch.device | str) -> PageTable:
        return PageTable(
            self.page_indptr.to(device),
            self.page_ids.to(device),
            self.last_page_len.to(device),
            self.page_size,
        )

    @classmethod
    def from_lists(
        cls,
        pages: Sequence[Sequence[int]],
        history_lengths: Sequence[int],
        page_size: int,
        device: torch.device | str = "cpu",
    ) -> PageTable:
        """Build a table from each sequence's page list and history length.

        Each sequence must own exactly ``ceil(H_b / page_size)`` pages (at least one); page
        ids are ints >= 0, history lengths ints >= 1, ``page_size`` a power of two.
        """
        if not is_page_size(page_size):
            raise ValueError(f"page_size: expected a power-of-two int, got {page_size!r}")
        device = check_device("device", device)
        if len(pages) != len(history_lengths):
            raise ValueError(
                f"pages: expected one page list per sequence ({len(history_lengths)}), "
                f"got {len(pages)}"
            )
        indptr = [0]
        last = []
        for b, (plist, h) in enumerate(zip(pages, history_lengths, strict=True)):
            if not isinstance(h, int) or isinstance(h, bool) or h < 1:
                raise ValueError(f"history_lengths[{b}]: expected >= 1 (an int), got {h!r}")
            bad = [p for p in plist if not isinstance(p, int) or isinstance(p, bool) or p < 0]
            if bad:
                raise ValueError(f"pages[{b}]: expected page ids as ints >= 0, got {bad[0]!r}")
            need = math.ceil(h / page_size)
            if len(plist) != need:
                raise ValueError(
                    f"pages[{b}]: history of {h} tokens in pages of {page_size} needs "
                    f"{need} pages, got {len(plist)}"
                )
            indptr.append(indptr[-1] + need)
            last.append(h - (need - 1) * page_size)
        flat = [p for plist in pages for p in plist]

        def i32(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int32, device=device)

        return cls(i32(indptr), i32(flat), i32(last), page_size)


def check_device(name: str, value: object) -> torch.device:
    """``value`` as a ``torch.device`` of a type this library runs on (``cpu``, ``cuda``), or
    ``ValueError``/``TypeError`` naming ``name``."""
    if not isinstance(value, (str, torch.device)):
        raise TypeError(f"{name}: expected a torch.device or a device string, got {value!r}")
    try:
        device = torch.device(value)
    except RuntimeError as exc:
        raise ValueError(f"{name}: expected 'cpu' or 'cuda[:N]', got {value!r}") from exc
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: expected a cpu or cuda device, got {value!r}")
    return device


def is_int(v: object) -> bool:
    """An int, not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_finite_real(v: object) -> bool:
    """An int or float (not a bool), finite."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


STORAGE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_storage_dtype(dtype: object) -> torch.dtype:
    """``dtype`` if activations and the KV cache may be held in it (bf16, fp16, fp32), else a
    ``TypeError``."""
    if dtype not in STORAGE_DTYPES:
        raise TypeError(
            f"dtype: expected torch.bfloat16, torch.float16 or torch.float32, got {dtype!r}"
        )
    return dtype


# An FP8 pool (e4m3 pages with fp32 scales per token and head) serves any attention dtype.
FP8_POOL_DTYPE = torch.float8_e4m3fn


def check_kv_dtype(kv_dtype: object, dtype: torch.dtype) -> bool:
    """Whether a pool of ``kv_dtype`` beside activations of ``dtype`` is an FP8 pool:
    ``None`` or ``dtype`` (a 16-bit pool) or ``torch.float8_e4m3fn``; else a ``TypeError``."""
    if kv_dtype is None or kv_dtype == dtype:
        return False
    if kv_dtype == FP8_POOL_DTYPE:
        return True
    raise TypeError(
        f"kv_dtype: expected None, {str(dtype).removeprefix('torch.')} (as dtype) or "
        f"float8_e4m3fn (an FP8 pool), got {kv_dtype!r}"
    )


def check_page_table_values(
    indptr: np.ndarray, num_ids: int, last: np.ndarray, page_size: int | None
) -> None:
    """The values of a page table (host arrays): offsets from 0 to ``num_ids``, at least one
    page per sequence, ``last_page_len`` in ``1..page_size``; a named ``ValueError`` if not."""
    if indptr[0] != 0:
        raise ValueError(f"page_table.page_indptr: expected [0] == 0, got {indptr[0]}")
    owned = np.diff(indptr)
    bad = np.flatnonzero(owned < 1)
    if bad.size:
        raise ValueError(
            "page_table.page_indptr: expected every sequence to own >= 1 page, "
            f"sequence {bad[0]} owns {owned[bad[0]]}"
        )
    if indptr[-1] != num_ids:
        raise ValueError(
            f"page_table.page_indptr: expected [-1] == len(page_ids) = {num_ids}, got {indptr[-1]}"
        )
    out_of_range = last < 1 if page_size is None else (last < 1) | (last > page_size)
    bad = np.flatnonzero(out_of_range)
    if bad.size:
        b = int(bad[0])
        expect = "1..page_size" if page_size is None else f"1..{page_size} (page size)"
        raise ValueError(
            f"page_table.last_page_len: expected {expect}, got {last[b]} for sequence {b}"
        )


@dataclass(frozen=True)
class AttentionSpec:
    """The scalar parameters of one HSTU attention call (DESIGN.md §1), already resolved.

    ``num_contexts`` (C) and ``max_attn_len`` (W) are 0 when unused.
    """

    alpha: float
    scaling_seqlen: int
    num_contexts: int = 0
    max_attn_len: int = 0

    def __post_init__(self) -> None:
        if not is_finite_real(self.alpha):
            raise TypeError(f"alpha: expected a finite float, got {self.alpha!r}")
        if not is_int(self.scaling_seqlen) or self.scaling_seqlen < 1:
            raise ValueError(f"scaling_seqlen: expected an int >= 1, got {self.scaling_seqlen!r}")
        for name in ("num_contexts", "max_attn_len"):
            v = getattr(self, name)
            if not is_int(v) or v < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {v!r}")

    @property
    def features(self) -> frozenset[str]:
        """The optional mask features this call uses, as the dispatcher names them."""
        used = set()
        if self.num_contexts > 0:
            used.add("contexts")
        if self.max_attn_len > 0:
            used.add("window")
        return frozenset(used)


@dataclass(frozen=True)
class BatchLayout:
    """The host values of a batch's metadata: what a plan needs to know about the batch
    without reading its device tensors (which costs a device-to-host sync).

    ``query_lengths[b]``: packed rows of sequence ``b`` (``N_b + T_b``; jagged: ``L_b``);
    ``num_targets[b]``: ``T_b``; ``history_lengths[b]``: ``H_b`` from the page table (paged
    and append calls; ``None`` for jagged); ``page_id_range``: the smallest and largest page
    id of the table (``None``: not known, then the pool size is not checked against it).

    The KV cache manager builds one with every batch (``BatchMetadata.layout``), from the
    lists it built the device tensors from.
    """

    query_lengths: tuple[int, ...]
    num_targets: tuple[int, ...]
    history_lengths: tuple[int, ...] | None = None
    page_id_range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        def ints(name: str, v: object) -> None:
            if not isinstance(v, tuple) or not all(is_int(x) and x >= 0 for x in v):
                raise TypeError(f"{name}: expected a tuple of ints >= 0, got {v!r}")

        ints("query_lengths", self.query_lengths)
        ints("num_targets", self.num_targets)
        if len(self.num_targets) != len(self.query_lengths):
            raise ValueError(
                f"num_targets: expected {len(self.query_lengths)} entries (one per sequence), "
                f"got {len(self.num_targets)}"
            )
        if self.history_lengths is not None:
            ints("history_lengths", self.history_lengths)
            if len(self.history_lengths) != len(self.query_lengths):
                raise ValueError(
                    f"history_lengths: expected {len(self.query_lengths)} entries, got "
                    f"{len(self.history_lengths)}"
                )
        r = self.page_id_range
        if r is not None and not (
            isinstance(r, tuple) and len(r) == 2 and all(is_int(x) for x in r)
        ):
            raise TypeError(f"page_id_range: expected (lowest, highest) ints, got {r!r}")

    @property
    def batch_size(self) -> int:
        return len(self.query_lengths)

    @property
    def rows(self) -> int:
        """Packed rows of the batch."""
        return sum(self.query_lengths)

    @property
    def max_query_length(self) -> int:
        return max(self.query_lengths, default=0)

    @property
    def max_total_length(self) -> int:
        """``max_b (H_b + T_b)`` (paged), or ``max_b L_b`` (jagged): the default
        ``scaling_seqlen``."""
        if self.history_lengths is None:
            return max(self.query_lengths, default=0)
        pairs = zip(self.history_lengths, self.num_targets, strict=True)
        return max((h + t for h, t in pairs), default=0)


@dataclass(frozen=True)
class PlannedBatch:
    """What a backend's planner gets (``Backend.planners``): one batch's metadata on the
    device, validated, and the sizes the plan derived from it on the host.

    ``op`` is ``"jagged"``, ``"paged"`` or ``"append_kv"``. ``rows`` is the packed row count
    of q/k/v (``None`` when the values were not read: then any count is accepted);
    ``max_seqlen`` bounds the rows of one sequence (query rows for paged calls); ``spec`` is
    ``None`` for ``append_kv``; ``page_table`` and ``page_size`` are ``None`` for jagged calls.
    ``kv_dtype`` is the pool's dtype where it is not ``dtype`` (``torch.float8_e4m3fn``: an FP8
    pool, whose runs get its scales as one more argument), else ``None``.
    """

    op: str
    device: torch.device
    dtype: torch.dtype
    heads: int
    head_dim: int
    batch: int
    rows: int | None
    cu_seqlens: torch.Tensor
    num_targets: torch.Tensor
    max_seqlen: int
    spec: AttentionSpec | None = None
    page_table: PageTable | None = None
    page_size: int | None = None
    kv_dtype: torch.dtype | None = None


@dataclass(frozen=True)
class CacheAppend:
    """Where a layer's projection writes the new history ``k``/``v`` rows (the
    ``project_silu_append`` op, which may do it from its GEMM's epilogue): the layer's
    cache ``kv_cache [num_pages, 2, page_size, heads, D]`` through ``page_table``, for the
    packed rows ``cu_seqlens [B+1]`` of which the last ``num_targets[b]`` of each sequence
    are targets (not written). The same contract as :func:`hstu_kernels.append_kv`."""

    kv_cache: torch.Tensor
    page_table: PageTable
    cu_seqlens: torch.Tensor
    num_targets: torch.Tensor

    @property
    def batch(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    def check(self, inner: int, h: torch.Tensor) -> None:
        """Raise ValueError/TypeError if the kernel cannot write this cache for ``h``."""
        kv = self.kv_cache
        if kv.dim() != 5 or kv.shape[1] != 2 or kv.shape[3] * kv.shape[4] != inner:
            raise ValueError(
                f"kv_cache: expected [pages, 2, page_size, heads, D] with heads*D = {inner}, "
                f"got {tuple(kv.shape)}"
            )
        if kv.stride(4) != 1 or kv.stride(3) != kv.shape[4]:
            raise ValueError(
                f"kv_cache: each slot's [heads, D] must be contiguous, got strides {kv.stride()}"
            )
        if kv.dtype != h.dtype or kv.device != h.device:
            raise TypeError(
                f"kv_cache: expected {h.dtype} on {h.device}, got {kv.dtype} on {kv.device}"
            )
        if self.batch < 1 or self.num_targets.shape != (self.batch,):
            raise ValueError("cu_seqlens, num_targets: expected [B+1] and [B], B >= 1")
        if self.page_table.page_ids.numel() == 0:
            raise ValueError("page_table.page_ids: expected at least one page per sequence")
