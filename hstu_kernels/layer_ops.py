"""The HSTU layer's ops outside attention, behind the dispatcher like the attention ops.

Four op families, each with a PyTorch reference (:mod:`hstu_kernels.reference.layer`) and a
Triton implementation (``backends/triton``: ``rows``, ``projection``, ``fusion``):

- ``layernorm(x, weight, bias, eps)``: ``LayerNorm(x)`` over the last dim of ``x [rows, n]``;
- ``layernorm_mul(a, u, weight, bias, eps)``: ``LayerNorm(a) * u``; ``a`` may be a split
  attention's fp32 partials ``[S, rows, n]`` (summed in split order in the same pass);
- ``project_silu(h, weight)``: ``SiLU(h @ weight)`` as one contiguous ``[4, T, inner]``
  (slots u, v, q, k);
- ``project_silu_append(h, weight, append, separate)``: the same, with the new history K/V
  rows written into the cache :class:`~hstu_kernels.types.CacheAppend` names (by the GEMM's
  epilogue where that is faster), or ``separate()``, which does both the separate way.

:func:`kernels` resolves all four for one backend argument, device and dtype, once (the layer
calls it per forward: a dict lookup); ``backend="reference"`` (or ``HSTU_KERNELS_BACKEND``)
runs the whole layer on torch ops. Inside ``torch.compile`` the reference's torch ops run (the
compiler generates their kernels).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hstu_kernels import reference, settings
from hstu_kernels.dispatch import LAYER_OPS, Request, device_arch, registry

__all__ = ["LayerKernels", "PlannedRows", "kernels", "reset"]


@dataclass(frozen=True)
class LayerKernels:
    """The implementations one layer call uses (see the module docstring for signatures)."""

    backend: str  # the backend that serves them
    layernorm: Callable[..., torch.Tensor]
    layernorm_mul: Callable[..., torch.Tensor]
    project_silu: Callable[..., torch.Tensor]
    project_silu_append: Callable[..., torch.Tensor]
    # the backend's row-launch planner (see ``Backend.planners``), or None
    plan_rows: Callable[..., Callable | None] | None = None


_COMPILING = LayerKernels(
    "reference", reference.layernorm, reference.layernorm_mul, reference.project_silu,
    reference.project_silu_append,
)  # fmt: skip


class PlannedRows:
    """The two LayerNorm row ops of one batch's layers (``layernorm`` before the projection,
    ``layernorm_mul`` after the attention), as ``ops`` computes them, for a caller that runs
    many layers over the same rows: each launch is fixed once per input shape (where the
    backend plans row launches; else the ops run), and each op's output is one buffer reused
    layer after layer, so a call is a launch and nothing else. The buffers are overwritten by
    the next call: a layer's consumers must be enqueued (on the same stream) before the next
    layer's call, as in a block's forward."""

    __slots__ = ("_launches", "_ops")

    def __init__(self, ops: LayerKernels) -> None:
        self._ops = ops
        # input key -> (the fixed launch, its output buffer), or (None, None): the ops run
        self._launches: dict[tuple, tuple[Callable | None, torch.Tensor | None]] = {}

    def _launch(self, kind: str, a: torch.Tensor, u: torch.Tensor | None, weight: torch.Tensor,
                eps: float) -> tuple[Callable | None, torch.Tensor | None]:  # fmt: skip
        key = (kind, a.shape, a.dtype, eps, None if u is None else u.stride(0))
        found = self._launches.get(key)
        if found is None:
            plan = self._ops.plan_rows
            out_dtype = a.dtype if u is None or a.dim() == 2 else u.dtype
            found = (None, None)
            if plan is not None and a.is_contiguous() and (u is None or u.stride(1) == 1):
                run = plan(tuple(a.shape), a.dtype, out_dtype, a.device, eps,
                           None if u is None else u.stride(0), weight.dtype)  # fmt: skip
                if run is not None:
                    found = (run, torch.empty(a.shape[-2:], dtype=out_dtype, device=a.device))
            self._launches[key] = found
        return found

    def layernorm(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """``ops.layernorm(x, weight, bias, eps)``, into this batch's buffer."""
        run, out = self._launch("layernorm", x, None, weight, eps)
        if run is None:
            return self._ops.layernorm(x, weight, bias, eps)
        run(x, x, weight, bias, out)
        return out

    def layernorm_mul(
        self, a: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
        eps: float,
    ) -> torch.Tensor:  # fmt: skip
        """``ops.layernorm_mul(a, u, weight, bias, eps)``, into this batch's buffer."""
        run, out = self._launch("layernorm_mul", a, u, weight, eps)
        if run is None:
            return self._ops.layernorm_mul(a, u, weight, bias, eps)
        run(a, u, weight, bias, out)
        return out


_RESOLVED: dict[tuple, LayerKernels] = {}


def kernels(backend: str, device: torch.device, dtype: torch.dtype) -> LayerKernels:
    """The layer ops for ``backend`` (``"auto"``: the dispatcher's choice, which honours
    ``HSTU_KERNELS_BACKEND``) on ``device`` in ``dtype``. One backend serves all four. A
    backend (forced, or named by ``HSTU_KERNELS_BACKEND``) that has attention kernels only,
    such as the DSL backends, leaves the layer ops to the dispatcher's own choice; an unknown
    name raises :class:`~hstu_kernels.dispatch.BackendError`."""
    if torch.compiler.is_compiling():
        return _COMPILING
    key = (backend, device, dtype)
    found = _RESOLVED.get(key)
    if found is None:
        named = settings.get().backend if backend == "auto" else backend
        known = registry().backends
        attention_only = named in known and "layernorm" not in known[named].ops
        arch = device_arch(device)
        use = "auto" if attention_only else backend
        chosen = {
            op: registry().select(Request(op, arch, dtype, 0), use, env_override=not attention_only)
            for op in LAYER_OPS
        }
        names = {b.name for b in chosen.values()}
        if len(names) != 1:  # e.g. a backend registering only some of them
            raise ValueError(f"layer ops: served by several backends {sorted(names)}")
        b = chosen["layernorm"]
        found = LayerKernels(b.name, *(b.ops[op] for op in LAYER_OPS),
                             plan_rows=b.planners.get("layernorm"))  # fmt: skip
        _RESOLVED[key] = found
    return found


def reset() -> None:
    """Forget the resolved kernels (after the registry or the forced backend changed)."""
    _RESOLVED.clear()


settings.on_change(reset)  # the forced backend may have changed
