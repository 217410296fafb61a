"""The public functional ops: ``hstu_attention``, ``paged_hstu_attention`` and ``append_kv``.

Each op is a plan (:mod:`hstu_kernels.plan`) and its run. Plans are kept in a small cache keyed
by the call's configuration and the identity of its metadata tensors, so a batch's second and
later calls (every layer of a model, say) skip the planning:

- with ``validate=True`` (the default) each call still reads the metadata's values (one
  device-to-host sync) and checks them; a plan is reused when they are the values it was made
  for;
- with ``validate=False`` a plan is reused while the same metadata tensors are passed and no
  torch operation has written them in place since (their version counters). A caller that
  rewrites metadata by other means (a kernel of its own) must pass ``validate=True`` or use
  plans directly.

Nothing is silently ignored: an argument the chosen backend cannot honour is an error. Inside
``torch.compile`` the ops call their ``torch.ops.hstu_kernels`` registrations (below), which the
compiler treats as opaque.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hstu_kernels import settings
from hstu_kernels import validation as val
from hstu_kernels.plan import (
    AppendPlan,
    JaggedAttentionPlan,
    PagedAttentionPlan,
    check_served,
    plan_append_kv,
    plan_jagged_attention,
    plan_paged_attention,
)
from hstu_kernels.types import PageTable

__all__ = ["append_kv", "clear_plan_cache", "hstu_attention", "paged_hstu_attention"]

PLAN_CACHE_SIZE = 32


class _PlanCache:
    """The functional ops' plans, least recently used first out."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._plans: OrderedDict[tuple, Any] = OrderedDict()

    def get(self, key: tuple | None) -> Any:
        if key is None:
            return None
        try:
            plan = self._plans.get(key)
        except TypeError:  # an unhashable argument: the planning path names the error
            return None
        if plan is not None:
            self._plans.move_to_end(key)
        return plan

    def put(self, key: tuple | None, plan: Any) -> Any:
        if key is not None:
            try:
                self._plans[key] = plan
            except TypeError:
                return plan
            if len(self._plans) > self.size:
                self._plans.popitem(last=False)
        return plan

    def clear(self) -> None:
        self._plans.clear()


_PLANS = _PlanCache(PLAN_CACHE_SIZE)
settings.on_change(_PLANS.clear)  # a plan's backend may depend on a setting


def clear_plan_cache() -> None:
    """Forget the functional ops' cached plans (they also go when settings change)."""
    _PLANS.clear()


def _tensor_key(t: Any, versioned: bool) -> Any:
    """A metadata tensor's part of a plan's key: its identity (``None`` for ``None``), and
    with ``versioned`` its in-place write count too (an inference tensor counts no writes),
    for a plan made from the tensor's values. The cached plan holds the tensor, so its id
    cannot be reused while the entry lives."""
    if t is None:
        return None
    if not versioned:
        return id(t)
    try:
        return id(t), t._version
    except RuntimeError:  # an inference tensor: no version counter
        return id(t), None


@dataclass(frozen=True)
class _Metadata:
    """A call's metadata tensors, as the validating path reads and parses them."""

    cu: torch.Tensor
    cu_name: str
    num_targets: torch.Tensor | None
    page_table: PageTable | None
    page_size: int | None
    rows: int
    writes: bool = False  # an append: pages receiving new tokens must not be shared

    def read(self) -> np.ndarray:
        return val.read_metadata(self.cu, self.num_targets, self.page_table)

    def parse(self, raw: np.ndarray) -> Any:
        return val.layout_of(
            raw, self.cu.shape[0] - 1, self.cu_name, self.num_targets is not None,
            self.page_size, rows=self.rows, paged=self.page_table is not None, writes=self.writes,
        )  # fmt: skip


