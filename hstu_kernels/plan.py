"""Plans: everything about a call that depends only on its batch's metadata, done once.

    plan = hk.plan_paged_attention(page_table, cu_seqlens_q, num_targets, heads=4,
                                   head_dim=256, dtype=torch.bfloat16, page_size=32)
    for layer in range(num_layers):
        out = plan.run(q[layer], k[layer], v[layer], pool[layer])

A ``plan_*`` function checks the metadata (its structure always; its values with one
device-to-host sync unless the caller hands over a :class:`~hstu_kernels.types.BatchLayout` of
host values it built the tensors from, as the KV cache manager does), picks the backend, and
has the backend fix its launch: compiled kernel, split-KV choice, grid, scalar arguments.
``run`` then checks only what the host can see for free (shapes, dtypes, devices, contiguity
and the pool size against the plan) and launches: no sync, no dispatch, no environment reads.
A plan is reusable across the layers of a batch and across calls, and its ``run`` can be
captured into a CUDA graph (capture a plan made before the capture: the graph keeps pointers to
the plan's metadata tensors).

Runs of one plan must be ordered on one stream (a split launch may keep per-plan counters
that each launch leaves reset for the next).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from hstu_kernels import validation as val
from hstu_kernels.dispatch import Backend, Explanation, Request, call_size, device_arch, registry
from hstu_kernels.types import (
    AttentionSpec,
    BatchLayout,
    PageTable,
    PlannedBatch,
    check_kv_dtype,
    is_page_size,
)

__all__ = [
    "AppendPlan",
    "JaggedAttentionPlan",
    "PagedAttentionPlan",
    "plan_append_kv",
    "plan_jagged_attention",
    "plan_paged_attention",
]


# --- argument checks shared by the plan functions ------------------------------------------


def resolve_alpha(alpha: float | None, head_dim: int) -> float:
    if alpha is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise TypeError(f"alpha: expected a finite float, got {alpha!r}")
    return float(alpha)


def check_positive_int(name: str, value: object) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name}: expected a positive int or None, got {value!r}")


def _check_shape_args(heads: object, head_dim: object, dtype: object) -> None:
    for name, v in (("heads", heads), ("head_dim", head_dim)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if dtype not in val.ATTENTION_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in val.ATTENTION_DTYPES)
        raise TypeError(f"dtype: expected one of {names}, got {dtype!r}")


def _check_page_size(page_size: object) -> int:
    if not is_page_size(page_size):
        raise ValueError(f"page_size: expected a power-of-two int, got {page_size!r}")
    return page_size


def check_served(
    op: str,
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    page_size: int | None,
    num_contexts: int,
    max_attn_len: int,
    backend: str,
    partials: bool = False,
    fp8_kv: bool = False,
) -> Request:
    """The call's dispatcher request, its size not yet known; raises ``BackendError`` if no
    backend serves it, so that such a call is refused before its metadata is read (a sync).
    ``num_contexts``/``max_attn_len`` must have been checked; ``fp8_kv``: an FP8 pool."""
    features = AttentionSpec(1.0, 1, num_contexts, max_attn_len).features
    if fp8_kv:
        features = features | {"fp8_kv"}
    request = Request(op, device_arch(device), dtype, head_dim, page_size, features,
                      partials=partials)  # fmt: skip
    _select(request, backend)
    return request


def _layout_for(
    op: str,
    cu: torch.Tensor,
    cu_name: str,
    num_targets: torch.Tensor,
    page_table: PageTable | None,
    page_size: int | None,
    *,
    layout: BatchLayout | None,
    validate: bool,
    hints_missing: list[str],
    num_contexts: int = 0,
    writes: bool = False,
) -> BatchLayout | None:
    """The batch's host values: ``layout`` as given (checked on the host), read from the
    device (one sync; checked if ``validate``), or ``None`` where neither is needed."""
    if not isinstance(validate, bool):
        raise TypeError(f"validate: expected a bool, got {type(validate).__name__}")
    batch = cu.shape[0] - 1
    if layout is not None:
        if not isinstance(layout, BatchLayout):
            raise TypeError(f"layout: expected a BatchLayout, got {type(layout).__name__}")
        if layout.batch_size != batch:
            raise ValueError(f"layout: describes {layout.batch_size} sequences, {cu_name} {batch}")
        if page_table is not None and layout.history_lengths is None:
            raise ValueError("layout: a paged call needs history_lengths")
        val.check_layout(layout, cu_name, num_contexts)
        return layout
    capturing = val.is_capturing(cu.device)
    if capturing and hints_missing:
        raise ValueError(
            f"{op}: {' and '.join(hints_missing)} must be given while a CUDA graph is being "
            "captured (computing them needs a device-to-host sync)"
        )
    check = validate and not capturing
    if not (check or hints_missing):
        return None
    found = val.read_layout(cu, cu_name, num_targets, page_table, page_size, check=check,
                            writes=writes)  # fmt: skip
    if check and num_contexts:
        val.check_layout(found, cu_name, num_contexts)
    return found


def _check_hint(name: str, hint: int | None, least: int | None) -> None:
    """A length hint must bound the real lengths: a kernel sizes its grid by it."""
    if hint is not None and least is not None and hint < least:
        raise ValueError(f"{name}: expected >= {least} (the batch's longest), got {hint}")


def _planner(backend: Backend, op: str) -> Callable[[PlannedBatch], Callable]:
    planner = backend.planners.get(op)
    if planner is not None:
        return planner
    impl = backend.ops[op]
    if op == "jagged":
        return lambda b: (
            lambda q, k, v, out: impl(
                q, k, v, b.cu_seqlens, b.num_targets, b.max_seqlen, b.spec, out
            )
        )
    if op in ("paged", "paged_partials"):

        def paged(b: PlannedBatch) -> Callable:
            meta = (b.page_table, b.cu_seqlens, b.num_targets, b.max_seqlen, b.spec)
            # (an FP8 pool's scales come last: ``*scales``)
            if op == "paged":
                return lambda q, k, v, kv, out, *scales: impl(q, k, v, kv, *meta, out, *scales)
            return lambda q, k, v, kv, *scales: impl(q, k, v, kv, *meta, *scales)

        return paged
    return lambda b: (
        lambda kv, k, v, *scales: impl(kv, b.page_table, k, v, b.cu_seqlens, b.num_targets, *scales)
    )


def _select(request: Request, backend: str) -> Backend:
    return registry().select(request, backend)


class _Plan:
    """What the three plans share: the batch, the backend and the fast tensor checks."""

    op = ""

    def __init__(
        self,
        batch: PlannedBatch,
        request: Request,
        backend_arg: str,
        chosen: Backend,
        layout: BatchLayout | None,
    ) -> None:
        self.batch = batch
        self.layout = layout
        self.backend = chosen.name
        self.request = request
        self._backend_arg = backend_arg
        self.dtype = batch.dtype
        self.device = batch.device
        self._dev = batch.device.index if batch.device.type == "cuda" else -1
        if batch.device.type == "cuda" and self._dev is None:
            self._dev = torch.cuda.current_device()
        self._tail = (batch.heads, batch.head_dim)
        self._item = batch.dtype.itemsize
        self._shape = None if batch.rows is None else (batch.rows, *self._tail)

    def explain(self) -> Explanation:
        """The dispatcher's choice for this plan's call, and why."""
        return registry().explain(self.request, self._backend_arg)

    def _rows_ok(self, *ts: Any) -> bool:
        """Whether every one of ``ts`` is packed rows of this plan: one shape (the plan's, if
        it knows its rows), its dtype and device, contiguous. Cheap checks only; the error,
        if any, comes from :meth:`_refuse`."""
        shape = self._shape
        dtype, dev = self.dtype, self._dev
        try:
            if shape is None:
                shape = ts[0].shape
                if len(shape) != 3 or shape[1:] != self._tail:
                    return False
            for t in ts:
                if (t.dtype is not dtype or t.shape != shape or t.get_device() != dev
                        or not t.is_contiguous()):  # fmt: skip
                    return False
        except AttributeError:  # not a tensor
            return False
        return isinstance(ts[0], torch.Tensor)

    def _refuse(self, names: tuple[str, ...], tensors: tuple[Any, ...]) -> None:
        """Raise the named error for packed rows that do not match the plan."""
        val.check_packed(names, *tensors)
        first = tensors[0]
        if first.dtype != self.dtype:
            raise TypeError(
                f"{names[0]}: expected dtype {str(self.dtype).removeprefix('torch.')} (the "
                f"plan's), got {str(first.dtype).removeprefix('torch.')}"
            )
        if first.device != self.device:
            raise ValueError(
                f"{names[0]}: expected a tensor on {self.device} (the plan's), got one on "
                f"{first.device}"
            )
        if tuple(first.shape[1:]) != self._tail:
            raise ValueError(
                f"{names[0]}: expected heads, head_dim = {self._tail} (the plan's), got "
                f"{tuple(first.shape[1:])}"
            )
        if self._shape is not None and first.shape[0] != self._shape[0]:
            raise ValueError(
                f"{names[0]}: expected {self._shape[0]} rows (the last offset of the plan's "
                f"{'cu_seqlens_q' if self.op == 'paged' else 'cu_seqlens'}), got {first.shape[0]}"
            )
        raise ValueError(f"{names[0]}: does not match the plan")  # unreachable in practice

    def _no_overlap(self, names: tuple[str, ...], ts: tuple[Any, ...], out: Any) -> None:
        """Refuse an ``out`` that shares memory with one of ``ts`` (all checked rows of the
        plan: spans of one size, which overlap iff their bases are less than it apart)."""
        base, n = out.data_ptr(), out.numel() * self._item
        for name, t in zip(names, ts, strict=True):
            if n and -n < t.data_ptr() - base < n:
                # a kernel that splits the KV range reads q after other programs of the same
                # rows may have written out
                raise ValueError(f"out: must not share memory with {name}")

    def _new_or_refused_out(self, out: Any, q: torch.Tensor) -> torch.Tensor:
        """``out=None``: a new output like ``q``; else the named error of an ``out`` that does
        not match the plan."""
        if out is None:
            return torch.empty_like(q)
        out = val.check_tensor("out", out, ndim=3, dtypes=(q.dtype,), device=q.device)
        raise ValueError(f"out: expected shape {tuple(q.shape)} (as q), got {tuple(out.shape)}")


class _PagedPool(_Plan):
    """A plan whose run takes a paged pool (attention and append)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        b = self.batch
        self.page_size = b.page_size
        self.kv_dtype = b.kv_dtype or b.dtype
        self._fp8 = b.kv_dtype is not None
        self._kv_tail = (2, b.page_size, b.heads, b.head_dim)
        self._scales_tail = (2, b.page_size, b.heads)
        ids = None if self.layout is None else self.layout.page_id_range
        self._ids = ids
        # the pool must hold the largest id; a negative id is refused at the first run
        self._least_pages = 1 if ids is None else (ids[1] + 1 if ids[0] >= 0 else 1 << 62)

    def _pool_ok(self, kv: Any) -> bool:
        if not isinstance(kv, torch.Tensor) or kv.dtype is not self.kv_dtype:
            return False
        shape = kv.shape
        return (
            len(shape) == 5
            and shape[1:] == self._kv_tail
            and shape[0] >= self._least_pages
            and kv.get_device() == self._dev
            and kv.is_contiguous()
        )

    def _scales_ok(self, scales: Any, kv: torch.Tensor) -> bool:
        if not self._fp8:
            return scales is None
        return (
            isinstance(scales, torch.Tensor)
            and scales.dtype == torch.float32
            and scales.get_device() == self._dev
            and scales.dim() == 4
            and scales.shape[0] == kv.shape[0]
            and scales.shape[1:] == self._scales_tail
            and scales.is_contiguous()
        )

    def _check_pool(self, kv: Any, scales: Any, q: torch.Tensor, q_name: str) -> None:
        if not (self._pool_ok(kv) and self._scales_ok(scales, kv)):
            self._refuse_pool(kv, scales, q, q_name)

    def _refuse_pool(self, kv: Any, scales: Any, q: torch.Tensor, q_name: str) -> None:
        page_size = val.check_kv_cache(kv, q, q_name, scales)
        if kv.dtype != self.kv_dtype:
            raise TypeError(
                f"kv_cache: expected dtype {str(self.kv_dtype).removeprefix('torch.')} (the "
                f"plan's kv_dtype), got {str(kv.dtype).removeprefix('torch.')}"
            )
        if page_size != self.page_size:
            raise ValueError(
                f"kv_cache: expected pages of {self.page_size} tokens (the plan's page size), "
                f"got {page_size}"
            )
        lo, hi = self._ids
        raise ValueError(
            f"page_table.page_ids: expected ids in 0..{kv.shape[0] - 1} (pages in kv_cache), "
            f"got ids in {lo}..{hi}"
        )


