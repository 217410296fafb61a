"""The HSTU layer's input projection with its SiLU fused into the GEMM's epilogue.

    out[0..3] = SiLU(h @ W)[:, slot * inner : (slot + 1) * inner]      slots u, v, q, k

``h [T, K] @ W [K, 4 * inner]`` is one GEMM; every one of its four column groups then goes
through a SiLU, and the attention wants ``q``, ``k``, ``v`` as contiguous tensors. Done as a
cuBLAS GEMM followed by a SiLU/split pass, the pass re-reads and re-writes the whole
``[T, 4 * inner]`` product: a full extra memory round trip that on an H100 costs about 40% of
the GEMM's own time (145 us against 384 us at T=34816, hidden 1024, inner 1024, bf16). The
Triton GEMM here applies the SiLU (in fp32, on the accumulator) and stores each tile straight
into its slot of one contiguous ``[4, T, inner]`` tensor, so the pass disappears.

Two Triton GEMMs are offered: :func:`silu_gemm` (one program per output tile, plain pointer
loads) and :func:`silu_gemm_tma` (Hopper and later: a persistent kernel, one program per SM
looping over the tiles, with TMA tensor-descriptor loads and stores, so one tile's store
overlaps the next tile's loads). Neither is always as fast as cuBLAS, so :func:`project_silu`
chooses: the first time it sees a shape (T rounded up to a power of two, K, N, dtype, device)
it times each Triton config and the unfused path (cuBLAS + a SiLU/split pass writing the same
layout) and keeps the fastest; it is thus never slower than the unfused path by more than
timing noise. ``HSTU_PROJECTION_AUTOTUNE=0`` (or a CUDA graph capture in progress) skips the
timing and takes :func:`default_choice`; ``HSTU_FUSED_PROJECTION=0`` always takes the unfused
path. Without CUDA the same math runs as torch ops.

``python -m hstu_kernels.backends.triton.projection`` prints the time of every candidate on the GPU.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from hstu_kernels import settings
from hstu_kernels.backends.triton.launcher import (
    FixedLaunch,
    LaunchCache,
    cannot_compile,
    cdiv,
    next_power_of_2,
)
from hstu_kernels.backends.triton.timing import eager_ms
from hstu_kernels.reference.layer import SLOTS, check_projection
from hstu_kernels.reference.layer import project_silu as reference_project_silu
from hstu_kernels.tuning import TuningCache

if TYPE_CHECKING:
    from hstu_kernels.types import CacheAppend

__all__ = [
    "CHOICES",
    "CONFIGS",
    "TMA_CONFIGS",
    "UNFUSED",
    "GemmConfig",
    "TmaConfig",
    "default_choice",
    "fused_project",
    "project_silu",
    "silu_gemm",
    "silu_gemm_tma",
    "silu_split",
    "tma_unsupported",
    "reset",
    "tensor_descriptor_class",
    "unfused_project_silu",
]

SPLIT_ROWS = 4  # rows per program of the SiLU/split pass


@dataclass(frozen=True)
class GemmConfig:
    """One tile config of :func:`silu_gemm` (Hopper: wgmma wants 4 or 8 warps, BLOCK_M 64k)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int  # row tiles per group: consecutive programs share W's column tiles in L2
    num_stages: int
    num_warps: int

    def fits(self, inner: int) -> bool:
        """A column tile must lie inside one of the four column groups."""
        return inner % self.block_n == 0

    def __str__(self) -> str:
        return (
            f"M{self.block_m}-N{self.block_n}-K{self.block_k}-G{self.group_m}"
            f"-s{self.num_stages}-w{self.num_warps}"
        )


CONFIGS: tuple[GemmConfig, ...] = (
    GemmConfig(128, 256, 64, 8, 3, 8),  # large T: two warpgroups of 64x256 wgmma
    GemmConfig(128, 128, 64, 8, 4, 8),
    GemmConfig(128, 128, 64, 8, 4, 4),
    GemmConfig(64, 128, 64, 8, 4, 4),  # small T: more programs for 132 SMs
    GemmConfig(64, 64, 64, 8, 4, 4),
)