def _cached(
    key: tuple | None,
    entry: Any,
    validate: bool,
    make: Callable[..., Any],
    meta: Callable[[], _Metadata],
) -> Any:
    """The plan for ``key``. With ``validate`` (outside a capture) the metadata ``meta()`` is
    read (one sync); the cached plan serves if these are the values it was made for (compared
    as they were read), else they are parsed and checked and a plan is made for them
    (``make(layout=...)``). Without, a cached plan is reused as it is and a missing one made
    by ``make(layout=None)``. ``entry``: the cache's ``(plan, values read)`` for ``key``, or
    ``None``."""
    if validate:
        found = meta()
        if not val.is_capturing(found.cu.device):
            raw = found.read().tobytes()
            if entry is not None and entry[1] == raw:
                return entry[0]
            plan = make(layout=found.parse(np.frombuffer(raw, dtype=np.int32)))
            _PLANS.put(key, (plan, raw))
            return plan
    if entry is None:
        entry = _PLANS.put(key, (make(layout=None), None))
    return entry[0]


def hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    num_targets: torch.Tensor | None = None,
    num_contexts: int = 0,
    max_attn_len: int = 0,
    alpha: float | None = None,
    scaling_seqlen: int | None = None,
    max_seqlen: int | None = None,
    backend: str = "auto",
    validate: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """HSTU attention over whole jagged sequences (no cache).

    Args:
        q, k, v: ``[sum_b L_b, heads, head_dim]``, bf16/fp16/fp32, contiguous, one device.
        cu_seqlens: int32 ``[B+1]`` row offsets of the sequences.
        num_targets: int32 ``[B]``; the last ``num_targets[b]`` rows of sequence ``b`` are
            targets (see all history and themselves). ``None``: no targets.
        num_contexts: length C of a contextual prefix (0: none).
        max_attn_len: local window W over history (0: unlimited).
        alpha: scale inside the SiLU; default ``1/sqrt(head_dim)``.
        scaling_seqlen: the divisor of the SiLU scores; default ``max_b L_b``.
        max_seqlen: ``max_b L_b`` if the caller knows it (saves a sync); must not be smaller.
        backend: ``"auto"`` or a backend name (``$HSTU_KERNELS_BACKEND`` overrides "auto").
        validate: check the values of the offsets (one device-to-host sync). Skipped while a
            CUDA graph is being captured; then ``max_seqlen`` and ``scaling_seqlen`` must be
            given. See the module docstring for what ``validate=False`` trusts.
        out: where to write the result (shape and dtype of ``q``); allocated if ``None``.

    Returns:
        ``[sum_b L_b, heads, head_dim]`` in the dtype of ``q`` (``out`` if given).
    """
    if torch.compiler.is_compiling():
        result = torch.ops.hstu_kernels.hstu_attention(
            q, k, v, cu_seqlens, num_targets, num_contexts, max_attn_len, alpha,
            scaling_seqlen, max_seqlen, backend, validate,
        )  # fmt: skip
        return result if out is None else out.copy_(result)
    # (a plan made from the metadata's values is keyed by their version too)
    versioned = validate or max_seqlen is None or scaling_seqlen is None
    try:
        key = ("jagged", q.shape[1], q.shape[2], q.dtype, _tensor_key(cu_seqlens, versioned),
               _tensor_key(num_targets, versioned), num_contexts, max_attn_len, alpha,
               scaling_seqlen, max_seqlen, backend, validate)  # fmt: skip
    except (AttributeError, IndexError):
        key = None
    entry = _PLANS.get(key)
    if entry is None:
        val.check_packed(("q", "k", "v"), q, k, v)
        val.check_offsets("cu_seqlens", cu_seqlens, q.device)
        _check_targets(num_targets, cu_seqlens, q.device)
        val.check_mask_params(num_contexts, max_attn_len)
        check_served("jagged", q.device, q.dtype, q.shape[2], None, num_contexts, max_attn_len,
                     backend)  # fmt: skip

    def make(layout: Any) -> JaggedAttentionPlan:
        return plan_jagged_attention(
            cu_seqlens, num_targets, heads=q.shape[1], head_dim=q.shape[2], dtype=q.dtype,
            alpha=alpha, scaling_seqlen=scaling_seqlen, num_contexts=num_contexts,
            max_attn_len=max_attn_len, max_seqlen=max_seqlen, backend=backend,
            validate=validate, layout=layout,
        )  # fmt: skip

    def meta() -> _Metadata:
        return _Metadata(cu_seqlens, "cu_seqlens", num_targets, None, None, q.shape[0])

    return _cached(key, entry, validate, make, meta).run(q, k, v, out)