class PagedAttentionPlan(_PagedPool):
    """A planned :func:`~hstu_kernels.paged_hstu_attention` for one batch (make it with
    :func:`plan_paged_attention`). Attributes: ``backend`` (the chosen backend's name),
    ``spec`` (the resolved scalars), ``max_seqlen_q``, ``layout`` (the host values, if read or
    given), ``batch`` (what the backend planned with)."""

    op = "paged"

    def __init__(self, batch: PlannedBatch, request: Request, backend_arg: str, chosen: Backend,
                 layout: BatchLayout | None, partials: bool) -> None:  # fmt: skip
        super().__init__(batch, request, backend_arg, chosen, layout)
        self.spec = batch.spec
        self.max_seqlen_q = batch.max_seqlen
        self._launch = _planner(chosen, "paged")(batch)
        self._launch_partials = None
        if partials and "paged_partials" in chosen.ops:
            self._launch_partials = _planner(chosen, "paged_partials")(batch)

    _NAMES = ("q", "k_new", "v_new")

    def run(
        self,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        kv_cache: torch.Tensor,
        out: torch.Tensor | None = None,
        kv_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The attention of this batch's rows over ``kv_cache`` (one layer's pool,
        ``[num_pages, 2, page_size, heads, head_dim]``, with its ``kv_scales`` if the plan's
        ``kv_dtype`` is FP8): ``q, k_new, v_new`` and ``out`` as in
        :func:`~hstu_kernels.paged_hstu_attention`. Returns ``out`` (allocated if ``None``)."""
        rows = (q, k_new, v_new)
        if out is None or not self._rows_ok(q, k_new, v_new, out):  # errors in argument order
            if not self._rows_ok(*rows):
                self._refuse(self._NAMES, rows)
            self._check_pool(kv_cache, kv_scales, q, "q")
            out = self._new_or_refused_out(out, q)
        else:
            self._check_pool(kv_cache, kv_scales, q, "q")
            self._no_overlap(self._NAMES, rows, out)
        if self._fp8:
            self._launch(q, k_new, v_new, kv_cache, out, kv_scales)
        else:
            self._launch(q, k_new, v_new, kv_cache, out)
        return out

    def run_partials(
        self,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        kv_cache: torch.Tensor,
        kv_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`run`, for a caller that sums a split KV range itself (the cached HSTU layer):
        ``[S, rows, heads, D]``, ``S >= 1`` partial outputs whose sum in order ``0 .. S-1``
        (fp32), rounded to ``q``'s dtype, is :meth:`run`'s output. Where the backend split the
        KV range they are fp32; otherwise ``S = 1`` and the one "partial" is the output itself,
        in ``q``'s dtype (see ``ops.paged_hstu_attention_partials``)."""
        if not self._rows_ok(q, k_new, v_new):
            self._refuse(self._NAMES, (q, k_new, v_new))
        self._check_pool(kv_cache, kv_scales, q, "q")
        scales = (kv_scales,) if self._fp8 else ()
        if self._launch_partials is not None:
            got = self._launch_partials(q, k_new, v_new, kv_cache, *scales)
            return got.unsqueeze(0) if got.dim() == 3 else got
        out = torch.empty_like(q)
        self._launch(q, k_new, v_new, kv_cache, out, *scales)
        return out.unsqueeze(0)


