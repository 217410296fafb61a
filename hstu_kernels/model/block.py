"""A block of L HSTU layers for inference, uncached or over a paged KV cache."""

from __future__ import annotations

import torch
from torch import nn

from hstu_kernels import layer_ops
from hstu_kernels.dispatch import check_backend_name
from hstu_kernels.kvcache.manager import KVCacheConfig, KVCacheManager
from hstu_kernels.kvcache.metadata import BatchMetadata, JaggedMetadata
from hstu_kernels.model.layer import CachedPlans, HSTULayer, plan_cached, plan_uncached
from hstu_kernels.types import check_storage_dtype, is_int

__all__ = ["HSTUBlock"]


def _residual_in_place(layer: int, return_all: bool, overwrite_x: bool = False) -> bool:
    """Whether layer ``layer`` may accumulate its residual into its input: not the first
    layer's (the caller's ``x``) unless the caller gave it up (``overwrite_x``), and none
    when every layer's output is returned."""
    return (layer > 0 or overwrite_x) and not return_all


class HSTUBlock(nn.Module):
    """``num_layers`` :class:`HSTULayer` s in sequence.

    Two paths give the same numbers (DESIGN.md §1 parity, up to rounding):

    - :meth:`forward_uncached`: whole sequences (all history + targets) through jagged
      attention; nothing is cached.
    - :meth:`forward_cached`: only the new history + target rows; each layer appends the new
      history K/V to its pages in a :class:`~hstu_kernels.kvcache.KVCacheManager` and attends
      over the whole cached history.

    Args:
        num_layers, hidden, heads, head_dim: the model's shape.
        scaling_seqlen: the attention's score divisor, a model constant (the configured
            maximum sequence length); cached and uncached calls use it alike.
        alpha, eps, dtype, device: as in :class:`HSTULayer`.
        backend: attention backend for every op (``"auto"``: the dispatcher picks).
        seed: layer ``i`` is initialized with ``seed + i``.
    """

    def __init__(
        self,
        num_layers: int,
        hidden: int,
        heads: int,
        head_dim: int,
        *,
        scaling_seqlen: int,
        alpha: float | None = None,
        eps: float = 1e-6,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        backend: str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_storage_dtype(dtype)
        if not is_int(num_layers) or num_layers < 1:
            raise ValueError(f"num_layers: expected a positive int, got {num_layers!r}")
        if (
            not isinstance(scaling_seqlen, int)
            or isinstance(scaling_seqlen, bool)
            or scaling_seqlen < 1
        ):
            raise ValueError(f"scaling_seqlen: expected a positive int, got {scaling_seqlen!r}")
        self.num_layers, self.hidden, self.heads, self.head_dim = (
            num_layers,
            hidden,
            heads,
            head_dim,
        )
        self.scaling_seqlen = scaling_seqlen
        self.backend = check_backend_name(backend)
        self.layers = nn.ModuleList(
            HSTULayer(
                hidden,
                heads,
                head_dim,
                alpha=alpha,
                eps=eps,
                dtype=dtype,
                device=device,
                seed=seed + i,
            )
            for i in range(num_layers)
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].uvqk_weight.dtype

    @property
    def device(self) -> torch.device:
        return self.layers[0].uvqk_weight.device

    def make_cache(
        self,
        num_pages: int,
        page_size: int,
        *,
        host_pages: int = 0,
        kv_dtype: torch.dtype | None = None,
    ) -> KVCacheManager:
        """A KV cache shaped for this block (``num_pages`` per layer, page 0 reserved;
        ``kv_dtype=torch.float8_e4m3fn``: an FP8 pool, see :class:`KVCacheConfig`)."""
        return KVCacheManager(
            KVCacheConfig(
                num_layers=self.num_layers,
                num_pages=num_pages,
                page_size=page_size,
                heads=self.heads,
                head_dim=self.head_dim,
                dtype=self.dtype,
                device=self.device,
                host_pages=host_pages,
                kv_dtype=kv_dtype,
            )
        )

    def _check_x(self, x: torch.Tensor, tokens: int) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.shape != (tokens, self.hidden):
            raise ValueError(f"x: expected shape ({tokens}, {self.hidden}), got {tuple(x.shape)}")

    @torch.no_grad()
    def forward_uncached(
        self, x: torch.Tensor, meta: JaggedMetadata, *, return_all: bool = False
    ) -> torch.Tensor | list[torch.Tensor]:
        """``x [sum_b (H_b + T_b), hidden]``: every token of every sequence, packed as
        ``meta`` (from :func:`~hstu_kernels.kvcache.build_jagged_metadata`) says.

        Returns the last layer's output, or every layer's output if ``return_all``.
        """
        self._check_x(x, meta.num_tokens)
        outs = []
        if torch.compiler.is_compiling():  # the functional op, layer by layer
            for i, layer in enumerate(self.layers):
                x = layer.forward_uncached(x, meta, scaling_seqlen=self.scaling_seqlen,
                                           backend=self.backend,
                                           inplace=_residual_in_place(i, return_all))  # fmt: skip
                outs.append(x)
            return outs if return_all else x
        # one plan for every layer (no sync), the layer ops and their row launches resolved once
        plan = plan_uncached(
            meta, heads=self.heads, head_dim=self.head_dim, dtype=self.dtype,
            scaling_seqlen=self.scaling_seqlen, alpha=self.layers[0].alpha,
            backend=self.backend,
        )  # fmt: skip
        first = self.layers[0]
        first._check_plan_alpha(plan.spec.alpha)
        ops = first._ops(self.backend)
        rows = layer_ops.PlannedRows(ops)
        for i, layer in enumerate(self.layers):
            x = layer._forward_uncached_planned(
                x, plan, ops, rows, _residual_in_place(i, return_all)
            )
            outs.append(x)
        return outs if return_all else x

    @torch.no_grad()
    def forward_cached(
        self,
        x: torch.Tensor,
        meta: BatchMetadata,
        cache: KVCacheManager,
        *,
        return_all: bool = False,
        max_seqlen_q: int | None = None,
        wait_for_pages: bool = True,
        overwrite_x: bool = False,
        plans: CachedPlans | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """``x [meta.num_tokens, hidden]``: each sequence's new history rows then its target
        rows, packed as ``meta`` (from ``cache.prepare(...)``) says.

        Layer ``l`` waits for layer ``l``'s onloaded pages only (``cache.wait_layer``), so
        onloading later layers overlaps with compute. Capturable into a CUDA graph (see
        :class:`~hstu_kernels.model.graphs.CachedBlockGraphs`), where ``max_seqlen_q`` is the
        bucket's bound. ``wait_for_pages=False`` skips the per-layer waits (the caller must
        then wait for every layer's transfers before the call, see ``cache.wait_all``).
        ``overwrite_x=True`` lets the first layer accumulate its residual into ``x`` too (one
        copy of ``x`` fewer; the output is then ``x`` itself, unless ``return_all``).
        ``plans``: the batch's plans (:meth:`plan_cached`); made here if not given (one set for
        every layer, from ``meta.layout``: no sync), except inside ``torch.compile``.
        Returns the last layer's output, or every layer's if ``return_all``.

        ``cache.prepare`` already recorded the batch's new lengths: if this call raises, the
        cache holds lengths whose K/V were never written. Take ``cache.snapshot()`` before
        ``prepare`` and ``cache.rollback(...)`` on failure (the ranking model does this). A call
        refused by its argument checks writes nothing.
        """
        self._check_x(x, meta.num_tokens)
        if cache.config.num_layers != self.num_layers:
            raise ValueError(
                f"cache: has {cache.config.num_layers} layers, the block {self.num_layers}"
            )
        if torch.compiler.is_compiling():  # the functional ops, layer by layer
            return self._forward_cached_ops(x, meta, cache, return_all, max_seqlen_q,
                                            wait_for_pages, overwrite_x)  # fmt: skip
        if plans is None:
            plans = self.plan_cached(meta, max_seqlen_q=max_seqlen_q, kv_dtype=cache.kv_dtype)
        first = self.layers[0]
        first._check_plan_alpha(plans.attention.spec.alpha)  # (the layers share alpha)
        ops = first._ops(self.backend)
        rows = layer_ops.PlannedRows(ops)
        # Waits are for copies still in flight: when none is (one event query), every wait
        # would be satisfied already and costs only host time. A capture keeps them (the
        # graph replays later, when copies may be in flight).
        if wait_for_pages and cache.device.type == "cuda":
            wait_for_pages = torch.cuda.is_current_stream_capturing() or cache.transfers_pending()
        pools = cache.pool.unbind(0)  # one view per layer, made at once
        scales = (None,) * self.num_layers if cache.scales is None else cache.scales.unbind(0)
        outs = []
        for i, layer in enumerate(self.layers):
            if wait_for_pages:
                cache.wait_layer(i)
            x = layer._forward_planned(
                x, meta, pools[i], scales[i], plans, ops, rows,
                _residual_in_place(i, return_all, overwrite_x),
            )  # fmt: skip
            outs.append(x)
        return outs if return_all else x

    def _forward_cached_ops(
        self,
        x: torch.Tensor,
        meta: BatchMetadata,
        cache: KVCacheManager,
        return_all: bool,
        max_seqlen_q: int | None,
        wait_for_pages: bool,
        overwrite_x: bool,
    ) -> torch.Tensor | list[torch.Tensor]:
        """:meth:`forward_cached` through the functional ops (inside ``torch.compile``)."""
        outs = []
        for i, layer in enumerate(self.layers):
            if wait_for_pages:
                cache.wait_layer(i)
            x = layer.forward_cached(
                x,
                meta,
                cache.layer_cache(i),
                scaling_seqlen=self.scaling_seqlen,
                max_seqlen_q=max_seqlen_q,
                backend=self.backend,
                inplace=_residual_in_place(i, return_all, overwrite_x),
                kv_scales=cache.layer_scales(i),
            )
            outs.append(x)
        return outs if return_all else x

    def plan_cached(
        self,
        meta: BatchMetadata,
        *,
        max_seqlen_q: int | None = None,
        kv_dtype: torch.dtype | None = None,
    ) -> CachedPlans:
        """The plans of one cached batch for every layer (:func:`~.layer.plan_cached`), from
        the host values the metadata was built from: no device-to-host sync. ``kv_dtype``:
        the cache's (``cache.kv_dtype``)."""
        return plan_cached(
            meta, heads=self.heads, head_dim=self.head_dim, dtype=self.dtype,
            scaling_seqlen=self.scaling_seqlen, alpha=self.layers[0].alpha,
            max_seqlen_q=max_seqlen_q, backend=self.backend, kv_dtype=kv_dtype,
        )  # fmt: skip