def _check_targets(num_targets: Any, cu: torch.Tensor, device: torch.device) -> None:
    if num_targets is not None:
        val.check_num_targets(num_targets, cu.shape[0] - 1, device)


def paged_hstu_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    kv_cache: torch.Tensor,
    page_table: PageTable,
    cu_seqlens_q: torch.Tensor,
    *,
    num_targets: torch.Tensor | None = None,
    num_contexts: int = 0,
    max_attn_len: int = 0,
    alpha: float | None = None,
    scaling_seqlen: int | None = None,
    max_seqlen_q: int | None = None,
    backend: str = "auto",
    validate: bool = True,
    out: torch.Tensor | None = None,
    kv_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """HSTU attention of new history + target rows over a paged KV cache (DESIGN.md §1, §2).

    Sequence ``b``'s rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` are its ``N_b`` new history
    tokens followed by its ``num_targets[b]`` targets. All ``H_b`` history tokens' K/V (the new
    ones included: call :func:`append_kv` first) are read from ``kv_cache`` through
    ``page_table``; the targets' K/V come from the target rows of ``k_new``/``v_new`` and are
    never cached. The result equals rows ``H_b-N_b .. H_b+T_b-1`` of :func:`hstu_attention`
    over the whole sequence, given the same ``scaling_seqlen``. Two sequences may share pages
    (a common prefix): attention only reads them.

    Args:
        q, k_new, v_new: ``[sum_b (N_b+T_b), heads, head_dim]``, one dtype, contiguous.
        kv_cache: ``[num_pages, 2, page_size, heads, head_dim]`` (index 0 = K, 1 = V), the
            dtype of ``q``, or ``torch.float8_e4m3fn`` (an FP8 pool, with ``kv_scales``).
        page_table: the pages of each sequence's history, int32 tensors on ``q``'s device.
        cu_seqlens_q: int32 ``[B+1]`` row offsets of the packed query rows.
        num_targets: int32 ``[B]`` (``None``: no targets).
        num_contexts, max_attn_len, alpha: as in :func:`hstu_attention`.
        scaling_seqlen: the divisor of the SiLU scores, a model constant; default
            ``max_b (H_b + T_b)``.
        max_seqlen_q: ``max_b (N_b + T_b)`` if the caller knows it (saves a sync); must not be
            smaller.
        backend: ``"auto"`` or a backend name.
        validate: check offsets, page ids (inside the pool), ``last_page_len`` (1..page_size)
            and that ``N_b <= H_b``: one device-to-host sync. Skipped while a CUDA graph is
            being captured (then ``max_seqlen_q`` and ``scaling_seqlen`` must be given) and
            when ``validate=False`` (for callers that built the table, such as the KV cache
            manager; see the module docstring). Shapes, dtypes and devices are checked on
            every call.
        out: where to write the result (shape and dtype of ``q``); allocated if ``None``.
        kv_scales: an FP8 pool's scales, fp32 ``[num_pages, 2, page_size, heads]``: history
            row ``x`` is ``kv_cache[...] * kv_scales[...]`` (:mod:`hstu_kernels.reference.fp8`
            defines the math). ``None`` for a 16-bit pool.

    Returns:
        ``[sum_b (N_b+T_b), heads, head_dim]`` in the dtype of ``q`` (``out`` if given).
    """
    if torch.compiler.is_compiling():
        result = torch.ops.hstu_kernels.paged_hstu_attention(
            q, k_new, v_new, kv_cache, page_table.page_indptr, page_table.page_ids,
            page_table.last_page_len, cu_seqlens_q, num_targets, num_contexts, max_attn_len,
            alpha, scaling_seqlen, max_seqlen_q, backend, validate, kv_scales,
        )  # fmt: skip
        return result if out is None else out.copy_(result)
    plan = _paged_plan(
        q, k_new, v_new, kv_cache, kv_scales, page_table, cu_seqlens_q, num_targets,
        num_contexts, max_attn_len, alpha, scaling_seqlen, max_seqlen_q, backend, validate,
        partials=False,
    )  # fmt: skip
    return plan.run(q, k_new, v_new, kv_cache, out, kv_scales)


