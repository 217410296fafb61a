"""The public ops: ``hstu_attention``, ``paged_hstu_attention`` and ``append_kv``.

Each op checks its arguments, asks the dispatcher for a backend and calls it. Nothing is
silently ignored: an argument the chosen backend cannot honour is an error.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from hstu_kernels import validation as val
from hstu_kernels.dispatch import Backend, Request, device_arch, grid_tiles, select
from hstu_kernels.types import AttentionSpec, PageTable

__all__ = ["append_kv", "hstu_attention", "paged_hstu_attention"]


def _features(num_contexts: int, max_attn_len: int) -> frozenset[str]:
    return AttentionSpec(1.0, 1, num_contexts, max_attn_len).features


def _resolve_alpha(alpha: float | None, head_dim: int) -> float:
    if alpha is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise TypeError(f"alpha: expected a finite float, got {alpha!r}")
    return float(alpha)


def _check_positive_int(name: str, value: object) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name}: expected a positive int or None, got {value!r}")


def _needs_host(
    device: torch.device, validate: bool, missing: list[str], op: str
) -> tuple[bool, bool]:
    """(read metadata to the host?, check its values?) for this call."""
    capturing = val.is_capturing(device)
    if capturing and missing:
        raise ValueError(
            f"{op}: {' and '.join(missing)} must be given while a CUDA graph is being captured "
            "(computing them needs a device-to-host sync)"
        )
    check = validate and not capturing
    return check or bool(missing), check


def _select_sized(
    request: Request, backend: str, batch: int, heads: int, max_seqlen: int, chosen: Backend
) -> Backend:
    """``chosen``, or the backend chosen again now that the call's size is known, if it was
    not when ``request`` was made (``max_seqlen`` read from the device): a backend may
    decline a call by its size (``Backend.declines``)."""
    if request.tiles is not None:
        return chosen
    sized = dataclasses.replace(request, tiles=grid_tiles(batch, heads, max_seqlen))
    return select(sized, backend)


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
        max_seqlen: ``max_b L_b`` if the caller knows it (saves a sync).
        backend: ``"auto"`` or a backend name (``$HSTU_KERNELS_BACKEND`` overrides "auto").
        validate: check the values of the offsets (one device-to-host sync). Skipped while a
            CUDA graph is being captured; then ``max_seqlen`` and ``scaling_seqlen`` must be
            given.
        out: where to write the result (shape and dtype of ``q``); allocated if ``None``.

    Returns:
        ``[sum_b L_b, heads, head_dim]`` in the dtype of ``q`` (``out`` if given).
    """
    val.check_packed(("q", "k", "v"), q, k, v)
    cu_seqlens = val.check_offsets("cu_seqlens", cu_seqlens, q.device)
    batch = cu_seqlens.shape[0] - 1
    num_targets = val.check_num_targets(num_targets, batch, q.device)
    val.check_mask_params(num_contexts, max_attn_len)
    _check_positive_int("scaling_seqlen", scaling_seqlen)
    _check_positive_int("max_seqlen", max_seqlen)
    alpha = _resolve_alpha(alpha, q.shape[2])
    request = Request(
        "jagged",
        device_arch(q.device),
        q.dtype,
        q.shape[2],
        None,
        _features(num_contexts, max_attn_len),
        grid_tiles(batch, q.shape[1], max_seqlen),
    )
    chosen = select(request, backend)

    missing = [
        n for n, x in (("max_seqlen", max_seqlen), ("scaling_seqlen", scaling_seqlen)) if x is None
    ]
    read, check = _needs_host(q.device, validate, missing, "hstu_attention")
    if read:
        host = val.read_and_check_values(
            cu_seqlens, "cu_seqlens", q.shape[0], num_targets, check=check
        )
        longest = max(host.lengths)
        if check and num_contexts:
            _check_contexts(num_contexts, [n - t for n, t in zip(host.lengths, host.targets)])
        max_seqlen = max_seqlen or max(longest, 1)
        scaling_seqlen = scaling_seqlen or max(longest, 1)
    chosen = _select_sized(request, backend, batch, q.shape[1], max_seqlen, chosen)
    spec = AttentionSpec(alpha, scaling_seqlen, num_contexts, max_attn_len)
    out = _check_out(out, q)
    chosen.ops["jagged"](q, k, v, cu_seqlens, num_targets, max_seqlen, spec, out)
    return out


