"""Backend registry and selection.

Each backend module under ``hstu_kernels/backends/`` calls :func:`register` with a
:class:`Backend` that declares what it serves (archs, dtypes, head dims, page sizes, mask
features) and how to tell whether it can run here (``probe``). The public ops describe each
call as a :class:`Request`; :func:`select` returns the highest-priority backend that can serve
it, and :func:`explain` says why each other backend was passed over. Adding a backend is a new
module in ``backends/``; nothing here or in ``ops.py`` changes.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from hstu_kernels import settings
from hstu_kernels.types import check_device, check_kv_dtype

__all__ = [
    "Backend",
    "BackendError",
    "Explanation",
    "Request",
    "device_arch",
    "explain",
    "call_size",
    "register",
    "registry",
    "select",
    "sm_count",
]

# The attention ops, and the HSTU layer's other ops (:mod:`hstu_kernels.layer_ops`), which have
# no head dim or page size of their own.
ATTENTION_OPS = ("jagged", "paged", "append_kv")
LAYER_OPS = ("layernorm", "layernorm_mul", "project_silu", "project_silu_append")
OPS = ATTENTION_OPS + LAYER_OPS
# Ops a backend may add that no Request names (the public op chooses between them and ``OPS``).
OPTIONAL_OPS = ("paged_partials",)
# "contexts"/"window": the mask options (DESIGN.md §1); "fp8_kv": the pool stores e4m3 pages
# with per-token scales (hstu_kernels.reference.fp8), paged and append ops only.
FEATURES = ("contexts", "window", "fp8_kv")
ENV_OVERRIDE = "HSTU_KERNELS_BACKEND"


class BackendError(ValueError):
    """No backend can serve a call, or the backend asked for cannot."""


@dataclass(frozen=True)
class Request:
    """What one call needs from a backend."""

    op: str
    arch: str  # "cpu" without CUDA, else "sm_<major><minor>", e.g. "sm_90"
    dtype: torch.dtype
    head_dim: int
    page_size: int | None = None  # paged ops only
    features: frozenset[str] = frozenset()
    # Size hint (None: unknown): the call's (batch, heads, longest query rows), its rows
    # rounded up to a multiple of SIZE_ROWS so that the selection cache stays small (see
    # call_size()). Only Backend.declines reads it, each backend in its own tiles.
    size: tuple[int, int, int] | None = None
    # "paged" only: the caller takes a split call's fp32 partials unsummed (the optional
    # paged_partials op), which changes what is fastest. Only Backend.declines reads it.
    partials: bool = False

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op: expected one of {OPS}, got {self.op!r}")
        unknown = set(self.features) - set(FEATURES)
        if unknown:
            raise ValueError(f"features: expected a subset of {FEATURES}, got {sorted(unknown)}")


@dataclass(frozen=True)
class Backend:
    """A kernel family and what it declares it can serve.

    ``archs``/``head_dims``/``page_sizes`` of ``None`` mean "any". ``priority`` maps an arch to
    a rank (higher wins); the key ``"*"`` is the default rank. ``probe(arch)`` returns ``None``
    when the backend can run on that arch here, else the reason it cannot (toolkit missing,
    no GPU, ...). ``ops`` maps an op name to its implementation, called positionally as the
    protocols of :mod:`hstu_kernels.op_signatures` say (checked at registration):

    - ``jagged(q, k, v, cu_seqlens, num_targets, max_seqlen, spec, out) -> None``
    - ``paged(q, k_new, v_new, kv_cache, page_table, cu_seqlens_q, num_targets, max_seqlen_q,
      spec, out) -> None``
    - ``append_kv(kv_cache, page_table, k, v, cu_seqlens, num_targets) -> None``
    - the layer ops (:mod:`hstu_kernels.layer_ops`): ``layernorm(x, weight, bias, eps) ->
      Tensor``, ``layernorm_mul(a, u, weight, bias, eps) -> Tensor``, ``project_silu(h,
      weight) -> Tensor [4, T, inner]``, ``project_silu_append(h, weight, append, separate)
      -> Tensor`` (also writes the new K/V rows ``append`` names, or calls ``separate()``,
      which does both the separate way)
    - optional, ``paged_partials(q, k_new, v_new, kv_cache, page_table, cu_seqlens_q,
      num_targets, max_seqlen_q, spec) -> Tensor``: the ``paged`` op that may return its
      split KV range's fp32 partials ``[S, *q.shape]`` unsummed, else its output (see
      ``ops.paged_hstu_attention_partials``)

    Implementations receive validated arguments: ``num_targets`` is always an int32 tensor,
    ``max_seqlen`` an int, ``spec`` a resolved :class:`~hstu_kernels.types.AttentionSpec`, and
    ``out`` a tensor shaped like ``q`` that they must write in full (tests poison it first).
    """

    name: str
    ops: Mapping[str, Callable]
    dtypes: frozenset[torch.dtype]
    archs: frozenset[str] | None = None
    head_dims: frozenset[int] | None = None
    page_sizes: frozenset[int] | None = None
    features: frozenset[str] = frozenset()
    priority: Mapping[str, int] = field(default_factory=lambda: {"*": 0})
    probe: Callable[[str], str | None] = lambda arch: None
    description: str = ""
    # declines(request): why another backend is faster for this call (measured), or None.
    # Consulted by "auto" selection only; a forced backend runs whatever it serves.
    declines: Callable[[Request], str | None] | None = None
    # planners[op](batch: PlannedBatch) -> run: what a plan (hstu_kernels.plan) calls once
    # per batch to get a launch with everything that depends only on the batch's metadata
    # decided (kernel handle, split-KV choice, grid, scalar arguments). The run callables take
    # only the per-call tensors:
    #   jagged(q, k, v, out) -> None; paged(q, k_new, v_new, kv_cache, out) -> None;
    #   paged_partials(q, k_new, v_new, kv_cache) -> Tensor; append_kv(kv_cache, k, v) -> None.
    # An op without a planner is planned generically: its run calls ``ops[op]`` with the
    # batch's metadata. The layer ops' one planner, ``layernorm(shape, x_dtype, out_dtype,
    # device, eps, stride_u, param_dtype) -> run(x, u, weight, bias, y) | None``, fixes the
    # LayerNorm row launches of a batch for both row ops (``layer_ops.PlannedRows``).
    planners: Mapping[str, Callable] = field(default_factory=dict)
    # The archs this backend's GPU verification in the repository covers (None: every arch
    # it serves). On another arch, "auto" uses it only once its first-use parity check has
    # passed on the device (hstu_kernels.verify).
    verified_archs: frozenset[str] | None = None
    # notes(op): what explain() adds about this backend's state for ``op`` (a fast path it
    # switched off in this process, and why), or None.
    notes: Callable[[str], str | None] | None = None

    def __post_init__(self) -> None:
        """Refuse a declaration that could only fail later: unknown op or feature names, a
        planner for an op the backend lacks."""
        known = set(OPS) | set(OPTIONAL_OPS)
        unknown = sorted(set(self.ops) - known)
        if unknown:
            raise ValueError(f"{self.name}: ops {unknown} are not ops (known: {sorted(known)})")
        lacking = sorted(set(self.planners) - set(self.ops))
        if lacking:
            raise ValueError(f"{self.name}: planners {lacking} have no op")
        bad = sorted(set(self.features) - set(FEATURES))
        if bad:
            raise ValueError(f"{self.name}: features {bad} are not features {FEATURES}")
        from hstu_kernels.op_signatures import check_implementation

        for op, fn in self.ops.items():
            check_implementation(self.name, op, fn, fp8_kv="fp8_kv" in self.features)

    def rank(self, arch: str) -> int:
        return self.priority.get(arch, self.priority.get("*", 0))

    def refusal(self, request: Request, *, check_available: bool = True) -> str | None:
        """Why this backend cannot serve ``request``, or ``None`` if it can."""
        if request.op not in self.ops:
            return f"does not implement {request.op}"
        if self.archs is not None and request.arch not in self.archs:
            return f"arch {request.arch} not in {sorted(self.archs)}"
        if request.dtype not in self.dtypes:
            names = sorted(str(d).removeprefix("torch.") for d in self.dtypes)
            return f"dtype {str(request.dtype).removeprefix('torch.')} not in {names}"
        layer_op = request.op in LAYER_OPS
        if not layer_op and self.head_dims is not None and request.head_dim not in self.head_dims:
            return f"head dim {request.head_dim} not in {sorted(self.head_dims)}"
        if (
            not layer_op
            and request.page_size is not None
            and self.page_sizes is not None
            and request.page_size not in self.page_sizes
        ):
            return f"page size {request.page_size} not in {sorted(self.page_sizes)}"
        missing = set(request.features) - set(self.features)
        if missing:
            kind = "mask features" if "fp8_kv" not in missing else "features"
            return f"lacks {kind} {sorted(missing)}"
        if check_available:
            return self.probe(request.arch)
        return None


@dataclass(frozen=True)
class Explanation:
    """The backend chosen for a request, and why each other backend was not."""

    request: Request
    choice: str | None
    reasons: Mapping[str, str]  # backend name -> why chosen / passed over

    def __str__(self) -> str:
        r = self.request
        head = (
            f"{r.op} on {r.arch}, {str(r.dtype).removeprefix('torch.')}, head dim {r.head_dim}"
            + (f", page size {r.page_size}" if r.page_size is not None else "")
            + (f", features {sorted(r.features)}" if r.features else "")
            + (
                f", batch {r.size[0]} x {r.size[1]} heads x <= {r.size[2]} rows"
                if r.size is not None
                else ""
            )
        )
        lines = [head, f"  -> {self.choice or 'no backend'}"]
        lines += [f"  {name}: {why}" for name, why in self.reasons.items()]
        return "\n".join(lines)


class Registry:
    """An ordered set of backends; the default one discovers ``hstu_kernels.backends``."""

    def __init__(self, backends: Iterable[Backend] = (), *, discover: bool = False) -> None:
        self._backends: dict[str, Backend] = {b.name: b for b in backends}
        self._import_errors: dict[str, str] = {}
        self._discover = discover
        self._lock = threading.Lock()
        # select() runs on every op call: keep its answer per (request, forced backend)
        self._selected: dict[tuple[Request, str, bool], Backend] = {}
        settings.on_change(self._selected.clear)  # the forced backend may have changed

    def register(self, backend: Backend) -> None:
        if backend.name in self._backends:
            raise ValueError(f"backend {backend.name!r} is registered twice")
        self._backends[backend.name] = backend
        self._selected.clear()

    def _ensure_discovered(self) -> None:
        if not self._discover:
            return
        with self._lock:
            if not self._discover:
                return
            self._discover = False
            import hstu_kernels.backends as pkg

            for mod in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
                try:
                    importlib.import_module(mod.name)
                except Exception as exc:  # a broken backend must not break the others
                    self._import_errors[mod.name] = f"{type(exc).__name__}: {exc}"

    @property
    def backends(self) -> dict[str, Backend]:
        self._ensure_discovered()
        return dict(self._backends)

    def explain(
        self,
        request: Request,
        backend: str = "auto",
        *,
        check_available: bool = True,
        env_override: bool = True,
    ) -> Explanation:
        """``env_override=False``: ``"auto"`` ignores ``HSTU_KERNELS_BACKEND``."""
        backends = self.backends
        forced = backend
        if backend == "auto" and env_override:
            forced = settings.get().backend
        reasons: dict[str, str] = {}
        if forced != "auto":
            if forced not in backends:
                known = sorted(backends)
                reasons[forced] = f"unknown backend (registered: {known})"
                reasons.update({m: f"import failed: {e}" for m, e in self._import_errors.items()})
                return Explanation(request, None, reasons)
            why = backends[forced].refusal(request, check_available=check_available)
            source = "backend=" if backend != "auto" else f"{ENV_OVERRIDE}="
            reasons[forced] = f"forced by {source}{forced}" if why is None else f"forced but {why}"
            if why is None:
                reasons[forced] += _note(backends[forced], request.op)
            return Explanation(request, forced if why is None else None, reasons)

        candidates = sorted(backends.values(), key=lambda b: -b.rank(request.arch))
        choice = None
        for b in candidates:
            why = b.refusal(request, check_available=check_available)
            if why is None and b.declines is not None:
                declined = b.declines(request)
                why = None if declined is None else f"declines: {declined}"
            if why is None and choice is None and check_available:
                from hstu_kernels import verify

                why = verify.verdict(b, request.arch)
            if why is not None:
                reasons[b.name] = why
            elif choice is None:
                choice = b.name
                reasons[b.name] = f"chosen: highest priority ({b.rank(request.arch)}) that serves"
                reasons[b.name] += _note(b, request.op)
            else:
                reasons[b.name] = f"could serve, lower priority ({b.rank(request.arch)})"
        reasons.update({m: f"import failed: {e}" for m, e in self._import_errors.items()})
        return Explanation(request, choice, reasons)

    def select(
        self, request: Request, backend: str = "auto", *, env_override: bool = True
    ) -> Backend:
        key = (request, backend, env_override)
        chosen = self._selected.get(key)
        if chosen is None:
            exp = self.explain(request, backend, env_override=env_override)
            if exp.choice is None:
                raise BackendError(f"no backend can serve this call:\n{exp}")
            chosen = self.backends[exp.choice]
            if not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
                self._selected[key] = chosen  # (a capture may have put a first-use check off)
        return chosen


SIZE_ROWS = 128  # the size hint's row quantum (no backend's query tile is larger)


def _note(backend: Backend, op: str) -> str:
    note = backend.notes(op) if backend.notes is not None else None
    return f"; {note}" if note else ""


def call_size(batch: int, heads: int, max_seqlen_q: int | None) -> tuple[int, int, int] | None:
    """:attr:`Request.size` of a call: ``(batch, heads, max_seqlen_q)``, the rows rounded up
    to a multiple of :data:`SIZE_ROWS`; ``None`` if the rows are unknown."""
    if max_seqlen_q is None:
        return None
    return (batch, heads, -(-max(max_seqlen_q, 1) // SIZE_ROWS) * SIZE_ROWS)


_REGISTRY = Registry(discover=True)


def registry() -> Registry:
    """The process-wide registry (backends are discovered on first use)."""
    return _REGISTRY


def register(backend: Backend) -> None:
    """Add a backend to the process-wide registry (called by backend modules on import)."""
    _REGISTRY.register(backend)


def check_backend_name(backend: object) -> str:
    """``backend`` if it is ``"auto"`` or a registered backend's name, else a named error
    (for arguments that are kept and used later, such as a block's)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
    names = registry().backends
    if backend != "auto" and backend not in names:
        raise ValueError(f"backend: expected 'auto' or one of {sorted(names)}, got {backend!r}")
    return backend


def select(request: Request, backend: str = "auto") -> Backend:
    """The backend for ``request``: ``backend`` or ``$HSTU_KERNELS_BACKEND`` forces one."""
    return _REGISTRY.select(request, backend)


_ARCH_CACHE: dict[int, str] = {}
_ARCH = re.compile(r"cpu|sm_\d{2,3}")


def device_arch(device: torch.device) -> str:
    """``"cpu"`` for a CPU device, else ``"sm_<major><minor>"`` of the CUDA device."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _ARCH_CACHE:
        major, minor = torch.cuda.get_device_capability(index)
        _ARCH_CACHE[index] = f"sm_{major}{minor}"
    return _ARCH_CACHE[index]


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (cached; the backends size their grids by it); 1 off
    CUDA (the Triton interpreter)."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def explain(
    op: str = "paged",
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    head_dim: int = 128,
    page_size: int | None = None,
    num_contexts: int = 0,
    max_attn_len: int = 0,
    backend: str = "auto",
    arch: str | None = None,
    batch: int | None = None,
    heads: int = 1,
    max_seqlen_q: int | None = None,
    partials: bool = False,
    kv_dtype: torch.dtype | None = None,
) -> Explanation:
    """Which backend a call with these properties would get, and why (print the result).

    ``device`` defaults to the current CUDA device, or the CPU without CUDA; ``arch`` (e.g.
    ``"sm_90"``) overrides the device's arch, to ask about another GPU without probing it.
    ``batch``/``heads``/``max_seqlen_q`` give the call's size (:func:`call_size`), which a
    backend may decline as too small for it; without ``batch`` the size is unknown.
    ``partials``: a ``paged`` call whose caller sums split partials itself (the cached HSTU
    layer's ``paged_hstu_attention_partials``). ``kv_dtype``: the pool's dtype for a ``paged``
    or ``append_kv`` call, if not ``dtype`` (``torch.float8_e4m3fn``: an FP8 pool).
    """
    for name, v in (("head_dim", head_dim), ("heads", heads)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    for name, v in (("batch", batch), ("max_seqlen_q", max_seqlen_q), ("page_size", page_size)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{name}: expected a positive int or None, got {v!r}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype, got {dtype!r}")
    if not isinstance(partials, bool):
        raise TypeError(f"partials: expected a bool, got {partials!r}")
    check_backend_name(backend)
    for name, v in (("num_contexts", num_contexts), ("max_attn_len", max_attn_len)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
    if arch is not None and not _ARCH.fullmatch(str(arch)):
        raise ValueError(
            f"arch: expected 'cpu' or 'sm_<major><minor>' (e.g. 'sm_90'), got {arch!r}"
        )
    probe = arch is None
    if arch is None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        arch = device_arch(check_device("device", device))
    if op == "paged" and page_size is None:
        page_size = 32
    features = set()
    if num_contexts:
        features.add("contexts")
    if max_attn_len:
        features.add("window")
    if check_kv_dtype(kv_dtype, dtype):
        if op not in ("paged", "append_kv"):
            raise ValueError(f"kv_dtype: a pool's dtype, for paged and append_kv only, not {op}")
        features.add("fp8_kv")
    size = None if batch is None else call_size(batch, heads, max_seqlen_q)
    request = Request(op, arch, dtype, head_dim, page_size, frozenset(features), size, partials)
    return _REGISTRY.explain(request, backend, check_available=probe)