def paged_hstu_attention_partials(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    kv_cache: torch.Tensor,
    page_table: PageTable,
    cu_seqlens_q: torch.Tensor,
    *,
    num_targets: torch.Tensor | None = None,
    num_contexts: int = 0,
    max_attn_len: int = 0,
    alpha: float | None = None,
    scaling_seqlen: int | None = None,
    max_seqlen_q: int | None = None,
    backend: str = "auto",
    validate: bool = True,
    kv_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`paged_hstu_attention`, for a caller that can sum a split KV range itself
    (internal: the cached HSTU layer sums it in its LayerNorm kernel, saving a kernel).

    Returns ``[S, rows, heads, D]``, ``S >= 1`` partial outputs: their sum in chunk order
    ``0 .. S-1`` (fp32), rounded to ``q``'s dtype, is bit for bit what
    :func:`paged_hstu_attention` returns. Where the chosen backend split every query tile's
    KV range in ``S`` chunks they are fp32; otherwise ``S = 1`` and the one partial is the
    output, in ``q``'s dtype. Arguments, checks and backend choice are those of
    :func:`paged_hstu_attention`. Inside ``torch.compile`` it returns the output as ``S = 1``
    (through the registered op).
    """
    if torch.compiler.is_compiling():
        return paged_hstu_attention(
            q, k_new, v_new, kv_cache, page_table, cu_seqlens_q, num_targets=num_targets,
            num_contexts=num_contexts, max_attn_len=max_attn_len, alpha=alpha,
            scaling_seqlen=scaling_seqlen, max_seqlen_q=max_seqlen_q, backend=backend,
            validate=validate, kv_scales=kv_scales,
        ).unsqueeze(0)  # fmt: skip
    plan = _paged_plan(
        q, k_new, v_new, kv_cache, kv_scales, page_table, cu_seqlens_q, num_targets,
        num_contexts, max_attn_len, alpha, scaling_seqlen, max_seqlen_q, backend, validate,
        partials=True,
    )  # fmt: skip
    return plan.run_partials(q, k_new, v_new, kv_cache, kv_scales)


def _paged_plan(
    q: Any,
    k_new: Any,
    v_new: Any,
    kv_cache: Any,
    kv_scales: Any,
    page_table: Any,
    cu_seqlens_q: Any,
    num_targets: Any,
    num_contexts: Any,
    max_attn_len: Any,
    alpha: Any,
    scaling_seqlen: Any,
    max_seqlen_q: Any,
    backend: Any,
    validate: Any,
    *,
    partials: bool,
) -> PagedAttentionPlan:
    # (a plan made from the metadata's values is keyed by their version too)
    versioned = validate or max_seqlen_q is None or scaling_seqlen is None
    try:
        pt = page_table
        key = ("paged", q.shape[1], q.shape[2], q.dtype, kv_cache.dtype, kv_cache.shape[2],
               _tensor_key(pt.page_indptr, versioned), _tensor_key(pt.page_ids, versioned),
               _tensor_key(pt.last_page_len, versioned), _tensor_key(cu_seqlens_q, versioned),
               _tensor_key(num_targets, versioned), num_contexts, max_attn_len, alpha,
               scaling_seqlen, max_seqlen_q, backend, validate, partials)  # fmt: skip
    except (AttributeError, IndexError):
        key = None
    entry = _PLANS.get(key)
    if entry is None:
        # the structural errors of every argument, in the order the op lists them
        val.check_packed(("q", "k_new", "v_new"), q, k_new, v_new)
        page_size = val.check_kv_cache(kv_cache, q, "q", kv_scales)
        val.check_offsets("cu_seqlens_q", cu_seqlens_q, q.device)
        _check_targets(num_targets, cu_seqlens_q, q.device)
        val.check_page_table(page_table, cu_seqlens_q.shape[0] - 1, q.device, page_size)
        val.check_mask_params(num_contexts, max_attn_len)
        check_served("paged", q.device, q.dtype, q.shape[2], page_size, num_contexts,
                     max_attn_len, backend, partials,
                     kv_cache.dtype == val.FP8_POOL_DTYPE)  # fmt: skip

    def make(layout: Any) -> PagedAttentionPlan:
        return plan_paged_attention(
            page_table, cu_seqlens_q, num_targets, heads=q.shape[1], head_dim=q.shape[2],
            dtype=q.dtype, page_size=kv_cache.shape[2], alpha=alpha,
            scaling_seqlen=scaling_seqlen, num_contexts=num_contexts, max_attn_len=max_attn_len,
            max_seqlen_q=max_seqlen_q, backend=backend, validate=validate, layout=layout,
            partials=partials, kv_dtype=kv_cache.dtype,
        )  # fmt: skip

    def meta() -> _Metadata:
        return _Metadata(cu_seqlens_q, "cu_seqlens_q", num_targets, page_table,
                         kv_cache.shape[2], q.shape[0])  # fmt: skip

    return _cached(key, entry, validate, make, meta)


def append_kv(
    kv_cache: torch.Tensor,
    page_table: PageTable,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    num_targets: torch.Tensor | None = None,
    backend: str = "auto",
    validate: bool = True,
    kv_scales: torch.Tensor | None = None,
) -> None:
    """Write the new history K/V of a packed batch into their pages, in place.

    ``k, v``: ``[sum_b (N_b+T_b), heads, head_dim]`` packed by ``cu_seqlens``; the first
    ``N_b = len_b - num_targets[b]`` rows of sequence ``b`` are new history and go to history
    positions ``H_b-N_b .. H_b-1``, where ``H_b`` is the history length that ``page_table``
    already describes (pages allocated, ``last_page_len`` updated). Target rows are not cached.
    ``validate`` as in :func:`paged_hstu_attention`. An FP8 pool (``kv_cache`` in
    ``torch.float8_e4m3fn``, with ``kv_scales [num_pages, 2, page_size, heads]`` fp32): each
    row is quantised with its own scale (:func:`hstu_kernels.reference.fp8.quantize`), written
    beside it; rows already cached keep their bytes and scales.
    """
    if torch.compiler.is_compiling():
        torch.ops.hstu_kernels.append_kv(
            kv_cache, page_table.page_indptr, page_table.page_ids, page_table.last_page_len,
            k, v, cu_seqlens, num_targets, backend, validate, kv_scales,
        )  # fmt: skip
        return
    try:
        pt = page_table
        key = ("append_kv", k.shape[1], k.shape[2], k.dtype, kv_cache.dtype, kv_cache.shape[2],
               _tensor_key(pt.page_indptr, validate), _tensor_key(pt.page_ids, validate),
               _tensor_key(pt.last_page_len, validate), _tensor_key(cu_seqlens, validate),
               _tensor_key(num_targets, validate), backend, validate)  # fmt: skip
    except (AttributeError, IndexError):
        key = None
    entry = _PLANS.get(key)
    if entry is None:
        val.check_packed(("k", "v"), k, v)
        page_size = val.check_kv_cache(kv_cache, k, "k", kv_scales)
        val.check_offsets("cu_seqlens", cu_seqlens, k.device)
        _check_targets(num_targets, cu_seqlens, k.device)
        val.check_page_table(page_table, cu_seqlens.shape[0] - 1, k.device, page_size)
        check_served("append_kv", k.device, k.dtype, k.shape[2], page_size, 0, 0, backend,
                     fp8_kv=kv_cache.dtype == val.FP8_POOL_DTYPE)  # fmt: skip

    def make(layout: Any) -> AppendPlan:
        return plan_append_kv(
            page_table, cu_seqlens, num_targets, heads=k.shape[1], head_dim=k.shape[2],
            dtype=k.dtype, page_size=kv_cache.shape[2], backend=backend, validate=validate,
            layout=layout, kv_dtype=kv_cache.dtype,
        )  # fmt: skip

    def meta() -> _Metadata:
        return _Metadata(cu_seqlens, "cu_seqlens", num_targets, page_table, kv_cache.shape[2],
                         k.shape[0], writes=True)  # fmt: skip

    _cached(key, entry, validate, make, meta).run(kv_cache, k, v, kv_scales)


# torch.library registration, so that the ops can sit inside torch.compile'd models: the
# Python ops above call these while compiling (they are opaque to the compiler, so the checks
# and the plan cache run inside them, at run time).


@torch.library.custom_op("hstu_kernels::hstu_attention", mutates_args=())
def _hstu_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    num_targets: torch.Tensor | None,
    num_contexts: int,
    max_attn_len: int,
    alpha: float | None,
    scaling_seqlen: int | None,
    max_seqlen: int | None,
    backend: str,
    validate: bool = False,
) -> torch.Tensor:
    return hstu_attention(
        q, k, v, cu_seqlens, num_targets=num_targets, num_contexts=num_contexts,
        max_attn_len=max_attn_len, alpha=alpha, scaling_seqlen=scaling_seqlen,
        max_seqlen=max_seqlen, backend=backend, validate=validate,
    )  # fmt: skip


@_hstu_attention_op.register_fake
def _(q, k, v, cu_seqlens, num_targets, *args):
    return torch.empty_like(q)


@torch.library.custom_op("hstu_kernels::paged_hstu_attention", mutates_args=())
def _paged_hstu_attention_op(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    kv_cache: torch.Tensor,
    page_indptr: torch.Tensor,
    page_ids: torch.Tensor,
    last_page_len: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    num_targets: torch.Tensor | None,
    num_contexts: int,
    max_attn_len: int,
    alpha: float | None,
    scaling_seqlen: int | None,
    max_seqlen_q: int | None,
    backend: str,
    validate: bool = False,
    kv_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    return paged_hstu_attention(
        q, k_new, v_new, kv_cache, PageTable(page_indptr, page_ids, last_page_len),
        cu_seqlens_q, num_targets=num_targets, num_contexts=num_contexts,
        max_attn_len=max_attn_len, alpha=alpha, scaling_seqlen=scaling_seqlen,
        max_seqlen_q=max_seqlen_q, backend=backend, validate=validate, kv_scales=kv_scales,
    )  # fmt: skip


@_paged_hstu_attention_op.register_fake
def _(q, *args):
    return torch.empty_like(q)


# (No defaults: torch 2.11 bumps the version of each mutated argument by its position in the
# boxed call, which leaves out trailing arguments equal to their defaults: IndexError.)
@torch.library.custom_op("hstu_kernels::append_kv", mutates_args=("kv_cache", "kv_scales"))
def _append_kv_op(
    kv_cache: torch.Tensor,
    page_indptr: torch.Tensor,
    page_ids: torch.Tensor,
    last_page_len: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    num_targets: torch.Tensor | None,
    backend: str,
    validate: bool,
    kv_scales: torch.Tensor | None,
) -> None:
    append_kv(
        kv_cache, PageTable(page_indptr, page_ids, last_page_len), k, v, cu_seqlens,
        num_targets=num_targets, backend=backend, validate=validate, kv_scales=kv_scales,
    )  # fmt: skip


@_append_kv_op.register_fake
def _(*args):
    return None