def _check_out(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty_like(q)
    out = val.check_tensor("out", out, ndim=3, dtypes=(q.dtype,), device=q.device)
    if out.shape != q.shape:
        raise ValueError(f"out: expected shape {tuple(q.shape)} (as q), got {tuple(out.shape)}")
    return out


def _check_contexts(num_contexts: int, histories: list[int]) -> None:
    short = [b for b, h in enumerate(histories) if h < num_contexts]
    if short:
        raise ValueError(
            f"num_contexts: expected every history to hold the {num_contexts} context tokens, "
            f"sequence {short[0]} has {histories[short[0]]}"
        )


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
) -> torch.Tensor:
    """HSTU attention of new history + target rows over a paged KV cache (DESIGN.md §1, §2).

    Sequence ``b``'s rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` are its ``N_b`` new history
    tokens followed by its ``num_targets[b]`` targets. All ``H_b`` history tokens' K/V (the new
    ones included: call :func:`append_kv` first) are read from ``kv_cache`` through
    ``page_table``; the targets' K/V come from the target rows of ``k_new``/``v_new`` and are
    never cached. The result equals rows ``H_b-N_b .. H_b+T_b-1`` of :func:`hstu_attention`
    over the whole sequence, given the same ``scaling_seqlen``.

    Args:
        q, k_new, v_new: ``[sum_b (N_b+T_b), heads, head_dim]``, one dtype, contiguous.
        kv_cache: ``[num_pages, 2, page_size, heads, head_dim]`` (index 0 = K, 1 = V), the
            dtype of ``q``.
        page_table: the pages of each sequence's history, int32 tensors on ``q``'s device.
        cu_seqlens_q: int32 ``[B+1]`` row offsets of the packed query rows.
        num_targets: int32 ``[B]`` (``None``: no targets).
        num_contexts, max_attn_len, alpha: as in :func:`hstu_attention`.
        scaling_seqlen: the divisor of the SiLU scores, a model constant; default
            ``max_b (H_b + T_b)``.
        max_seqlen_q: ``max_b (N_b + T_b)`` if the caller knows it (saves a sync).
        backend: ``"auto"`` or a backend name.
        validate: check offsets, page ids (inside the pool), ``last_page_len`` (1..page_size)
            and that ``N_b <= H_b``: one device-to-host sync. Skipped while a CUDA graph is
            being captured (then ``max_seqlen_q`` and ``scaling_seqlen`` must be given) and
            when ``validate=False`` (for callers that built the table, such as the KV cache
            manager). Shapes, dtypes and devices are checked on every call.
        out: where to write the result (shape and dtype of ``q``); allocated if ``None``.

    Returns:
        ``[sum_b (N_b+T_b), heads, head_dim]`` in the dtype of ``q`` (``out`` if given).
    """
    return _paged(
        q, k_new, v_new, kv_cache, page_table, cu_seqlens_q, num_targets, num_contexts,
        max_attn_len, alpha, scaling_seqlen, max_seqlen_q, backend, validate, out,
        partials=False,
    )  # fmt: skip


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
) -> torch.Tensor:
    """:func:`paged_hstu_attention`, for a caller that can sum a split KV range itself
    (internal: the cached HSTU layer sums it in its LayerNorm kernel, saving a kernel).

    Returns either the output ``[rows, heads, D]`` in ``q``'s dtype, or, where the chosen
    backend split every query tile's KV range in ``S`` chunks, their fp32 partial outputs
    ``[S, rows, heads, D]``: their sum in chunk order ``0 .. S-1`` (fp32), rounded to
    ``q``'s dtype, is bit for bit what :func:`paged_hstu_attention` returns. Arguments,
    checks and backend choice are those of :func:`paged_hstu_attention`.
    """
    return _paged(
        q, k_new, v_new, kv_cache, page_table, cu_seqlens_q, num_targets, num_contexts,
        max_attn_len, alpha, scaling_seqlen, max_seqlen_q, backend, validate, None,
        partials=True,
    )  # fmt: skip


