"""The call signature of every backend op, as typed protocols, and the check that a backend's
implementations take them.

A backend registers its implementations by op name (:class:`~hstu_kernels.dispatch.Backend`'s
``ops``); the dispatcher calls them positionally with validated arguments, in the order these
protocols give. :func:`check_implementation` refuses, at registration, a callable that cannot
take that many positional arguments (``*args`` forwarding is refused too: a wrapper states the
parameters it forwards), so a backend whose op disagrees with its contract fails where it is
declared, not on its first call.

``kv_scales`` (the paged and append ops' last parameter) is passed only for an FP8 pool, so only
a backend declaring the ``fp8_kv`` feature must take it (``check_implementation(...,
fp8_kv=True)``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Protocol

import torch

from hstu_kernels.types import AttentionSpec, CacheAppend, PageTable

__all__ = [
    "SIGNATURES",
    "AppendKvOp",
    "JaggedOp",
    "LayerNormMulOp",
    "LayerNormOp",
    "PagedOp",
    "PagedPartialsOp",
    "ProjectSiluAppendOp",
    "ProjectSiluOp",
    "check_implementation",
]


class JaggedOp(Protocol):
    """``jagged``: writes the attention of whole sequences into ``out`` (shaped like ``q``)."""

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor,
        num_targets: torch.Tensor,
        max_seqlen: int,
        spec: AttentionSpec,
        out: torch.Tensor,
        /,
    ) -> None: ...


class PagedOp(Protocol):
    """``paged``: writes the new rows' attention over the cached history into ``out``."""

    def __call__(
        self,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        kv_cache: torch.Tensor,
        page_table: PageTable,
        cu_seqlens_q: torch.Tensor,
        num_targets: torch.Tensor,
        max_seqlen_q: int,
        spec: AttentionSpec,
        out: torch.Tensor,
        kv_scales: torch.Tensor | None = None,
        /,
    ) -> None: ...


class PagedPartialsOp(Protocol):
    """``paged_partials`` (optional): the ``paged`` op returning its split KV range's fp32
    partials ``[S, *q.shape]`` unsummed (``S = 1``: the output itself)."""

    def __call__(
        self,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        kv_cache: torch.Tensor,
        page_table: PageTable,
        cu_seqlens_q: torch.Tensor,
        num_targets: torch.Tensor,
        max_seqlen_q: int,
        spec: AttentionSpec,
        kv_scales: torch.Tensor | None = None,
        /,
    ) -> torch.Tensor: ...


class AppendKvOp(Protocol):
    """``append_kv``: writes each sequence's new history rows of ``k``/``v`` into its pages."""

    def __call__(
        self,
        kv_cache: torch.Tensor,
        page_table: PageTable,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor,
        num_targets: torch.Tensor,
        kv_scales: torch.Tensor | None = None,
        /,
    ) -> None: ...


class LayerNormOp(Protocol):
    """``layernorm``: ``LayerNorm(x)`` over the last dim of ``x [rows, n]``."""

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, /
    ) -> torch.Tensor: ...


class LayerNormMulOp(Protocol):
    """``layernorm_mul``: ``LayerNorm(a) * u``; ``a`` may be fp32 split partials."""

    def __call__(
        self, a: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
        eps: float, /,
    ) -> torch.Tensor: ...  # fmt: skip


class ProjectSiluOp(Protocol):
    """``project_silu``: ``SiLU(h @ weight)`` as one contiguous ``[4, T, inner]``."""

    def __call__(self, h: torch.Tensor, weight: torch.Tensor, /) -> torch.Tensor: ...


class ProjectSiluAppendOp(Protocol):
    """``project_silu_append``: ``project_silu`` that also writes the new K/V rows
    ``append`` names, or calls ``separate()``, which does both the separate way."""

    def __call__(
        self, h: torch.Tensor, weight: torch.Tensor, append: CacheAppend,
        separate: Callable[[], torch.Tensor], /,
    ) -> torch.Tensor: ...  # fmt: skip


SIGNATURES: dict[str, type] = {
    "jagged": JaggedOp,
    "paged": PagedOp,
    "paged_partials": PagedPartialsOp,
    "append_kv": AppendKvOp,
    "layernorm": LayerNormOp,
    "layernorm_mul": LayerNormMulOp,
    "project_silu": ProjectSiluOp,
    "project_silu_append": ProjectSiluAppendOp,
}


# the ops whose last parameter is an FP8 pool's scales
FP8_OPS = ("paged", "paged_partials", "append_kv")


def _arity(protocol: type) -> int:
    """The protocol's required parameters (``kv_scales``, optional, is not counted)."""
    params = list(inspect.signature(protocol.__call__).parameters.values())[1:]  # less self
    return sum(p.default is p.empty for p in params)


def check_implementation(backend: str, op: str, fn: Callable, fp8_kv: bool = False) -> None:
    """Raise ``TypeError`` if ``fn`` cannot be called as ``SIGNATURES[op]`` says (as many
    positional arguments, no more, no fewer; with ``fp8_kv``, one more: the pool's scales),
    or forwards ``*args``."""
    if not callable(fn):
        raise TypeError(f"{backend}: op {op!r} is not callable ({fn!r})")
    want = _arity(SIGNATURES[op]) + (1 if fp8_kv and op in FP8_OPS else 0)
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: cannot be checked
        return
    kinds = inspect.Parameter
    if any(p.kind is kinds.VAR_POSITIONAL for p in params):
        raise TypeError(
            f"{backend}: op {op!r} takes *args; name its {want} parameters "
            f"({SIGNATURES[op].__name__})"
        )
    positional = [p for p in params if p.kind in (kinds.POSITIONAL_ONLY,
                                                  kinds.POSITIONAL_OR_KEYWORD)]  # fmt: skip
    required = [p for p in positional if p.default is p.empty]
    required_kw = [p for p in params if p.kind is kinds.KEYWORD_ONLY and p.default is p.empty]
    if len(required) > want or len(positional) < want or required_kw:
        names = ", ".join(p.name for p in positional)
        raise TypeError(
            f"{backend}: op {op!r} takes ({names}); the dispatcher calls it with {want} "
            f"positional arguments ({SIGNATURES[op].__name__})"
        )
