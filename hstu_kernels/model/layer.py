"""One HSTU layer for inference, with an uncached and a cached (paged KV) path.

    h          = LayerNorm(x)
    u, v, q, k = SiLU(h @ W_uvqk)            one fused projection, [4, tokens, heads*D]
    a          = HSTU attention(q, k, v)     hstu_attention, or append_kv + paged attention
    y          = LayerNorm(a) * u
    out        = x + y @ W_o                 output projection and residual (one addmm)

The projection is a single batched matmul whose output is ``[4, tokens, heads*D]``, so ``u``,
``v``, ``q`` and ``k`` are contiguous slices the attention ops take without a copy. As in the
published HSTU inference path, the projections carry no bias (the LayerNorms have affine
weights). Attention goes through the public ops only, so the layer runs on every backend.

Memory traffic outside the matmuls and the attention is what the uncached path pays for
every token of every layer, so on CUDA one small Triton kernel computes
``LayerNorm(a) * SiLU(u)`` in a single pass (``u`` is left raw by the SiLU pass, which then
covers only ``v``, ``q``, ``k``). Elsewhere (CPU, or ``HSTU_FUSED_LAYERNORM=0``) the same
math runs as torch ops.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from hstu_kernels.kvcache.metadata import BatchMetadata, JaggedMetadata
from hstu_kernels.ops import append_kv, hstu_attention, paged_hstu_attention

__all__ = ["HSTULayer", "layernorm_mul_silu"]

FUSED_ENV = "HSTU_FUSED_LAYERNORM"
_KERNEL = None


def _fused_kernel():
    """The Triton kernel of :func:`layernorm_mul_silu` (compiled on first use)."""
    global _KERNEL
    if _KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def kernel(A, U, W, B, Y, n_cols, eps, BLOCK: tl.constexpr):
            row = tl.program_id(0).to(tl.int64)
            cols = tl.arange(0, BLOCK)
            mask = cols < n_cols
            a = tl.load(A + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.sum(a, axis=0) / n_cols
            d = tl.where(mask, a - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / n_cols + eps)
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(U + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            y = (d * rstd * w + b) * (u * tl.sigmoid(u))
            tl.store(Y + row * n_cols + cols, y.to(Y.dtype.element_ty), mask=mask)

        _KERNEL = kernel
    return _KERNEL


def _use_fused(a: torch.Tensor) -> bool:
    if a.device.type != "cuda" or os.environ.get(FUSED_ENV, "1") == "0":
        return False
    return a.shape[-1] <= 16384


def layernorm_mul_silu(
    a: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """``LayerNorm(a) * SiLU(u)`` over the last dim of ``a, u [rows, n]`` (one pass on CUDA)."""
    if not _use_fused(a):
        y = F.layer_norm(a, (a.shape[-1],), weight, bias, eps)
        return y.mul_(F.silu(u))
    import triton

    rows, n = a.shape
    y = torch.empty_like(a)
    if rows:
        block = triton.next_power_of_2(n)
        _fused_kernel()[(rows,)](
            a, u, weight, bias, y, n, eps, BLOCK=block, num_warps=min(16, max(4, block // 256))
        )
    return y


class HSTULayer(nn.Module):
    """An HSTU layer (inference only).

    Args:
        hidden: model width (input and output).
        heads, head_dim: attention heads and their width (``u``/``v``/``q``/``k`` are each
            ``heads * head_dim`` wide).
        alpha: scale inside the attention's SiLU (default ``1/sqrt(head_dim)``).
        eps: of both LayerNorms.
        dtype, device: of the parameters (inputs must match).
        seed: parameters are drawn from a generator seeded with it (reproducible models).
    """

    def __init__(
        self,
        hidden: int,
        heads: int,
        head_dim: int,
        *,
        alpha: float | None = None,
        eps: float = 1e-6,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, v in (("hidden", hidden), ("heads", heads), ("head_dim", head_dim)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        self.hidden, self.heads, self.head_dim = hidden, heads, head_dim
        self.alpha = alpha
        self.eps = eps
        inner = heads * head_dim
        gen = torch.Generator().manual_seed(seed)

        def param(*shape: int, std: float, mean: float = 0.0) -> nn.Parameter:
            t = torch.randn(*shape, generator=gen) * std + mean
            return nn.Parameter(t.to(dtype=dtype, device=device), requires_grad=False)

        self.norm_in_weight = param(hidden, std=0.1, mean=1.0)
        self.norm_in_bias = param(hidden, std=0.1)
        self.uvqk_weight = param(4, hidden, inner, std=1 / math.sqrt(hidden))
        self.norm_attn_weight = param(inner, std=0.1, mean=1.0)
        self.norm_attn_bias = param(inner, std=0.1)
        self.out_weight = param(hidden, inner, std=1 / math.sqrt(inner))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``x [T, hidden]`` -> ``u [T, heads*D]`` (before its SiLU) and ``q, k, v
        [T, heads, D]`` (after theirs)."""
        if x.dim() != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"x: expected [tokens, {self.hidden}], got {tuple(x.shape)}")
        if x.dtype != self.uvqk_weight.dtype:
            raise TypeError(f"x: expected dtype {self.uvqk_weight.dtype}, got {x.dtype}")
        tokens = x.shape[0]
        h = F.layer_norm(x, (self.hidden,), self.norm_in_weight, self.norm_in_bias, self.eps)
        # One batched matmul (the same h for all four) -> [4, T, inner], each slice contiguous.
        uvqk = torch.bmm(h.unsqueeze(0).expand(4, tokens, self.hidden), self.uvqk_weight)
        # u stays raw here: its SiLU is applied inside layernorm_mul_silu, one pass fewer.
        F.silu(uvqk[1:], inplace=True)
        u, v, q, k = uvqk.unbind(0)
        shape = (tokens, self.heads, self.head_dim)
        return u, q.view(shape), k.view(shape), v.view(shape)

    def finish(self, x: torch.Tensor, attn: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``x + (LayerNorm(attn) * SiLU(u)) @ W_o^T`` (``u`` as :meth:`project` returns it)."""
        inner = self.heads * self.head_dim
        y = layernorm_mul_silu(
            attn.view(-1, inner), u, self.norm_attn_weight, self.norm_attn_bias, self.eps
        )
        return torch.addmm(x, y, self.out_weight.t())

    def forward_uncached(
        self,
        x: torch.Tensor,
        meta: JaggedMetadata,
        *,
        scaling_seqlen: int,
        backend: str = "auto",
        validate: bool = False,
    ) -> torch.Tensor:
        """Whole sequences (history + targets), ``x [meta.num_tokens, hidden]``."""
        u, q, k, v = self.project(x)
        attn = hstu_attention(
            q,
            k,
            v,
            meta.cu_seqlens,
            num_targets=meta.num_targets,
            alpha=self.alpha,
            scaling_seqlen=scaling_seqlen,
            max_seqlen=meta.max_seqlen,
            backend=backend,
            validate=validate,
        )
        return self.finish(x, attn, u)

    def forward_cached(
        self,
        x: torch.Tensor,
        meta: BatchMetadata,
        kv_cache: torch.Tensor,
        *,
        scaling_seqlen: int,
        max_seqlen_q: int | None = None,
        backend: str = "auto",
        validate: bool = False,
    ) -> torch.Tensor:
        """New history + target rows, ``x [meta.num_tokens, hidden]``, over this layer's
        cache ``kv_cache [num_pages, 2, page_size, heads, D]``: appends the new history K/V,
        then attends over the whole cached history."""
        u, q, k, v = self.project(x)
        append_kv(
            kv_cache,
            meta.page_table,
            k,
            v,
            meta.cu_seqlens_q,
            num_targets=meta.num_targets,
            backend=backend,
            validate=validate,
        )
        attn = paged_hstu_attention(
            q,
            k,
            v,
            kv_cache,
            meta.page_table,
            meta.cu_seqlens_q,
            num_targets=meta.num_targets,
            alpha=self.alpha,
            scaling_seqlen=scaling_seqlen,
            max_seqlen_q=max_seqlen_q or meta.max_seqlen_q,
            backend=backend,
            validate=validate,
        )
        return self.finish(x, attn, u)