def _paged(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    kv_cache: torch.Tensor,
    page_table: PageTable,
    cu_seqlens_q: torch.Tensor,
    num_targets: torch.Tensor | None,
    num_contexts: int,
    max_attn_len: int,
    alpha: float | None,
    scaling_seqlen: int | None,
    max_seqlen_q: int | None,
    backend: str,
    validate: bool,
    out: torch.Tensor | None,
    *,
    partials: bool,
) -> torch.Tensor:
    val.check_packed(("q", "k_new", "v_new"), q, k_new, v_new)
    page_size = val.check_kv_cache(kv_cache, q)
    cu_seqlens_q = val.check_offsets("cu_seqlens_q", cu_seqlens_q, q.device)
    batch = cu_seqlens_q.shape[0] - 1
    page_table = val.check_page_table(page_table, batch, q.device)
    num_targets = val.check_num_targets(num_targets, batch, q.device)
    val.check_mask_params(num_contexts, max_attn_len)
    _check_positive_int("scaling_seqlen", scaling_seqlen)
    _check_positive_int("max_seqlen_q", max_seqlen_q)
    alpha = _resolve_alpha(alpha, q.shape[2])
    request = Request(
        "paged",
        device_arch(q.device),
        q.dtype,
        q.shape[2],
        page_size,
        _features(num_contexts, max_attn_len),
        grid_tiles(batch, q.shape[1], max_seqlen_q),
        partials,
    )
    chosen = select(request, backend)

    missing = [
        n
        for n, x in (("max_seqlen_q", max_seqlen_q), ("scaling_seqlen", scaling_seqlen))
        if x is None
    ]
    read, check = _needs_host(q.device, validate, missing, "paged_hstu_attention")
    if read:
        host = val.read_and_check_values(
            cu_seqlens_q,
            "cu_seqlens_q",
            q.shape[0],
            num_targets,
            page_table,
            page_size,
            kv_cache.shape[0],
            check=check,
        )
        if check and num_contexts:
            _check_contexts(num_contexts, host.histories)
        max_seqlen_q = max_seqlen_q or max(max(host.lengths), 1)
        scaling_seqlen = scaling_seqlen or max(h + t for h, t in zip(host.histories, host.targets))
    chosen = _select_sized(request, backend, batch, q.shape[1], max_seqlen_q, chosen)
    spec = AttentionSpec(alpha, scaling_seqlen, num_contexts, max_attn_len)
    args = (q, k_new, v_new, kv_cache, page_table, cu_seqlens_q, num_targets, max_seqlen_q, spec)
    if partials and "paged_partials" in chosen.ops:
        return chosen.ops["paged_partials"](*args)
    out = _check_out(out, q)
    chosen.ops["paged"](*args, out)
    return out


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
) -> None:
    """Write the new history K/V of a packed batch into their pages, in place.

    ``k, v``: ``[sum_b (N_b+T_b), heads, head_dim]`` packed by ``cu_seqlens``; the first
    ``N_b = len_b - num_targets[b]`` rows of sequence ``b`` are new history and go to history
    positions ``H_b-N_b .. H_b-1``, where ``H_b`` is the history length that ``page_table``
    already describes (pages allocated, ``last_page_len`` updated). Target rows are not cached.
    ``validate`` as in :func:`paged_hstu_attention`.
    """
    val.check_packed(("k", "v"), k, v)
    page_size = val.check_kv_cache(kv_cache, k, "k")
    cu_seqlens = val.check_offsets("cu_seqlens", cu_seqlens, k.device)
    batch = cu_seqlens.shape[0] - 1
    page_table = val.check_page_table(page_table, batch, k.device)
    num_targets = val.check_num_targets(num_targets, batch, k.device)
    request = Request("append_kv", device_arch(k.device), k.dtype, k.shape[2], page_size)
    impl = select(request, backend).ops["append_kv"]
    if validate and not val.is_capturing(k.device):
        val.read_and_check_values(
            cu_seqlens,
            "cu_seqlens",
            k.shape[0],
            num_targets,
            page_table,
            page_size,
            kv_cache.shape[0],
        )
    impl(kv_cache, page_table, k, v, cu_seqlens, num_targets)


# torch.library registration, so that the ops can sit inside torch.compile'd models
# (``torch.ops.hstu_kernels.*``). The Python functions above stay the fast eager entry points:
# going through the dispatcher costs several µs per call.


@torch.library.custom_op("hstu_kernels::hstu_attention", mutates_args=())
def _hstu_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    num_targets: torch.Tensor | None,
    num_contexts: int,
    max_attn_len: int,
    alpha: float,
    scaling_seqlen: int,
    max_seqlen: int,
    backend: str,
) -> torch.Tensor:
    return hstu_attention(
        q,
        k,
        v,
        cu_seqlens,
        num_targets=num_targets,
        num_contexts=num_contexts,
        max_attn_len=max_attn_len,
        alpha=alpha,
        scaling_seqlen=scaling_seqlen,
        max_seqlen=max_seqlen,
        backend=backend,
        validate=False,
    )


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
    alpha: float,
    scaling_seqlen: int,
    max_seqlen_q: int,
    backend: str,
) -> torch.Tensor:
    return paged_hstu_attention(
        q,
        k_new,
        v_new,
        kv_cache,
        PageTable(page_indptr, page_ids, last_page_len),
        cu_seqlens_q,
        num_targets=num_targets,
        num_contexts=num_contexts,
        max_attn_len=max_attn_len,
        alpha=alpha,
        scaling_seqlen=scaling_seqlen,
        max_seqlen_q=max_seqlen_q,
        backend=backend,
        validate=False,
    )


@_paged_hstu_attention_op.register_fake
def _(q, *args):
    return torch.empty_like(q)


@torch.library.custom_op("hstu_kernels::append_kv", mutates_args=("kv_cache",))
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
) -> None:
    append_kv(
        kv_cache,
        PageTable(page_indptr, page_ids, last_page_len),
        k,
        v,
        cu_seqlens,
        num_targets=num_targets,
        backend=backend,
        validate=False,
    )


@_append_kv_op.register_fake
def _(*args):
    return None
