"""One HSTU layer for inference, with an uncached and a cached (paged KV) path.

    h          = LayerNorm(x)
    u, v, q, k = SiLU(h @ W_uvqk)            one fused projection, [tokens, 4 * heads*D]
    a          = HSTU attention(q, k, v)     hstu_attention, or append_kv + paged attention
    y          = LayerNorm(a) * u
    out        = x + y @ W_o                 output projection and residual (one addmm)

As in the published HSTU inference path, the projections carry no bias (the LayerNorms have
affine weights). Attention goes through the ops' dispatcher, so the layer runs on every
backend: the public ops, and in the cached path their internal variant
``paged_hstu_attention_partials``, which lets a backend that splits the KV range hand back
the unsummed fp32 partials.

Memory traffic outside the matmuls and the attention is what the uncached path pays for every
token of every layer, so on CUDA it is kept to one pass each:

- ``layernorm`` (a Triton row kernel): ``LayerNorm(x)``;
- :func:`~hstu_kernels.model.projection.project_silu`: the projection GEMM with the SiLU of
  all four column groups in its epilogue, written as one ``[4, tokens, heads*D]`` buffer so
  that ``u``, ``q``, ``k``, ``v`` are the contiguous tensors the ops take (it falls back to
  cuBLAS + a SiLU/split pass where that is faster);
- in the cached path, the new history ``k``/``v`` go into the pages from that GEMM's
  epilogue where this times faster than the GEMM plus the ``append_kv`` op
  (:mod:`~hstu_kernels.model.fusion`; only with ``backend="auto"`` and ``validate=False``);
- ``layernorm_mul`` (a Triton row kernel): ``LayerNorm(a) * u``, summing a split
  attention's partials in the same pass (one kernel and one round trip of ``a`` fewer);
- the residual: ``addmm`` accumulates into ``x`` itself (``inplace=True``) when the caller
  no longer needs ``x``, which saves the copy of ``x`` an out-of-place ``addmm`` makes.

Elsewhere (CPU, or ``HSTU_FUSED_LAYERNORM=0`` for the row kernels) the same math runs as
torch ops.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hstu_kernels import settings
from hstu_kernels.backends.triton.launcher import LaunchCache, cannot_compile
from hstu_kernels.kvcache.metadata import BatchMetadata, JaggedMetadata
from hstu_kernels.model.fusion import CacheAppend, project_appending
from hstu_kernels.model.projection import project_silu
from hstu_kernels.ops import append_kv, hstu_attention, paged_hstu_attention_partials
from hstu_kernels.plan import (
    AppendPlan,
    JaggedAttentionPlan,
    PagedAttentionPlan,
    plan_append_kv,
    plan_jagged_attention,
    plan_paged_attention,
)

__all__ = [
    "CachedPlans",
    "HSTULayer",
    "layernorm",
    "layernorm_mul",
    "plan_cached",
    "plan_uncached",
    "sum_partials",
]

_KERNELS: dict | None = None
# Rows per program of the row kernels: one while the grid is small (a few thousand rows), for
# more programs in flight, two beyond (H100, width 1024: 384 rows 3.1 -> 2.7 us with one row
# per program instead of four, 1024 rows 3.5 -> 3.2, 3072 rows best at two; bench/NOTES-block)
SMALL_GRID_ROWS = 2048


def rows_per_program(rows: int) -> int:
    """Rows each program of the row kernels normalises, for a call over ``rows`` rows."""
    return 1 if rows <= SMALL_GRID_ROWS else 2


def _kernels() -> dict:
    """The Triton kernels (defined, and compiled, on first use)."""
    global _KERNELS
    if _KERNELS is None:
        import triton
        import triton.language as tl

        @triton.jit
        def layernorm_kernel(
            X, U, W, B, Y, rows, n_cols, stride_u, eps, splits,
            HAS_U: tl.constexpr, SPLIT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
        ):  # fmt: skip
            r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
            cols = tl.arange(0, BLOCK)
            mask = (r < rows)[:, None] & (cols < n_cols)[None, :]
            offs = r[:, None] * n_cols + cols[None, :]
            if SPLIT:
                # X: fp32 partials [splits, rows, n_cols]; summed in split order and rounded
                # to Y's dtype, as the attention's own sum kernel would have stored them.
                x = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
                part = X + offs  # 64-bit pointers: splits * rows * n_cols may pass 2^31
                for _ in range(splits):
                    x += tl.load(part, mask=mask, other=0.0)
                    part += rows * n_cols
                x = x.to(Y.dtype.element_ty).to(tl.float32)
            else:
                x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.sum(x, axis=1) / n_cols
            d = tl.where(mask, x - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / n_cols + eps)
            w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            b = tl.load(B + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            y = d * rstd[:, None] * w[None, :] + b[None, :]
            if HAS_U:
                u_offs = r[:, None] * stride_u + cols[None, :]
                u = tl.load(U + u_offs, mask=mask, other=0.0).to(tl.float32)
                y = y * u
            tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)

        _KERNELS = {"layernorm": layernorm_kernel}
    return _KERNELS


_BROKEN: list[str] = []  # why the Triton row kernels were switched off in this process


def _use_triton(t: torch.Tensor) -> bool:
    # Inside torch.compile the torch ops run (the compiler generates their kernels).
    if t.device.type != "cuda" or not settings.get().fused_layernorm or _BROKEN:
        return False
    if torch.compiler.is_compiling():
        return False
    return t.shape[-1] <= 8192


def _run_or_fall_back(launch, fallback):
    """Launch a row kernel; if it cannot run here (a Triton that fails to compile it), say so
    once, switch the row kernels off for this process and use the torch ops."""
    try:
        return launch()
    except Exception as exc:
        if torch.cuda.is_current_stream_capturing() or not cannot_compile(exc):
            raise
        import warnings

        _BROKEN.append(f"{type(exc).__name__}: {exc}")
        warnings.warn(
            f"hstu_kernels.model.layer: Triton row kernels disabled ({_BROKEN[0]}); "
            "using torch ops",
            RuntimeWarning,
            stacklevel=3,
        )
        return fallback()


def _launch_args(rows: int, n: int) -> dict:
    import triton

    per = rows_per_program(rows)
    block = triton.next_power_of_2(n)
    return dict(ROWS=per, BLOCK=block, num_warps=min(16, max(4, per * block // 512)))


def _row_layernorm(
    x: torch.Tensor, u: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """``x [rows, n]``, or fp32 split partials ``[S, rows, n]`` (then ``u`` gives the
    output dtype)."""
    x = x.contiguous()  # the kernel indexes rows by the width
    split = x.dim() == 3
    rows, n = x.shape[-2:]
    y = torch.empty((rows, n), dtype=u.dtype if split else x.dtype, device=x.device)
    if rows:
        uu = x if u is None else u
        stride_u = 0 if u is None else u.stride(0)
        splits = x.shape[0] if split else 1
        import triton

        args = _launch_args(rows, n)
        warps = args.pop("num_warps")
        _ROW_LAUNCHES(
            _kernels()["layernorm"], (triton.cdiv(rows, args["ROWS"]),),
            (x, uu, weight, bias, y, rows, n, stride_u, eps, splits),
            dict(HAS_U=u is not None, SPLIT=split, **args), num_warps=warps,
        )  # fmt: skip
    return y


# Launches by shape: skips Triton's per-call argument binding.
_ROW_LAUNCHES = LaunchCache()


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

    def torch_ops() -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    if not _use_triton(x):
        return torch_ops()
    return _run_or_fall_back(lambda: _row_layernorm(x, None, weight, bias, eps), torch_ops)


def layernorm_mul(
    a: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """``LayerNorm(a) * u`` over the last dim of ``a [rows, n]`` and ``u [rows, n]`` (unit
    column stride, any row stride; already through its SiLU); one pass on CUDA.

    ``a`` may also be a split attention's fp32 partials ``[S, rows, n]``: ``a`` is then their
    :func:`sum_partials` in ``u``'s dtype, summed in the same pass.
    """
    if a.dim() == 3 and a.dtype != torch.float32:
        raise TypeError(f"a: split partials [S, rows, n] must be fp32, got {a.dtype}")

    def torch_ops() -> torch.Tensor:
        x = sum_partials(a, u.dtype) if a.dim() == 3 else a
        y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
        return y.mul_(u)

    if not _use_triton(a):
        return torch_ops()
    if u.stride(1) != 1:
        raise ValueError(f"u: expected unit column stride, got strides {u.stride()}")
    return _run_or_fall_back(lambda: _row_layernorm(a, u, weight, bias, eps), torch_ops)


@dataclass(frozen=True)
class CachedPlans:
    """The plans of one cached batch, shared by every layer of a block: the paged attention
    (its split partials left to the layer's LayerNorm) and the K/V append."""

    attention: PagedAttentionPlan
    append: AppendPlan


def plan_cached(
    meta: BatchMetadata,
    *,
    heads: int,
    head_dim: int,
    dtype: torch.dtype,
    scaling_seqlen: int,
    alpha: float | None = None,
    max_seqlen_q: int | None = None,
    backend: str = "auto",
    validate: bool = False,
) -> CachedPlans:
    """Plan one cached batch for every layer. Without ``validate`` the plans take the host
    values the metadata was built from (``meta.layout``): no device-to-host sync."""
    layout = None if validate else meta.layout
    common = dict(heads=heads, head_dim=head_dim, dtype=dtype, page_size=meta.page_size,
                  backend=backend, validate=validate, layout=layout)  # fmt: skip
    attention = plan_paged_attention(
        meta.page_table, meta.cu_seqlens_q, meta.num_targets, alpha=alpha,
        scaling_seqlen=scaling_seqlen, max_seqlen_q=max_seqlen_q or meta.max_seqlen_q,
        partials=True, **common,
    )  # fmt: skip
    append = plan_append_kv(meta.page_table, meta.cu_seqlens_q, meta.num_targets, **common)
    return CachedPlans(attention, append)


def plan_uncached(
    meta: JaggedMetadata,
    *,
    heads: int,
    head_dim: int,
    dtype: torch.dtype,
    scaling_seqlen: int,
    alpha: float | None = None,
    backend: str = "auto",
    validate: bool = False,
) -> JaggedAttentionPlan:
    """Plan one uncached batch's jagged attention for every layer (no sync unless
    ``validate``)."""
    return plan_jagged_attention(
        meta.cu_seqlens, meta.num_targets, heads=heads, head_dim=head_dim, dtype=dtype,
        alpha=alpha, scaling_seqlen=scaling_seqlen, max_seqlen=meta.max_seqlen,
        backend=backend, validate=validate, layout=None if validate else meta.layout,
    )  # fmt: skip


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
        self.uvqk_weight = param(hidden, 4 * inner, std=1 / math.sqrt(hidden))  # u | v | q | k
        self.norm_attn_weight = param(inner, std=0.1, mean=1.0)
        self.norm_attn_bias = param(inner, std=0.1)
        self.out_weight = param(hidden, inner, std=1 / math.sqrt(inner))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``x [T, hidden]`` -> ``u [T, heads*D]`` and ``q, k, v [T, heads, D]``, all after
        their SiLU and contiguous (slots of one ``[4, T, heads*D]`` buffer)."""
        return self._project(x, None, None)

    def _project(
        self,
        x: torch.Tensor,
        append: Callable[[torch.Tensor, torch.Tensor], None] | None,
        cache: CacheAppend | None,
    ) -> tuple[torch.Tensor, ...]:
        """:meth:`project`, then ``append(k, v)`` (the cached path's append op) if given;
        ``cache``: where the projection's epilogue may write the new k/v itself instead
        (:mod:`~hstu_kernels.model.fusion`; ``append`` then runs only if the separate path
        is taken)."""
        if x.dim() != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"x: expected [tokens, {self.hidden}], got {tuple(x.shape)}")
        if x.dtype != self.uvqk_weight.dtype:
            raise TypeError(f"x: expected dtype {self.uvqk_weight.dtype}, got {x.dtype}")
        tokens = x.shape[0]
        shape = (tokens, self.heads, self.head_dim)
        h = layernorm(x, self.norm_in_weight, self.norm_in_bias, self.eps)

        def separate() -> torch.Tensor:
            uvqk = project_silu(h, self.uvqk_weight)  # one GEMM, SiLU fused
            if append is not None:
                append(uvqk[3].view(shape), uvqk[1].view(shape))
            return uvqk

        if cache is None:
            uvqk = separate()
        else:
            uvqk = project_appending(h, self.uvqk_weight, cache, separate)
        u, v, q, k = uvqk.unbind(0)
        return u, q.view(shape), k.view(shape), v.view(shape)

    def finish(
        self, x: torch.Tensor, attn: torch.Tensor, u: torch.Tensor, *, inplace: bool = False
    ) -> torch.Tensor:
        """``x + (LayerNorm(attn) * u) @ W_o^T`` (``u`` as :meth:`project` returns it).

        ``attn``: ``[tokens, heads, D]``, or a split attention's fp32 partials
        ``[S, tokens, heads, D]`` (summed here, see :func:`layernorm_mul`).
        ``inplace=True`` accumulates into ``x`` and returns it: no copy of ``x``, but the
        caller's ``x`` is overwritten (use it only for a tensor nobody reads afterwards).
        """
        inner = self.heads * self.head_dim
        a = attn.view(-1, x.shape[0], inner) if attn.dim() == 4 else attn.view(-1, inner)
        y = layernorm_mul(a, u, self.norm_attn_weight, self.norm_attn_bias, self.eps)
        if inplace:
            return torch.addmm(x, y, self.out_weight.t(), out=x)
        return torch.addmm(x, y, self.out_weight.t())

    def forward_uncached(
        self,
        x: torch.Tensor,
        meta: JaggedMetadata,
        *,
        scaling_seqlen: int,
        backend: str = "auto",
        validate: bool = False,
        inplace: bool = False,
        plan: JaggedAttentionPlan | None = None,
    ) -> torch.Tensor:
        """Whole sequences (history + targets), ``x [meta.num_tokens, hidden]``;
        ``inplace``: the residual overwrites ``x`` (see :meth:`finish`). ``plan``: the
        batch's attention plan (:func:`plan_uncached`; made here if not given, except inside
        ``torch.compile``, which calls the functional op)."""
        u, q, k, v = self.project(x)
        if plan is None and not torch.compiler.is_compiling():
            plan = plan_uncached(
                meta, heads=self.heads, head_dim=self.head_dim, dtype=x.dtype,
                scaling_seqlen=scaling_seqlen, alpha=self.alpha, backend=backend,
                validate=validate,
            )  # fmt: skip
        if plan is not None:
            self._check_plan_alpha(plan.spec.alpha)
            return self.finish(x, plan.run(q, k, v), u, inplace=inplace)
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
        return self.finish(x, attn, u, inplace=inplace)

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
        inplace: bool = False,
        plans: CachedPlans | None = None,
    ) -> torch.Tensor:
        """New history + target rows, ``x [meta.num_tokens, hidden]``, over this layer's
        cache ``kv_cache [num_pages, 2, page_size, heads, D]``: appends the new history K/V,
        then attends over the whole cached history; ``inplace``: the residual overwrites
        ``x`` (see :meth:`finish`). ``plans``: the batch's plans (:func:`plan_cached`; made
        here if not given, except inside ``torch.compile``, which calls the functional ops).
        """
        if plans is None and not torch.compiler.is_compiling():
            plans = plan_cached(
                meta, heads=self.heads, head_dim=self.head_dim, dtype=x.dtype,
                scaling_seqlen=scaling_seqlen, alpha=self.alpha, max_seqlen_q=max_seqlen_q,
                backend=backend, validate=validate,
            )  # fmt: skip
        if plans is not None:
            self._check_plan_alpha(plans.attention.spec.alpha)

            def append(k: torch.Tensor, v: torch.Tensor) -> None:
                plans.append.run(kv_cache, k, v)

            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return plans.attention.run_partials(q, k, v, kv_cache)

        else:  # inside torch.compile: the functional ops (their registered ops)

            def append(k: torch.Tensor, v: torch.Tensor) -> None:
                append_kv(kv_cache, meta.page_table, k, v, meta.cu_seqlens_q,
                          num_targets=meta.num_targets, backend=backend, validate=validate)  # fmt: skip

            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return paged_hstu_attention_partials(
                    q, k, v, kv_cache, meta.page_table, meta.cu_seqlens_q,
                    num_targets=meta.num_targets, alpha=self.alpha,
                    scaling_seqlen=scaling_seqlen, max_seqlen_q=max_seqlen_q or meta.max_seqlen_q,
                    backend=backend, validate=validate,
                )  # fmt: skip

        # The projection may write k/v into the pages itself: only where no backend was
        # forced and nothing is to be validated (the append op does both).
        fuse = backend == "auto" and not validate
        cache = (
            CacheAppend(kv_cache, meta.page_table, meta.cu_seqlens_q, meta.num_targets)
            if fuse
            else None
        )
        u, q, k, v = self._project(x, append, cache)
        # Where the attention splits its KV range, its partials are summed in finish()'s
        # LayerNorm kernel rather than by a kernel of their own.
        return self.finish(x, attend(q, k, v), u, inplace=inplace)

    def _check_plan_alpha(self, planned: float) -> None:
        own = 1.0 / math.sqrt(self.head_dim) if self.alpha is None else float(self.alpha)
        if planned != own:
            raise ValueError(f"plans: made for alpha {planned}, this layer's is {own}")