@dataclass(frozen=True)
class TmaConfig(GemmConfig):
    """One tile config of :func:`silu_gemm_tma`, the persistent TMA kernel. Its epilogue
    stores the tile as two ``BLOCK_M x BLOCK_N / 2`` halves (less shared memory for the
    store buffer, and the second half's SiLU overlaps the first half's store)."""

    flatten: bool = True  # tl.range(flatten=...): one software pipeline across tiles and K

    def __str__(self) -> str:
        return f"TMA-{super().__str__()}" + ("" if self.flatten else "-noflat")


TMA_CONFIGS: tuple[TmaConfig, ...] = (
    TmaConfig(128, 256, 64, 8, 3, 8),  # 3 x 48 KiB of operands + a 32 KiB store half
    TmaConfig(128, 128, 64, 8, 4, 8),
    TmaConfig(128, 256, 64, 8, 4, 8),  # 224 KiB of shared memory (H100: 227); skipped if over
    TmaConfig(128, 256, 64, 8, 3, 8, flatten=False),  # in case flattening pipelines worse
)
UNFUSED = "unfused"  # the cuBLAS GEMM + SiLU/split pass
Choice = GemmConfig | str  # a TmaConfig is a GemmConfig

_KERNELS: dict | None = None
# Launches by shape: skips Triton's per-call argument binding (tens of µs at these ~20 args).
_LAUNCHES = LaunchCache()


def encode_choice(choice: object) -> dict:
    """A projection choice (a config, :data:`UNFUSED`, or fusion's ``"separate"``) as JSON."""
    if isinstance(choice, str):
        return {"name": choice}
    kind = "tma" if isinstance(choice, TmaConfig) else "gemm"
    return {"kind": kind, **dataclasses.asdict(choice)}


def decode_choice(data: dict) -> object:
    """:func:`encode_choice` undone (a ValueError/TypeError for data it did not write)."""
    if "name" in data:
        if data["name"] not in (UNFUSED, "separate"):
            raise ValueError(f"unknown choice {data['name']!r}")
        return data["name"]
    fields = dict(data)
    kind = fields.pop("kind")
    return (TmaConfig if kind == "tma" else GemmConfig)(**fields)


# shape key -> the winner of its timing, per card (kept on disk: a later process skips timing)
CHOICES = TuningCache("projection", encode=encode_choice, decode=decode_choice)
_BROKEN: list[str] = []  # why Triton was switched off for the projection in this process
_TMA_BROKEN: list[str] = []  # why the TMA kernel alone was switched off


def reset() -> None:
    """Switch the projection's Triton kernels (and its TMA kernel) back on after a failure
    switched them off, and decorate them again on next use (which picks up a change of
    ``TRITON_INTERPRET``); the tuned choices stay."""
    global _KERNELS
    _BROKEN.clear()
    _TMA_BROKEN.clear()
    _KERNELS = None
    _LAUNCHES.clear()
    _WEIGHT_DESCRIPTORS.clear()


def _kernels() -> dict:
    """The Triton kernels (imported, and compiled, on first use; re-imported after a reset so
    that a change of ``TRITON_INTERPRET`` takes effect)."""
    global _KERNELS
    if _KERNELS is None:
        import importlib
        import sys

        name = "hstu_kernels.backends.triton.projection_kernels"
        reset = name in sys.modules  # imported before: decorate again (interpreter switch)
        kernels = importlib.import_module(name)
        if reset:
            kernels = importlib.reload(kernels)
        _LAUNCHES.clear()
        _KERNELS = {
            "silu_gemm": kernels.silu_gemm_kernel,
            "silu_gemm_tma": kernels.silu_gemm_tma_kernel,
            "silu_split": kernels.silu_split_kernel,
        }
    return _KERNELS


def _empty_out(h: torch.Tensor, inner: int) -> torch.Tensor:
    return torch.empty((SLOTS, h.shape[0], inner), dtype=h.dtype, device=h.device)


