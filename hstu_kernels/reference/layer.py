"""PyTorch reference of the HSTU layer's ops outside attention: the definition of what the
backends' row kernels and projection GEMM compute.

- ``layernorm(x, weight, bias, eps)``: ``LayerNorm(x)`` over the last dim of ``x [rows, n]``;
- ``layernorm_mul(a, u, weight, bias, eps)``: ``LayerNorm(a) * u``, where ``a`` may be a split
  attention's fp32 partials ``[S, rows, n]``, summed in split order first (:func:`sum_partials`);
- ``project_silu(h, weight)``: ``SiLU(h @ weight)`` for ``weight [K, 4 * inner]`` (columns
  ``u | v | q | k``), as one contiguous ``[4, T, inner]`` tensor;
- ``project_silu_append(h, weight, append, separate)``: the same, with the new K/V rows
  written into the cache, which here is ``separate()`` (the projection, then the append op).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["SLOTS", "check_projection", "layernorm", "layernorm_mul", "project_silu",
           "project_silu_append", "sum_partials"]  # fmt: skip

SLOTS = 4  # u, v, q, k


def sum_partials(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``sum_s partials[s]`` in split order (fp32), rounded to ``dtype``: what the attention
    ops' own split sum stores (``torch.sum`` may add in another order)."""
    total = partials[0].clone()
    for s in range(1, partials.shape[0]):
        total += partials[s]
    return total.to(dtype)


def layernorm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """``LayerNorm(x)`` over the last dim of ``x [rows, n]``."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def layernorm_mul(
    a: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """``LayerNorm(a) * u`` over the last dim; ``a`` may be fp32 split partials
    ``[S, rows, n]`` (their in-order sum in ``u``'s dtype is then normalised)."""
    x = sum_partials(a, u.dtype) if a.dim() == 3 else a
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps).mul_(u)


def check_projection(h: torch.Tensor, weight: torch.Tensor) -> int:
    """Validate ``h [T, K]`` and ``weight [K, 4 * inner]``; returns ``inner``."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[0]:
        raise ValueError(
            f"h, weight: expected [T, K] and [K, 4 * inner], got {tuple(h.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if weight.shape[1] % SLOTS:
        raise ValueError(f"weight: {weight.shape[1]} columns is not 4 * inner")
    if h.dtype != weight.dtype or h.device != weight.device:
        raise TypeError(
            f"h, weight: expected one dtype and device, got {h.dtype}/{h.device} and "
            f"{weight.dtype}/{weight.device}"
        )
    return weight.shape[1] // SLOTS


def project_silu(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``SiLU(h @ weight)`` as a contiguous ``[4, T, inner]`` (slots u, v, q, k)."""
    inner = check_projection(h, weight)
    return F.silu(h @ weight).view(h.shape[0], SLOTS, inner).transpose(0, 1).contiguous()


def project_silu_append(h: torch.Tensor, weight: torch.Tensor, append: object,
                        separate: Callable[[], torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """:func:`project_silu` with ``append``'s K/V rows written: the separate way,
    ``separate()`` (a fused epilogue is a kernel's business)."""
    return separate()
