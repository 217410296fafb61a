"""One HSTU layer for inference, with an uncached and a cached (paged KV) path.

    h          = LayerNorm(x)
    u, v, q, k = SiLU(h @ W_uvqk)            one fused projection, [tokens, 4 * heads*D]
    a          = HSTU attention(q, k, v)     hstu_attention, or append_kv + paged attention
    y          = LayerNorm(a) * u
    out        = x + y @ W_o                 output projection and residual (one addmm)

As in the published HSTU inference path, the projections carry no bias (the LayerNorms have
affine weights).

Every step goes through the dispatcher, so the layer runs on every backend: attention through
the public ops (in the cached path their internal variant ``paged_hstu_attention_partials``,
which lets a backend that splits the KV range hand back the unsummed fp32 partials), the rest through the layer ops of
:mod:`hstu_kernels.layer_ops` (``layernorm``, ``project_silu``, ``project_silu_append``,
``layernorm_mul``), for the layer's ``backend`` argument; ``backend="reference"`` runs it all
on torch ops. On a GPU the Triton layer ops keep the memory traffic outside the matmuls and the
attention to one pass each: the projection GEMM applies the SiLU of its four column groups in
its epilogue and stores one ``[4, tokens, heads*D]`` buffer (``u``, ``q``, ``k``, ``v`` are
then the contiguous tensors the ops take); in the cached path it may write the new history
K/V into the pages too (unless ``validate``: the append op validates); ``layernorm_mul`` sums
a split attention's partials in its pass. The residual ``addmm`` accumulates into ``x`` itself
(``inplace=True``) when the caller no longer needs ``x``, which saves the copy an
out-of-place ``addmm`` makes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hstu_kernels import layer_ops, settings
from hstu_kernels.dispatch import Request, device_arch, registry
from hstu_kernels.kvcache.metadata import BatchMetadata, JaggedMetadata
from hstu_kernels.ops import append_kv, hstu_attention, paged_hstu_attention_partials
from hstu_kernels.plan import (
    AppendPlan,
    JaggedAttentionPlan,
    PagedAttentionPlan,
    plan_append_kv,
    plan_jagged_attention,
    plan_paged_attention,
)
from hstu_kernels.types import (
    CacheAppend,
    check_kv_dtype,
    check_storage_dtype,
    is_finite_real,
    is_int,
)

__all__ = [
    "CachedPlans",
    "HSTULayer",
    "plan_cached",
    "plan_uncached",
]


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
    kv_dtype: torch.dtype | None = None,
) -> CachedPlans:
    """Plan one cached batch for every layer. Without ``validate`` the plans take the host
    values the metadata was built from (``meta.layout``): no device-to-host sync.
    ``kv_dtype``: the pools' (``cache.kv_dtype``: FP8 pools, else ``None``)."""
    layout = None if validate else meta.layout
    common = dict(heads=heads, head_dim=head_dim, dtype=dtype, page_size=meta.page_size,
                  backend=backend, validate=validate, layout=layout,
                  kv_dtype=kv_dtype)  # fmt: skip
    attention = plan_paged_attention(
        meta.page_table, meta.cu_seqlens_q, meta.num_targets, alpha=alpha,
        scaling_seqlen=scaling_seqlen, max_seqlen_q=max_seqlen_q or meta.max_seqlen_q,
        partials=True, **common,
    )  # fmt: skip
    common["backend"] = _append_backend(backend, meta, head_dim, dtype, kv_dtype)
    append = plan_append_kv(meta.page_table, meta.cu_seqlens_q, meta.num_targets, **common)
    return CachedPlans(attention, append)