def _checked_out(
    h: torch.Tensor, weight: torch.Tensor, config: GemmConfig, out: torch.Tensor | None
) -> tuple[int, torch.Tensor]:
    """``inner`` and the ``[4, T, inner]`` output (``out``, or a new one) of a fused launch;
    raises ValueError if the config's column tile or ``out`` does not fit."""
    inner = check_projection(h, weight)
    if not config.fits(inner):
        raise ValueError(f"config {config}: BLOCK_N does not divide inner={inner}")
    out = _empty_out(h, inner) if out is None else out
    if out.shape != (SLOTS, h.shape[0], inner) or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous {(SLOTS, h.shape[0], inner)}")
    return inner, out


def silu_gemm(
    h: torch.Tensor,
    weight: torch.Tensor,
    config: GemmConfig,
    *,
    out: torch.Tensor | None = None,
    append: CacheAppend | None = None,
) -> torch.Tensor:
    """The fused Triton kernel: ``SiLU(h @ weight)`` as ``[4, T, inner]``, with the given tile
    config (``config.block_n`` must divide ``inner``). Writes into ``out`` if given.

    ``append`` (a :class:`~hstu_kernels.types.CacheAppend`): the ``k`` and ``v``
    slots' new history rows are also written into the paged cache, as ``append_kv`` would.
    """
    inner, out = _checked_out(h, weight, config, out)
    tokens, k = h.shape
    if tokens == 0:
        return out
    h, weight = h.contiguous(), weight.contiguous()  # the kernel assumes unit column strides
    cache_args, page_size, steps = _append_args(append, inner, h)
    kernel = _kernels()["silu_gemm"]
    fast = _fast_silu(h)
    key = (kernel, tokens, k, inner, h.dtype, weight.dtype, out.dtype, h.device, config, fast,
           _append_key(cache_args, page_size, steps))  # fmt: skip

    def make() -> FixedLaunch:
        grid = (cdiv(tokens, config.block_m) * (SLOTS * inner // config.block_n),)
        return FixedLaunch(
            kernel, grid, (None, None, None, tokens, k, inner, *_append_fixed(cache_args)),
            _GEMM_SLOTS,
            dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                 GROUP_M=config.group_m, EVEN_K=k % config.block_k == 0, FAST_SILU=fast,
                 APPEND=append is not None, PAGE_SIZE=page_size, SEARCH_STEPS=steps),
            num_stages=config.num_stages, num_warps=config.num_warps,
        )  # fmt: skip

    _LAUNCHES.keyed(key, make, h, weight, out, *cache_args[:6])
    return out


# The GEMM kernels' per-call arguments: h (or its descriptor), weight, out, then the cache
# append's six tensors (kv_cache, cu_seqlens, num_targets and the page table's three).
_GEMM_SLOTS = (0, 1, 2, 6, 7, 8, 9, 10, 11)


def _append_key(cache_args: tuple, page_size: int, steps: int) -> tuple:
    """What the cache arguments fix in a launch: the dtypes of their tensors and the scalars
    (batch and the pool's strides)."""
    return (*(t.dtype for t in cache_args[:6]), *cache_args[6:], page_size, steps)


def _append_fixed(cache_args: tuple) -> tuple:
    """The cache arguments of a FixedLaunch: its tensors are slots (None here)."""
    return (None,) * 6 + tuple(cache_args[6:])


def _append_args(append: CacheAppend | None, inner: int, h: torch.Tensor) -> tuple:
    """The kernels' cache arguments, ``PAGE_SIZE`` and ``SEARCH_STEPS`` for ``append`` (checked
    against ``h``), or placeholders where there is nothing to append."""
    if append is None:
        return (h, h, h, h, h, h, 0, 0, 0, 0), 16, 1
    append.check(inner, h)
    kv, t = append.kv_cache, append.page_table
    cache_args = (
        kv, append.cu_seqlens, append.num_targets, t.page_ids, t.page_indptr,
        t.last_page_len, append.batch, kv.stride(0), kv.stride(1), kv.stride(2),
    )  # fmt: skip
    return cache_args, kv.shape[2], max(1, append.batch.bit_length())


def tensor_descriptor_class():
    """``triton.tools.tensor_descriptor.TensorDescriptor`` (triton >= 3.4), or None."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    return TensorDescriptor


def _fast_silu(h: torch.Tensor) -> bool:
    """The tanh.approx SiLU (inline PTX; absolute error <= |x| * 2^-12) on a GPU; the exact
    one in the interpreter, and with ``HSTU_PROJECTION_FAST_SILU=0``."""
    return h.device.type == "cuda" and settings.get().projection_fast_silu


def _interpreting() -> bool:
    return settings.get().triton_interpret


def _num_sms(device: torch.device) -> int:
    """Programs of the persistent kernel: one per SM (3 off CUDA, so that the interpreter's
    programs each loop over several tiles)."""
    if device.type != "cuda":
        return 3
    index = device.index if device.index is not None else torch.cuda.current_device()
    found = _SMS.get(index)
    if found is None:
        found = _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return found


_SMS: dict[int, int] = {}


def tma_unsupported(h: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why :func:`silu_gemm_tma` cannot run on ``h [T, K]`` and ``weight [K, 4 * inner]``
    (contiguous), or None if it can: TMA wants a Hopper or later GPU (or the interpreter),
    base pointers on 16 bytes and row strides that are multiples of 16 bytes."""
    if _TMA_BROKEN:
        return f"switched off earlier ({_TMA_BROKEN[0]})"
    if tensor_descriptor_class() is None:
        return "triton has no triton.tools.tensor_descriptor (needs triton >= 3.4)"
    if h.device.type == "cuda":
        if torch.cuda.get_device_capability(h.device)[0] < 9:
            return "TMA needs compute capability 9.0 or later"
    elif not _interpreting():
        return "not a CUDA tensor"
    item = h.element_size()
    inner = weight.shape[1] // SLOTS
    for name, t in (("h", h), ("weight", weight)):
        if t.data_ptr() % 16:
            return f"{name}: base pointer not 16-byte aligned"
        if t.stride(1) != 1:
            return f"{name}: column stride is not 1"
    # h's and W's row strides (K, 4 * inner elements); the output's slot/row strides
    for what, elems in (("K", h.stride(0)), ("4 * inner", weight.stride(0)), ("inner", inner)):
        if elems * item % 16:
            return f"{what} = {elems} elements is not a multiple of 16 bytes"
    return None


def silu_gemm_tma(
    h: torch.Tensor,
    weight: torch.Tensor,
    config: TmaConfig,
    *,
    out: torch.Tensor | None = None,
    append: CacheAppend | None = None,
) -> torch.Tensor:
    """The persistent TMA kernel: ``SiLU(h @ weight)`` as ``[4, T, inner]``, like
    :func:`silu_gemm` (same contract, ``append`` included), with one program per SM. Raises
    ValueError where :func:`tma_unsupported` says it cannot run."""
    inner, out = _checked_out(h, weight, config, out)
    tokens, k = h.shape
    if tokens == 0:
        return out  # a descriptor's dimensions must be positive
    h, weight = h.contiguous(), weight.contiguous()
    why = tma_unsupported(h, weight) or (
        "out: base pointer not 16-byte aligned" if out.data_ptr() % 16 else None
    )
    if why:
        raise ValueError(f"silu_gemm_tma: {why}")
    cache_args, page_size, steps = _append_args(append, inner, h)
    descriptor = tensor_descriptor_class()
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    h_desc = descriptor.from_tensor(h, [bm, bk])
    w_desc = _weight_descriptor(descriptor, weight, [bk, bn])
    out_desc = descriptor.from_tensor(out, [1, bm, bn // 2])
    sms = _num_sms(h.device)
    kernel = _kernels()["silu_gemm_tma"]
    fast = _fast_silu(h)
    key = (kernel, tokens, k, inner, h.dtype, weight.dtype, out.dtype, h.device, config, fast,
           sms, _append_key(cache_args, page_size, steps))  # fmt: skip

    def make() -> FixedLaunch:
        tiles = cdiv(tokens, bm) * (SLOTS * inner // bn)
        return FixedLaunch(
            kernel, (min(sms, tiles),),
            (None, None, None, tokens, k, inner, *_append_fixed(cache_args)), _GEMM_SLOTS,
            dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=config.group_m, NUM_SMS=sms,
                 FLATTEN=config.flatten, FAST_SILU=fast, APPEND=append is not None,
                 PAGE_SIZE=page_size, SEARCH_STEPS=steps),
            num_stages=config.num_stages, num_warps=config.num_warps,
        )  # fmt: skip

    _LAUNCHES.keyed(key, make, h_desc, w_desc, out_desc, *cache_args[:6])
    return out


# weight (base, shape, strides, block) -> its descriptor: the model's weights are the same
# tensors call after call (a descriptor holds its tensor, so a key is never reused by another)
_WEIGHT_DESCRIPTORS: dict[tuple, object] = {}


def _weight_descriptor(descriptor, weight: torch.Tensor, block: list[int]):
    key = (weight.data_ptr(), weight.shape, weight.stride(), weight.dtype, *block)
    found = _WEIGHT_DESCRIPTORS.get(key)
    if found is None:
        if len(_WEIGHT_DESCRIPTORS) >= 64:
            _WEIGHT_DESCRIPTORS.clear()
        found = _WEIGHT_DESCRIPTORS[key] = descriptor.from_tensor(weight, block)
    return found


def silu_split(uvqk: torch.Tensor, inner: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The SiLU/split pass (Triton): SiLU of ``uvqk [rows, 4 * inner]`` (unit column stride,
    any row stride) as a contiguous ``[4, rows, inner]``. Writes into ``out`` if given."""
    rows = uvqk.shape[0]
    if uvqk.dim() != 2 or uvqk.shape[1] != SLOTS * inner or uvqk.stride(1) != 1:
        raise ValueError(f"uvqk: expected [rows, {SLOTS * inner}] with unit column stride")
    out = _empty_out(uvqk, inner) if out is None else out
    if rows:
        block = next_power_of_2(inner)
        warps = min(16, max(4, SPLIT_ROWS * block // 512))
        _LAUNCHES(
            _kernels()["silu_split"], (cdiv(rows, SPLIT_ROWS), SLOTS),
            (uvqk, out, rows, inner, uvqk.stride(0)), dict(ROWS=SPLIT_ROWS, BLOCK=block),
            num_warps=warps,
        )  # fmt: skip
    return out


def unfused_project_silu(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The unfused path: a cuBLAS GEMM, then the SiLU/split pass (torch ops if it fails)."""
    inner = check_projection(h, weight)
    uvqk = torch.mm(h, weight)
    if _BROKEN:
        return F.silu(uvqk).view(h.shape[0], SLOTS, inner).transpose(0, 1).contiguous()
    try:
        return silu_split(uvqk, inner)
    except Exception as exc:
        if _capturing(h) or not cannot_compile(exc):
            raise
        _disable_triton(exc)
        return F.silu(uvqk).view(h.shape[0], SLOTS, inner).transpose(0, 1).contiguous()


def _capturing(h: torch.Tensor) -> bool:
    """Whether a CUDA graph capture is in progress on ``h``'s device (a failure then must
    surface: a fallback would be captured half-done). Asked only of CUDA tensors: a CUDA
    build of torch without a usable driver raises on the question."""
    return h.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _disable_triton(exc: Exception) -> None:
    """Say once why Triton cannot run the projection here, and stop trying."""
    _BROKEN.append(f"{type(exc).__name__}: {exc}")
    warnings.warn(
        f"hstu_kernels.backends.triton.projection: Triton kernels disabled ({_BROKEN[0]}); "
        "using cuBLAS + torch ops",
        RuntimeWarning,
        stacklevel=4,
    )


def _triton_ok(h: torch.Tensor) -> bool:
    """Whether the Triton kernels may run on ``h`` (tests patch this to use the interpreter).
    Not inside ``torch.compile``: the compiler generates the GEMM and SiLU itself, and the
    cache append then goes through the registered op, whose mutation the compiler orders."""
    if _BROKEN or torch.compiler.is_compiling():
        return False
    return h.device.type == "cuda" or settings.get().triton_interpret


def _fused_ok(h: torch.Tensor) -> bool:
    # fp32 stays on cuBLAS: tl.dot would round its inputs to TF32
    return h.dtype in (torch.bfloat16, torch.float16) and settings.get().fused_projection


def default_choice(inner: int) -> Choice:
    """The choice without timing: the first config of :data:`CONFIGS` that fits ``inner``
    (the fused kernel removes a memory round trip), else the unfused path."""
    return next((c for c in CONFIGS if c.fits(inner)), UNFUSED)


def _shape_key(h: torch.Tensor, weight: torch.Tensor) -> tuple:
    """``(T rounded up to a power of two, K, N, dtype)``; the card is the cache's own key."""
    tokens = max(1, h.shape[0])
    bucket = 1 << (tokens - 1).bit_length()  # next power of two
    return (bucket, h.shape[1], weight.shape[1], str(h.dtype))


def _close_enough(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """A guard against a miscompiled config winning the race, not a precision test: the
    fused output rounds once, the unfused one twice, so they differ by an ulp or two."""
    scale = max(1.0, ref.float().abs().max().item())
    return bool(torch.isclose(out.float(), ref.float(), rtol=0.03, atol=0.03 * scale).all())


def _candidates(h: torch.Tensor, weight: torch.Tensor) -> list[GemmConfig]:
    """The fused configs worth timing for this shape: those that fit ``inner``, the TMA ones
    only where :func:`tma_unsupported` finds nothing against them."""
    inner = weight.shape[1] // SLOTS
    tma = TMA_CONFIGS if tma_unsupported(h.contiguous(), weight.contiguous()) is None else ()
    return [c for c in (*CONFIGS, *tma) if c.fits(inner)]


def fused_project(
    h: torch.Tensor,
    weight: torch.Tensor,
    config: GemmConfig,
    *,
    append: CacheAppend | None = None,
) -> torch.Tensor:
    """Run the kernel that ``config`` is for (:func:`silu_gemm_tma` for a
    :class:`TmaConfig`, else :func:`silu_gemm`), with ``append`` if given."""
    if isinstance(config, TmaConfig):
        return silu_gemm_tma(h, weight, config, append=append)
    return silu_gemm(h, weight, config, append=append)


_bench = eager_ms  # the projection's candidates are one launch each: timed eagerly


def _time_candidates(h: torch.Tensor, weight: torch.Tensor) -> dict[Choice, float]:
    """Median time (ms) of the unfused path and of every fused config that fits, compiles
    and agrees with the unfused output."""
    ref = unfused_project_silu(h, weight)
    times = {UNFUSED: _bench(lambda: unfused_project_silu(h, weight))}
    for config in _candidates(h, weight):
        try:
            ok = _close_enough(fused_project(h, weight, config), ref)
        except Exception as exc:  # does not compile here (e.g. too much shared memory): skip it
            if not (isinstance(exc, ValueError) or cannot_compile(exc)):
                raise
            continue
        if ok:
            times[config] = _bench(lambda c=config: fused_project(h, weight, c))
    return times


def _choose(h: torch.Tensor, weight: torch.Tensor) -> Choice:
    """The cached winner for this shape, timing the candidates on first use."""
    key = _shape_key(h, weight)
    choice = CHOICES.get(h.device, key)
    if choice is not None:
        return choice
    inner = weight.shape[1] // SLOTS
    if h.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return default_choice(inner)  # not cached: an eager call later may still time it
    if not settings.get().projection_autotune or h.shape[0] == 0:
        choice = default_choice(inner)
    else:
        times = _time_candidates(h, weight)
        choice = min(times, key=times.get)
    CHOICES.put(h.device, key, choice)
    return choice


def _recorded(h: torch.Tensor, weight: torch.Tensor) -> Choice:
    """The recorded (or pinned) choice for this shape, else the unfused path; never times."""
    return CHOICES.get(h.device, _shape_key(h, weight)) or UNFUSED


def _disable_tma(exc: Exception) -> None:
    """Say once why the TMA kernel failed here; the pointer kernel stays on."""
    _TMA_BROKEN.append(f"{type(exc).__name__}: {exc}")
    warnings.warn(
        f"hstu_kernels.backends.triton.projection: TMA kernel disabled ({_TMA_BROKEN[0]}); "
        "using the pointer kernel",
        RuntimeWarning,
        stacklevel=4,
    )


def _project_tma(h: torch.Tensor, weight: torch.Tensor, config: TmaConfig) -> torch.Tensor:
    """The TMA kernel where it can run; else (a tensor of the same shape bucket that is not
    aligned, or a failure) the default pointer config, so the layer never stops on TMA."""
    if tma_unsupported(h.contiguous(), weight.contiguous()) is None:
        try:
            return silu_gemm_tma(h, weight, config)
        except Exception as exc:
            if _capturing(h) or not cannot_compile(exc):
                raise
            _disable_tma(exc)
            CHOICES.put(h.device, _shape_key(h, weight), default_choice(weight.shape[1] // SLOTS),
                         persist=False)  # fmt: skip
    fallback = default_choice(weight.shape[1] // SLOTS)
    if fallback == UNFUSED:
        return unfused_project_silu(h, weight)
    return silu_gemm(h, weight, fallback)


def project_silu(
    h: torch.Tensor, weight: torch.Tensor, *, choice: Choice | None = None
) -> torch.Tensor:
    """``SiLU(h @ weight)`` for ``h [T, K]`` and ``weight [K, 4 * inner]`` (columns
    ``u | v | q | k``), returned as one contiguous ``[4, T, inner]`` tensor (slot 0 is
    ``SiLU(u)``, then ``v``, ``q``, ``k``) in ``h``'s dtype.

    On CUDA in bf16/fp16 it runs the fastest of the fused Triton configs (pointer and TMA
    kernels) and the unfused path for this shape (timed once per shape, see the module
    docstring); ``choice`` (a :class:`GemmConfig`, a :class:`TmaConfig` or :data:`UNFUSED`)
    forces one. Elsewhere it runs torch ops.
    """
    inner = check_projection(h, weight)
    if not _triton_ok(h):
        return reference_project_silu(h, weight)
    if choice is None:
        # fp32 is never timed (it stays on cuBLAS) but obeys a pinned choice
        choice = _choose(h, weight) if _fused_ok(h) else _recorded(h, weight)
    if choice == UNFUSED or not choice.fits(inner):
        return unfused_project_silu(h, weight)
    try:
        if isinstance(choice, TmaConfig):
            return _project_tma(h, weight, choice)
        return silu_gemm(h, weight, choice)
    except Exception as exc:
        if _capturing(h) or not cannot_compile(exc):
            raise
        _disable_triton(exc)
        CHOICES.put(h.device, _shape_key(h, weight), UNFUSED, persist=False)
        return unfused_project_silu(h, weight)


def _main() -> None:
    """Print the median time of every candidate at the profiled shapes (needs a GPU)."""
    k, inner, dtype = 1024, 1024, torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(k, SLOTS * inner, device="cuda", generator=gen).div(k**0.5).to(dtype)
    print(f"{torch.cuda.get_device_name()}: K={k}, inner={inner}, {dtype}; median us (TFLOP/s)")
    for tokens in (384, 3072, 34816):
        h = torch.randn(tokens, k, device="cuda", generator=gen).to(dtype)
        flop = 2.0 * tokens * k * SLOTS * inner
        times = _time_candidates(h, weight)
        mm = _bench(lambda h=h: torch.mm(h, weight))
        print(f"T={tokens}: cuBLAS mm alone {mm * 1e3:.1f} ({flop / mm / 1e9:.0f})")
        for choice, ms in sorted(times.items(), key=lambda kv: kv[1]):
            print(f"  {choice!s:36s} {ms * 1e3:8.1f} ({flop / ms / 1e9:4.0f})")
        why_no_tma = tma_unsupported(h, weight)
        if why_no_tma:
            print(f"  TMA kernel not timed: {why_no_tma}")
        tried = _candidates(h, weight)
        missing = [str(c) for c in tried if c not in times]
        if missing:
            print(f"  skipped (no compile or wrong result): {', '.join(missing)}")
        for config in tried:  # why a candidate was skipped, from a direct call
            if config not in times:
                try:
                    fused_project(h, weight, config)
                except Exception as exc:
                    print(f"    {config}: {type(exc).__name__}: {str(exc)[:300]}")
        print(f"  project_silu would pick: {min(times, key=times.get)}")


if __name__ == "__main__":
    _main()
