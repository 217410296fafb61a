"""PyTorch reference HSTU attention: jagged (no cache) and paged (history from a KV cache).

Written for clarity, one sequence at a time, in fp32. This is the definition every kernel is
tested against; it runs on CPU and CUDA and accepts bf16, fp16 and fp32 inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hstu_kernels.reference.fp8 import dequantize
from hstu_kernels.reference.mask import hstu_mask
from hstu_kernels.types import AttentionSpec, PageTable

__all__ = ["gather_history_kv", "jagged_hstu_attention", "paged_hstu_attention"]


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    spec: AttentionSpec,
) -> torch.Tensor:
    """``q [M, h, D]`` over ``k, v [N, h, D]`` with a boolean ``mask [M, N]``, in fp32.

    For 16-bit inputs the SiLU weights are rounded to the input dtype before they meet ``v``,
    as every tensor-core kernel must (the second matmul takes 16-bit operands): so the
    reference "run in the kernel's dtype" (DESIGN.md §5) carries that rounding too, and the
    tolerance rule does not hold kernels to a precision their matmul inputs cannot have.
    """
    q32, k32, v32 = q.float(), k.float(), v.float()
    scores = torch.einsum("mhd,nhd->hmn", q32, k32)
    weights = F.silu(spec.alpha * scores)
    if q.dtype in (torch.float16, torch.bfloat16):
        weights = weights.to(q.dtype).float()
    weights = torch.where(mask[None], weights, torch.zeros((), device=q.device))
    return torch.einsum("hmn,nhd->mhd", weights, v32) / spec.scaling_seqlen


def _targets(num_targets: torch.Tensor | None, batch: int) -> list[int]:
    return [0] * batch if num_targets is None else [int(t) for t in num_targets.tolist()]


def jagged_hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    num_targets: torch.Tensor | None,
    spec: AttentionSpec,
) -> torch.Tensor:
    """HSTU attention over whole sequences: ``q, k, v [sum L_b, heads, D]``.

    Sequence ``b`` is rows ``cu_seqlens[b]:cu_seqlens[b+1]``; its last ``num_targets[b]`` rows
    are targets.
    """
    offsets = cu_seqlens.tolist()
    batch = len(offsets) - 1
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b, t in zip(range(batch), _targets(num_targets, batch), strict=True):
        s, e = offsets[b], offsets[b + 1]
        mask = hstu_mask(e - s - t, e - s, spec.num_contexts, spec.max_attn_len, q.device)
        out[s:e] = _attend(q[s:e], k[s:e], v[s:e], mask, spec)
    return out.to(q.dtype)


def gather_history_kv(
    kv_cache: torch.Tensor,
    page_table: PageTable,
    b: int,
    kv_scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The history K and V (``[H_b, heads, D]`` each) of sequence ``b``, read from its pages;
    with ``kv_scales`` (an FP8 pool, :mod:`reference.fp8`) dequantised, in fp32."""
    page_size = kv_cache.shape[2]
    start, end = page_table.page_indptr[b : b + 2].tolist()
    pages = page_table.page_ids[start:end].long()
    history = (end - start - 1) * page_size + int(page_table.last_page_len[b])
    if kv_scales is not None:
        # (e4m3 pages gathered as bytes, which every device can index)
        kv = kv_cache.view(torch.uint8)[pages].view(kv_cache.dtype)
        kv = dequantize(kv, kv_scales[pages])
    else:
        kv = kv_cache[pages]  # [n_pages, 2, page_size, heads, D]
    k = kv[:, 0].reshape(-1, *kv.shape[-2:])[:history]
    v = kv[:, 1].reshape(-1, *kv.shape[-2:])[:history]
    return k, v


def paged_hstu_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    kv_cache: torch.Tensor,
    page_table: PageTable,
    cu_seqlens_q: torch.Tensor,
    num_targets: torch.Tensor | None,
    spec: AttentionSpec,
    kv_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """HSTU attention of new history + target rows over a paged history cache.

    Sequence ``b``'s query rows are ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``: ``N_b`` new history
    tokens (already appended to the cache) followed by ``num_targets[b]`` targets. History K/V
    (all ``H_b`` tokens) are read from the pages; target K/V from the target rows of
    ``k_new``/``v_new``.

    ``kv_scales``: the cache is an FP8 pool (:mod:`reference.fp8`); its history K/V are
    dequantised in fp32 and, for 16-bit queries, rounded to the queries' dtype, as a kernel
    that dequantises in its load path feeds them to 16-bit matmuls.
    """
    offsets = cu_seqlens_q.tolist()
    batch = len(offsets) - 1
    page_size = kv_cache.shape[2]
    histories = page_table.history_lengths(page_size).tolist()
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b, t in zip(range(batch), _targets(num_targets, batch), strict=True):
        s, e = offsets[b], offsets[b + 1]
        h, n = histories[b], e - s - t
        k_hist, v_hist = gather_history_kv(kv_cache, page_table, b, kv_scales)
        if kv_scales is not None:
            k_hist, v_hist = k_hist.to(q.dtype), v_hist.to(q.dtype)
        k = torch.cat([k_hist, k_new[s + n : e]])
        v = torch.cat([v_hist, v_new[s + n : e]])
        mask = hstu_mask(h, h + t, spec.num_contexts, spec.max_attn_len, q.device)[h - n :]
        out[s:e] = _attend(q[s:e], k, v, mask, spec)
    return out.to(q.dtype)