class JaggedAttentionPlan(_Plan):
    """A planned :func:`~hstu_kernels.hstu_attention` for one batch (make it with
    :func:`plan_jagged_attention`)."""

    op = "jagged"

    def __init__(self, batch: PlannedBatch, request: Request, backend_arg: str, chosen: Backend,
                 layout: BatchLayout | None) -> None:  # fmt: skip
        super().__init__(batch, request, backend_arg, chosen, layout)
        self.spec = batch.spec
        self.max_seqlen = batch.max_seqlen
        self._launch = _planner(chosen, "jagged")(batch)

    def run(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Jagged attention of this batch's whole sequences: ``q, k, v`` and ``out`` as in
        :func:`~hstu_kernels.hstu_attention`. Returns ``out`` (allocated if ``None``)."""
        rows = (q, k, v)
        if out is None or not self._rows_ok(q, k, v, out):
            if not self._rows_ok(*rows):
                self._refuse(("q", "k", "v"), rows)
            out = self._new_or_refused_out(out, q)
        else:
            self._no_overlap(("q", "k", "v"), rows, out)
        self._launch(q, k, v, out)
        return out


class AppendPlan(_PagedPool):
    """A planned :func:`~hstu_kernels.append_kv` for one batch (make it with
    :func:`plan_append_kv`)."""

    op = "append_kv"

    def __init__(self, batch: PlannedBatch, request: Request, backend_arg: str, chosen: Backend,
                 layout: BatchLayout | None) -> None:  # fmt: skip
        super().__init__(batch, request, backend_arg, chosen, layout)
        self._launch = _planner(chosen, "append_kv")(batch)

    def run(
        self,
        kv_cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_scales: torch.Tensor | None = None,
    ) -> None:
        """Write this batch's new history rows of ``k``/``v`` into ``kv_cache``, in place (an
        FP8 pool: quantised, each row's scale into ``kv_scales``)."""
        if not self._rows_ok(k, v):
            self._refuse(("k", "v"), (k, v))
        self._check_pool(kv_cache, kv_scales, k, "k")
        if self._fp8:
            self._launch(kv_cache, k, v, kv_scales)
        else:
            self._launch(kv_cache, k, v)


# --- the plan functions ---------------------------------------------------------------------


def plan_paged_attention(
    page_table: PageTable,
    cu_seqlens_q: torch.Tensor,
    num_targets: torch.Tensor | None = None,
    *,
    heads: int,
    head_dim: int,
    dtype: torch.dtype,
    page_size: int,
    alpha: float | None = None,
    scaling_seqlen: int | None = None,
    num_contexts: int = 0,
    max_attn_len: int = 0,
    max_seqlen_q: int | None = None,
    backend: str = "auto",
    validate: bool = True,
    layout: BatchLayout | None = None,
    partials: bool = False,
    kv_dtype: torch.dtype | None = None,
) -> PagedAttentionPlan:
    """Plan :func:`~hstu_kernels.paged_hstu_attention` for one batch; ``plan.run(q, k_new,
    v_new, kv_cache, out=None)`` then launches it (for every layer of the batch).

    Args:
        page_table, cu_seqlens_q, num_targets: the batch's metadata, int32 on its device (as
            the op takes them; ``num_targets=None``: no targets).
        heads, head_dim, dtype, page_size: of the ``q``/``k_new``/``v_new`` and pools the plan
            will run on.
        alpha, scaling_seqlen, num_contexts, max_attn_len, backend: as the op takes them.
        max_seqlen_q: ``max_b (N_b + T_b)`` if known (else read from the device).
        validate: check the metadata's values (one device-to-host sync; skipped while a CUDA
            graph is being captured). Page ids are checked against each pool at run.
        layout: the batch's host values, if the caller built the tensors from them (the KV
            cache manager's ``BatchMetadata.layout``): then nothing is read from the device;
            the layout is checked on the host, and the caller vouches that the tensors hold it.
        partials: the caller will use :meth:`PagedAttentionPlan.run_partials` (it sums split
            partials itself), which changes what is fastest.
        kv_dtype: the pools' dtype: ``None`` or ``dtype``, or ``torch.float8_e4m3fn`` for FP8
            pools (each run then takes the pool's ``kv_scales``).

    Raises:
        ValueError/TypeError naming the argument, or ``BackendError`` when no backend can
        serve the call.
    """
    _check_shape_args(heads, head_dim, dtype)
    page_size = _check_page_size(page_size)
    device = val.check_offsets("cu_seqlens_q", cu_seqlens_q, None).device
    cu = cu_seqlens_q
    nbatch = cu.shape[0] - 1
    page_table = val.check_page_table(page_table, nbatch, device, page_size)
    num_targets = val.check_num_targets(num_targets, nbatch, device)
    val.check_mask_params(num_contexts, max_attn_len)
    check_positive_int("scaling_seqlen", scaling_seqlen)
    check_positive_int("max_seqlen_q", max_seqlen_q)
    alpha = resolve_alpha(alpha, head_dim)
    missing = [n for n, x in (("max_seqlen_q", max_seqlen_q), ("scaling_seqlen", scaling_seqlen))
               if x is None]  # fmt: skip
    fp8 = check_kv_dtype(kv_dtype, dtype)
    unsized = check_served("paged", device, dtype, head_dim, page_size, num_contexts,
                           max_attn_len, backend, partials, fp8)  # fmt: skip
    layout = _layout_for(
        "plan_paged_attention", cu, "cu_seqlens_q", num_targets, page_table, page_size,
        layout=layout, validate=validate, hints_missing=missing, num_contexts=num_contexts,
    )  # fmt: skip
    if layout is not None:
        _check_hint("max_seqlen_q", max_seqlen_q, layout.max_query_length)
        max_seqlen_q = max_seqlen_q or max(layout.max_query_length, 1)
        scaling_seqlen = scaling_seqlen or max(layout.max_total_length, 1)
    request = dataclasses.replace(unsized, size=call_size(nbatch, heads, max_seqlen_q))
    chosen = _select(request, backend)
    batch = PlannedBatch(
        "paged", device, dtype, heads, head_dim, nbatch,
        None if layout is None else layout.rows, cu, num_targets, max_seqlen_q,
        AttentionSpec(alpha, scaling_seqlen, num_contexts, max_attn_len), page_table, page_size,
        val.FP8_POOL_DTYPE if fp8 else None,
    )  # fmt: skip
    return PagedAttentionPlan(batch, request, backend, chosen, layout, partials)


def plan_jagged_attention(
    cu_seqlens: torch.Tensor,
    num_targets: torch.Tensor | None = None,
    *,
    heads: int,
    head_dim: int,
    dtype: torch.dtype,
    alpha: float | None = None,
    scaling_seqlen: int | None = None,
    num_contexts: int = 0,
    max_attn_len: int = 0,
    max_seqlen: int | None = None,
    backend: str = "auto",
    validate: bool = True,
    layout: BatchLayout | None = None,
) -> JaggedAttentionPlan:
    """Plan :func:`~hstu_kernels.hstu_attention` for one batch; ``plan.run(q, k, v,
    out=None)`` then launches it. Arguments as :func:`plan_paged_attention` (``layout`` without
    history lengths), ``max_seqlen``: ``max_b L_b`` if known."""
    _check_shape_args(heads, head_dim, dtype)
    device = val.check_offsets("cu_seqlens", cu_seqlens, None).device
    nbatch = cu_seqlens.shape[0] - 1
    num_targets = val.check_num_targets(num_targets, nbatch, device)
    val.check_mask_params(num_contexts, max_attn_len)
    check_positive_int("scaling_seqlen", scaling_seqlen)
    check_positive_int("max_seqlen", max_seqlen)
    alpha = resolve_alpha(alpha, head_dim)
    missing = [n for n, x in (("max_seqlen", max_seqlen), ("scaling_seqlen", scaling_seqlen))
               if x is None]  # fmt: skip
    unsized = check_served("jagged", device, dtype, head_dim, None, num_contexts, max_attn_len,
                           backend)  # fmt: skip
    layout = _layout_for(
        "plan_jagged_attention", cu_seqlens, "cu_seqlens", num_targets, None, None,
        layout=layout, validate=validate, hints_missing=missing, num_contexts=num_contexts,
    )  # fmt: skip
    if layout is not None:
        _check_hint("max_seqlen", max_seqlen, layout.max_query_length)
        longest = max(layout.max_query_length, 1)
        max_seqlen = max_seqlen or longest
        scaling_seqlen = scaling_seqlen or longest
    request = dataclasses.replace(unsized, size=call_size(nbatch, heads, max_seqlen))
    chosen = _select(request, backend)
    batch = PlannedBatch(
        "jagged", device, dtype, heads, head_dim, nbatch,
        None if layout is None else layout.rows, cu_seqlens, num_targets, max_seqlen,
        AttentionSpec(alpha, scaling_seqlen, num_contexts, max_attn_len),
    )  # fmt: skip
    return JaggedAttentionPlan(batch, request, backend, chosen, layout)


def plan_append_kv(
    page_table: PageTable,
    cu_seqlens: torch.Tensor,
    num_targets: torch.Tensor | None = None,
    *,
    heads: int,
    head_dim: int,
    dtype: torch.dtype,
    page_size: int,
    backend: str = "auto",
    validate: bool = True,
    layout: BatchLayout | None = None,
    kv_dtype: torch.dtype | None = None,
) -> AppendPlan:
    """Plan :func:`~hstu_kernels.append_kv` for one batch; ``plan.run(kv_cache, k, v,
    kv_scales=None)`` then writes each layer's new history K/V. Arguments as
    :func:`plan_paged_attention`."""
    _check_shape_args(heads, head_dim, dtype)
    page_size = _check_page_size(page_size)
    device = val.check_offsets("cu_seqlens", cu_seqlens, None).device
    nbatch = cu_seqlens.shape[0] - 1
    page_table = val.check_page_table(page_table, nbatch, device, page_size)
    num_targets = val.check_num_targets(num_targets, nbatch, device)
    fp8 = check_kv_dtype(kv_dtype, dtype)
    request = Request("append_kv", device_arch(device), dtype, head_dim, page_size,
                      frozenset({"fp8_kv"}) if fp8 else frozenset())  # fmt: skip
    chosen = _select(request, backend)
    layout = _layout_for(
        "plan_append_kv", cu_seqlens, "cu_seqlens", num_targets, page_table, page_size,
        layout=layout, validate=validate, hints_missing=[], writes=True,
    )  # fmt: skip
    max_rows = 0 if layout is None else layout.max_query_length
    batch = PlannedBatch(
        "append_kv", device, dtype, heads, head_dim, nbatch,
        None if layout is None else layout.rows, cu_seqlens, num_targets, max_rows, None,
        page_table, page_size, val.FP8_POOL_DTYPE if fp8 else None,
    )  # fmt: skip
    return AppendPlan(batch, request, backend, chosen, layout)