def _append_backend(
    backend: str,
    meta: BatchMetadata,
    head_dim: int,
    dtype: torch.dtype,
    kv_dtype: torch.dtype | None = None,
) -> str:
    """The backend argument of the block's K/V append: ``backend``, unless the backend it
    names (or ``HSTU_KERNELS_BACKEND`` names, for ``"auto"``) has attention kernels only, as
    the DSL backends do; the append is then the dispatcher's own choice (as the layer ops
    are)."""
    named = settings.get().backend if backend == "auto" else backend
    found = registry().backends.get(named)
    if found is None or "append_kv" in found.ops:
        return backend
    device = meta.cu_seqlens_q.device
    features = frozenset({"fp8_kv"}) if check_kv_dtype(kv_dtype, dtype) else frozenset()
    request = Request("append_kv", device_arch(device), dtype, head_dim, meta.page_size, features)
    return registry().select(request, "auto", env_override=False).name


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
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
            raise ValueError(f"eps: expected a float in (0, 1), got {eps!r}")
        if alpha is not None and not is_finite_real(alpha):
            raise TypeError(f"alpha: expected a finite float or None, got {alpha!r}")
        check_storage_dtype(dtype)
        if not is_int(seed):
            raise TypeError(f"seed: expected an int, got {seed!r}")
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

    def _ops(self, backend: str) -> layer_ops.LayerKernels:
        """The layer ops for ``backend`` on this layer's device and dtype."""
        w = self.uvqk_weight
        return layer_ops.kernels(backend, w.device, w.dtype)

    def project(self, x: torch.Tensor, *, backend: str = "auto") -> tuple[torch.Tensor, ...]:
        """``x [T, hidden]`` -> ``u [T, heads*D]`` and ``q, k, v [T, heads, D]``, all after
        their SiLU and contiguous (slots of one ``[4, T, heads*D]`` buffer)."""
        return self._project(x, None, None, self._ops(backend))

    def _project(
        self,
        x: torch.Tensor,
        append: Callable[[torch.Tensor, torch.Tensor], None] | None,
        cache: CacheAppend | None,
        ops: layer_ops.LayerKernels,
    ) -> tuple[torch.Tensor, ...]:
        """:meth:`project`, then ``append(k, v)`` (the cached path's append op) if given;
        ``cache``: where the projection may write the new k/v itself instead (the
        ``project_silu_append`` layer op; ``append`` then runs only if it takes the separate
        path)."""
        self._check_x(x)
        tokens = x.shape[0]
        shape = (tokens, self.heads, self.head_dim)
        h = ops.layernorm(x, self.norm_in_weight, self.norm_in_bias, self.eps)

        def separate() -> torch.Tensor:
            uvqk = ops.project_silu(h, self.uvqk_weight)  # one GEMM, SiLU fused
            if append is not None:
                append(uvqk[3].view(shape), uvqk[1].view(shape))
            return uvqk

        if cache is None:
            uvqk = separate()
        else:
            uvqk = ops.project_silu_append(h, self.uvqk_weight, cache, separate)
        u, v, q, k = uvqk.unbind(0)
        return u, q.view(shape), k.view(shape), v.view(shape)

    def _check_x(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"x: expected [tokens, {self.hidden}], got {tuple(x.shape)}")
        if x.dtype != self.uvqk_weight.dtype:
            raise TypeError(f"x: expected dtype {self.uvqk_weight.dtype}, got {x.dtype}")

    def finish(
        self,
        x: torch.Tensor,
        attn: torch.Tensor,
        u: torch.Tensor,
        *,
        inplace: bool = False,
        backend: str = "auto",
    ) -> torch.Tensor:
        """``x + (LayerNorm(attn) * u) @ W_o^T`` (``u`` as :meth:`project` returns it).

        ``attn``: the attention output ``[tokens, heads, D]``, or the partials
        ``[S, tokens, heads, D]`` of ``paged_hstu_attention_partials`` (``S > 1``: fp32,
        summed in split order in the ``layernorm_mul`` layer op's pass; ``S = 1``: the output
        itself).
        ``inplace=True`` accumulates into ``x`` and returns it: no copy of ``x``, but the
        caller's ``x`` is overwritten (use it only for a tensor nobody reads afterwards).
        """
        return self._finish(x, attn, u, inplace, self._ops(backend))

    def _finish(
        self,
        x: torch.Tensor,
        attn: torch.Tensor,
        u: torch.Tensor,
        inplace: bool,
        ops: layer_ops.LayerKernels | layer_ops.PlannedRows,
    ) -> torch.Tensor:
        """:meth:`finish` with the layer ops (or a batch's planned row ops) resolved."""
        inner = self.heads * self.head_dim
        if attn.dim() == 4 and attn.shape[0] == 1:
            attn = attn[0]  # an unsplit output
        if attn.dim() == 4 and attn.dtype != torch.float32:
            raise TypeError(f"attn: split partials [S, tokens, heads, D] must be fp32, got "
                            f"{attn.dtype}")  # fmt: skip
        a = attn.view(-1, x.shape[0], inner) if attn.dim() == 4 else attn.view(-1, inner)
        y = ops.layernorm_mul(a, u, self.norm_attn_weight, self.norm_attn_bias, self.eps)
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
        ops = self._ops(backend)
        self._check_x(x)
        if plan is None and not torch.compiler.is_compiling():
            plan = plan_uncached(
                meta, heads=self.heads, head_dim=self.head_dim, dtype=x.dtype,
                scaling_seqlen=scaling_seqlen, alpha=self.alpha, backend=backend,
                validate=validate,
            )  # fmt: skip
        if plan is not None:
            self._check_plan_alpha(plan.spec.alpha)
            return self._forward_uncached_planned(x, plan, ops, ops, inplace)
        u, q, k, v = self._project(x, None, None, ops)
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
        return self._finish(x, attn, u, inplace, ops)

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
        kv_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """New history + target rows, ``x [meta.num_tokens, hidden]``, over this layer's
        cache ``kv_cache [num_pages, 2, page_size, heads, D]`` (an FP8 pool with its
        ``kv_scales``): appends the new history K/V,
        then attends over the whole cached history; ``inplace``: the residual overwrites
        ``x`` (see :meth:`finish`). ``plans``: the batch's plans (:func:`plan_cached`; made
        here if not given, except inside ``torch.compile``, which calls the functional ops).
        """
        fp8 = kv_scales is not None
        if plans is None and not torch.compiler.is_compiling():
            plans = plan_cached(
                meta, heads=self.heads, head_dim=self.head_dim, dtype=x.dtype,
                scaling_seqlen=scaling_seqlen, alpha=self.alpha, max_seqlen_q=max_seqlen_q,
                backend=backend, validate=validate, kv_dtype=kv_cache.dtype if fp8 else None,
            )  # fmt: skip
        if plans is not None:
            self._check_plan_alpha(plans.attention.spec.alpha)
            if not validate:  # (a validated call appends through the append op, unfused)
                ops = self._ops(backend)
                return self._forward_planned(x, meta, kv_cache, kv_scales, plans, ops, ops,
                                             inplace)  # fmt: skip

            def append(k: torch.Tensor, v: torch.Tensor) -> None:
                plans.append.run(kv_cache, k, v, kv_scales)

            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return plans.attention.run_partials(q, k, v, kv_cache, kv_scales)

        else:  # inside torch.compile: the functional ops (their registered ops)

            def append(k: torch.Tensor, v: torch.Tensor) -> None:
                append_kv(kv_cache, meta.page_table, k, v, meta.cu_seqlens_q,
                          num_targets=meta.num_targets, backend=backend, validate=validate,
                          kv_scales=kv_scales)  # fmt: skip

            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return paged_hstu_attention_partials(
                    q, k, v, kv_cache, meta.page_table, meta.cu_seqlens_q,
                    num_targets=meta.num_targets, alpha=self.alpha,
                    scaling_seqlen=scaling_seqlen, max_seqlen_q=max_seqlen_q or meta.max_seqlen_q,
                    backend=backend, validate=validate, kv_scales=kv_scales,
                )  # fmt: skip

        # The backend's projection may write k/v into the pages itself, unless the append is
        # to be validated (the append op does that) or quantises into an FP8 pool (which the
        # projection's epilogue does not).
        fuse = not validate and not fp8
        cache = (
            CacheAppend(kv_cache, meta.page_table, meta.cu_seqlens_q, meta.num_targets)
            if fuse
            else None
        )
        ops = self._ops(backend)
        u, q, k, v = self._project(x, append, cache, ops)
        # Where the attention splits its KV range, its partials are summed in finish()'s
        # LayerNorm kernel rather than by a kernel of their own.
        return self._finish(x, attend(q, k, v), u, inplace, ops)

    def _forward_uncached_planned(
        self,
        x: torch.Tensor,
        plan: JaggedAttentionPlan,
        ops: layer_ops.LayerKernels,
        rows: layer_ops.LayerKernels | layer_ops.PlannedRows,
        inplace: bool,
    ) -> torch.Tensor:
        """:meth:`forward_uncached` with its plan (checked for this layer's alpha), layer ops
        and row ops resolved (a block's planned row launches, or the ops themselves)."""
        self._check_x(x)
        h = rows.layernorm(x, self.norm_in_weight, self.norm_in_bias, self.eps)
        uvqk = ops.project_silu(h, self.uvqk_weight)
        _, v, q, k = uvqk.view(4, x.shape[0], self.heads, self.head_dim).unbind(0)
        return self._finish(x, plan.run(q, k, v), uvqk[0], inplace, rows)

    def _forward_planned(
        self,
        x: torch.Tensor,
        meta: BatchMetadata,
        kv_cache: torch.Tensor,
        kv_scales: torch.Tensor | None,
        plans: CachedPlans,
        ops: layer_ops.LayerKernels,
        rows: layer_ops.LayerKernels | layer_ops.PlannedRows,
        inplace: bool,
    ) -> torch.Tensor:
        """:meth:`forward_cached` (unvalidated) with its plans (checked for this layer's
        alpha), layer ops and row ops resolved (a block's planned row launches, or the ops
        themselves): the eager per-layer path, with no per-call resolution."""
        self._check_x(x)
        tokens = x.shape[0]
        h = rows.layernorm(x, self.norm_in_weight, self.norm_in_bias, self.eps)
        weight = self.uvqk_weight
        shape4 = (4, tokens, self.heads, self.head_dim)
        if kv_scales is None:  # the projection may write the new k/v into the pages itself
            append = CacheAppend(kv_cache, meta.page_table, meta.cu_seqlens_q, meta.num_targets)

            def separate() -> torch.Tensor:
                uvqk = ops.project_silu(h, weight)
                _, v, _, k = uvqk.view(shape4).unbind(0)
                plans.append.run(kv_cache, k, v)
                return uvqk

            uvqk = ops.project_silu_append(h, weight, append, separate)
        else:  # an FP8 pool: the append op quantises
            uvqk = ops.project_silu(h, weight)
        _, v, q, k = uvqk.view(shape4).unbind(0)
        if kv_scales is not None:
            plans.append.run(kv_cache, k, v, kv_scales)
        attn = plans.attention.run_partials(q, k, v, kv_cache, kv_scales)
        return self._finish(x, attn, uvqk[0], inplace, rows)

    def _check_plan_alpha(self, planned: float) -> None:
        own = 1.0 / math.sqrt(self.head_dim) if self.alpha is None else float(self.alpha)
        if planned != own:
            raise ValueError(f"plans: made for alpha {planned}, this layer's is {own}")
