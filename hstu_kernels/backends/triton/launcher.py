"""Launch a Triton kernel whose grid, scalars and compile-time constants are fixed, with a few
µs of host time.

``kernel[grid](...)`` binds every argument, recomputes the specialisation key and looks the
compiled kernel up on every call: tens of µs for the attention kernel's ~40 arguments, more than
the GPU needs at small batches. A :class:`FixedLaunch` does that once (its first call goes
through ``kernel[grid]``, which compiles or loads the kernel) and afterwards hands the arguments
straight to the compiled kernel's launcher. What stays per call: the tensors in its *slots*,
checked to keep the 16-byte alignment the kernel was specialised for (a tensor that lost it is
launched the slow way, which compiles a variant for it); a slot may also hold a TMA tensor
descriptor, whose specialisation (its block shape) the plan fixes.

Every other argument (ints, floats, tensors that do not change) is part of the launch and must
not change: Triton specialises on their values (an int of 1, divisibility by 16).

Plans are made per batch, so a new :class:`FixedLaunch` of a kernel already compiled is
common: its first call finds the compiled kernel in a process-wide table keyed by what Triton
specialises on (:func:`specialisation`, at least as fine as Triton's own key), not through
``kernel[grid]``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "FixedLaunch",
    "LaunchCache",
    "cannot_compile",
    "cdiv",
    "next_power_of_2",
    "reset_compiled",
    "specialisation",
    "COMPILED",
]


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids (plain ints: newer Tritons make ``triton.cdiv`` a
    constexpr function, a few µs per host call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 << max(n - 1, 0).bit_length()


def cannot_compile(exc: BaseException) -> bool:
    """Whether ``exc`` says that a Triton kernel cannot be built for this device: a compile
    error, more shared memory or registers than the card has, a ptxas failure, or a Triton
    without a feature the kernel needs. Only then may a caller fall back to another path (or
    skip a tuning candidate); an out-of-memory error, a bad argument or a CUDA fault is not
    that, and propagates."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    if isinstance(exc, ImportError):
        return True
    try:
        from triton.compiler.errors import TritonError as CompileTimeError
        from triton.runtime.errors import TritonError as RunTimeError
    except ImportError:
        return False
    return isinstance(exc, (CompileTimeError, RunTimeError))


def _raw_stream_getter():
    getter = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if getter is not None:
        return getter
    return lambda index: torch.cuda.current_stream(index).cuda_stream


class FixedLaunch:
    """One launch of ``kernel`` over ``grid`` with ``args`` (its runtime parameters in order),
    of which the positions ``slots`` are filled per call; ``constexprs`` and ``options``
    (``num_warps``, ``num_stages``) as ``kernel[grid]`` takes them.

    ``launch(*tensors)`` fills the slots in order and launches on the current stream.

    Once compiled, a call is one generated function (:func:`_direct_call`): it reads the
    slots' addresses, checks the alignment the kernel was specialised for, and calls the
    compiled launcher with every argument in place. Tensors reach the launcher as addresses
    (the fixed ones read once, and kept referenced here): Triton's launcher takes an int for a
    pointer and then skips the ``data_ptr()`` call and the driver's pointer query it makes for
    a tensor. So the call checks that the slots' tensors are on the launch's device, unless
    the caller says it has (``devices_checked=True``: a plan's run checks them first).
    """

    __slots__ = (
        "_args",
        "_call",
        "_compiled",
        "_constexprs",
        "_devices_checked",
        "_grid",
        "_kernel",
        "_options",
        "_slots",
    )

    def __init__(
        self,
        kernel: Any,
        grid: tuple[int, ...],
        args: Sequence[Any],
        slots: Sequence[int],
        constexprs: dict[str, Any],
        *,
        devices_checked: bool = False,
        **options: Any,
    ) -> None:
        self._kernel = kernel
        self._devices_checked = devices_checked
        self._grid = tuple(grid) + (1,) * (3 - len(grid))
        self._args = list(args)
        self._slots = tuple(slots)
        self._constexprs = constexprs
        self._options = options
        self._compiled = None
        self._call: Callable[..., None] = self._first

    def __call__(self, *tensors: Any) -> None:
        self._call(*tensors)

    def _first(self, *tensors: Any) -> None:
        """A call before the direct launch exists, or one it cannot take (an unaligned
        tensor): through :meth:`_slow`."""
        args = self._args.copy()
        for i, t in zip(self._slots, tensors, strict=True):
            args[i] = t
        self._slow(args, tensors)

    def _slow(self, args: list[Any], tensors: Sequence[Any]) -> None:
        """Through ``kernel[grid]`` (or a kernel compiled for another launch with the same
        specialisation); the first time, keep what the direct launch needs."""
        key = None
        if self._compiled is None and tensors and _device_of(tensors[0]).type == "cuda":
            key = specialisation(self._kernel, args, self._constexprs, self._options)
            found = COMPILED.get(key) if key is not None else None
            if found is not None and _direct_launch_possible(found[0], tensors):
                self._adopt(found[0], found[1], tensors)
                self(*tensors)
                return
        compiled = self._kernel[self._grid](*args, **self._constexprs, **self._options)
        if self._compiled is not None or not _direct_launch_possible(compiled, tensors):
            return
        names = list(self._kernel.arg_names)
        rest = names[len(args) :]
        if set(rest) != set(self._constexprs):
            return  # constexprs not all trailing: stay on the slow path
        tail = [self._constexprs[n] for n in rest]
        self._adopt(compiled, tail, tensors)
        if key is not None:
            if len(COMPILED) >= COMPILED_LIMIT:
                COMPILED.clear()
            COMPILED[key] = (compiled, tail)

    def _adopt(self, compiled: Any, tail: list[Any], tensors: Sequence[Any]) -> None:
        # a tensor descriptor (TMA) is specialised by its block, not its base: no check
        kinds = tuple(
            _DESCRIPTOR if not isinstance(t, torch.Tensor)
            else (_ALIGNED if t.data_ptr() % 16 == 0 else _UNALIGNED)
            for t in tensors
        )  # fmt: skip
        fixed = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in self._args]
        raw = _raw_launch(compiled)
        if raw is not None:
            launch, head = raw
        else:
            launch = compiled.run
            head = (compiled.function, compiled.packed_metadata, None, None, None)
        device = _device_of(tensors[0]).index
        self._call = _direct_call(launch, self._grid, _raw_stream_getter(), device, head,
                                  fixed + tail, self._slots, kinds, self._first,
                                  not self._devices_checked)  # fmt: skip
        self._compiled = compiled


def _direct_call(
    launch: Callable[..., Any],
    grid: tuple[int, int, int],
    stream: Callable[[int], int],
    device: int,
    head: Sequence[Any],
    args: Sequence[Any],
    slots: Sequence[int],
    kinds: Sequence[int],
    fallback: Callable[..., None],
    check_devices: bool = True,
) -> Callable[..., None]:
    """A function of the slots' tensors that calls ``launch(*grid, stream(device), *head,
    *args)`` with the slots of ``args`` filled: a tensor as its address, a descriptor as it
    is; a tensor on another device (if ``check_devices``), or one that lost the 16-byte
    alignment of its slot, goes to ``fallback``. Generated
    code (a loop over the arguments costs several µs per launch), one factory per argument
    layout: a new launch of a known layout costs one call, not a compile."""
    layout = (len(head), len(args), tuple(slots), tuple(kinds), check_devices)
    factory = _FACTORIES.get(layout)
    if factory is None:
        factory = _FACTORIES[layout] = _make_factory(*layout)
    return factory(launch, stream, fallback, *grid, device, *head, *args)


def _make_factory(
    n_head: int, n_args: int, slots: tuple[int, ...], kinds: tuple[int, ...], check_devices: bool
) -> Callable[..., Callable[..., None]]:
    names = [f"t{j}" for j in range(len(slots))]
    heads = [f"h{j}" for j in range(n_head)]
    fixed = [f"a{i}" for i in range(n_args)]
    filled = list(fixed)
    body, aligned, tensors = [], [], []
    for j, (i, kind) in enumerate(zip(slots, kinds, strict=True)):
        if kind == _DESCRIPTOR:
            filled[i] = names[j]
            continue
        tensors.append(names[j])
        body.append(f"        p{j} = t{j}.data_ptr()")
        filled[i] = f"p{j}"
        if kind == _ALIGNED:
            aligned.append(f"p{j}")
    # An address skips the launcher's own check that a pointer is on the device, so a tensor
    # elsewhere (a CPU weight, say) goes the slow way, where Triton names it.
    checks = [f"{t}.get_device() != dev" for t in tensors] if check_devices else []
    if aligned:
        checks.append(f"({' | '.join(aligned)}) & 15")
    if checks:
        body.append(f"        if {' or '.join(checks)}:")
        body.append(f"            return fallback({', '.join(names)})")
    body.append(f"        launch(g0, g1, g2, stream(dev), {', '.join(heads + filled)})")
    params = ", ".join(["launch", "stream", "fallback", "g0", "g1", "g2", "dev", *heads, *fixed])
    source = "\n".join([f"def factory({params}):", f"    def call({', '.join(names)}):",
                        *body, "    return call"])  # fmt: skip
    env: dict[str, Any] = {}
    exec(source, env)  # the source is built here from ints and fixed names
    return env["factory"]


# Generated launch factories, by argument layout (a handful per process).
_FACTORIES: dict[tuple, Callable[..., Callable[..., None]]] = {}


_DESCRIPTOR, _ALIGNED, _UNALIGNED = 0, 1, 2


def _raw_launch(compiled: Any) -> tuple[Any, tuple[Any, ...]] | None:
    """Triton 3.6's compiled launcher (a C function) and the arguments it takes between the
    stream and the kernel's own, where calling it directly is what ``compiled.run`` would do:
    no scratch memory to allocate, no tensor descriptor to encode (those need Triton's Python
    wrapper). ``None`` otherwise (another Triton version: ``compiled.run`` is called)."""
    run = compiled.run
    launch = getattr(run, "launch", None)
    if (
        type(run).__name__ != "CudaLauncher"
        or type(launch).__name__ != "builtin_function_or_method"
    ):
        return None
    try:
        params = list(inspect.signature(type(run).__call__).parameters)
    except (TypeError, ValueError):
        return None
    if params != ["self", "gridX", "gridY", "gridZ", "stream", "function", "args"]:
        return None
    if getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1):
        return None
    head = (compiled.function, run.launch_cooperative_grid, run.launch_pdl, None, None,
            compiled.packed_metadata, None, None, None)  # fmt: skip
    return launch, head


# Compiled kernels by specialisation, shared by every FixedLaunch of the process.
COMPILED: dict[tuple, tuple[Any, list[Any]]] = {}
COMPILED_LIMIT = 512


def reset_compiled() -> None:
    """Forget the compiled kernels shared between launches (they are found again through
    ``kernel[grid]``, from Triton's caches)."""
    COMPILED.clear()


def _arg_specialisation(a: Any) -> Any:
    cls = a.__class__
    if a is None or cls is bool:  # constants
        return (cls, a)
    if cls is float:
        return cls
    if cls is int:
        # Triton: the value 1 becomes a constant, a multiple of 16 is marked divisible, the
        # range picks i32/i64/u64.
        width = 0 if -(2**31) <= a < 2**31 else (1 if a < 2**63 else 2)
        return (int, a == 1, a % 16 == 0, width)
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.device, a.data_ptr() % 16 == 0)
    base = getattr(a, "base", None)
    described = all(hasattr(a, n) for n in ("block_shape", "shape", "strides"))
    if isinstance(base, torch.Tensor) and described:  # a TMA descriptor
        return (
            base.dtype, base.device, base.data_ptr() % 16 == 0, tuple(a.block_shape),
            tuple(a.shape), tuple(a.strides), getattr(a, "padding", None),
        )  # fmt: skip
    return None  # unknown: not shared


def specialisation(
    kernel: Any, args: Sequence[Any], constexprs: dict[str, Any], options: dict[str, Any]
) -> tuple | None:
    """A key at least as fine as the one Triton compiles by, or None if an argument's kind
    is not known here (the launch then compiles, or finds its kernel, through Triton)."""
    parts = []
    for a in args:
        spec = _arg_specialisation(a)
        if spec is None:
            return None
        parts.append(spec)
    key = (kernel, tuple(parts), tuple(constexprs.items()), tuple(options.items()))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _device_of(slot: Any) -> torch.device:
    """The device of a per-call argument: a tensor's, or a TMA descriptor's base tensor's."""
    return slot.device if isinstance(slot, torch.Tensor) else slot.base.device


_SCALARS = frozenset({int, float, bool, type(None)})


def _slot_key(arg: Any) -> Any:
    """What a launch is specialised on for a per-call argument: a tensor's dtype and device,
    a TMA descriptor's dtype and block shape (alignment is :class:`FixedLaunch`'s check)."""
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.device)
    base = arg.base
    return (base.dtype, base.device, tuple(arg.block_shape))


class LaunchCache:
    """:class:`FixedLaunch` es of one kernel family, found by everything a launch fixes, for
    call sites that launch with ever-new tensors but few distinct shapes (the model's row and
    projection kernels): ``cache(kernel, grid, args, constexprs, **options)`` launches like
    ``kernel[grid](*args, **constexprs, **options)``. Tensors and TMA descriptors in ``args``
    are the per-call slots; every other argument is part of the key. At most ``limit``
    launches are kept (then the cache starts over)."""

    __slots__ = ("_launches", "_limit")

    def __init__(self, limit: int = 256) -> None:
        self._launches: dict[tuple, FixedLaunch] = {}
        self._limit = limit

    def __call__(
        self,
        kernel: Any,
        grid: tuple[int, ...],
        args: Sequence[Any],
        constexprs: dict[str, Any],
        **options: Any,
    ) -> None:
        fixed = list(args)
        slots, key_args = [], []
        for i, a in enumerate(args):
            if a.__class__ in _SCALARS:
                key_args.append(a)
            else:  # a tensor or a TMA descriptor
                slots.append(i)
                fixed[i] = None
                key_args.append(_slot_key(a))
        key = (kernel, tuple(grid), tuple(key_args), tuple(constexprs.items()),
               tuple(options.items()))  # fmt: skip
        launch = self._launches.get(key)
        if launch is None:
            if len(self._launches) >= self._limit:
                self._launches.clear()
            launch = FixedLaunch(kernel, grid, fixed, slots, constexprs, **options)
            self._launches[key] = launch
        launch(*(args[i] for i in slots))

    def keyed(self, key: tuple, make: Callable[[], FixedLaunch], *slots: Any) -> None:
        """Launch the :class:`FixedLaunch` stored under ``key`` (made by ``make()`` the first
        time) with the per-call ``slots``. For hot call sites: the caller's ``key`` must hold
        everything the launch fixes (kernel, grid, scalars, constexprs, options and the
        slots' dtypes), which saves walking the arguments on every call."""
        self.get(key, make)(*slots)

    def get(self, key: tuple, make: Callable[[], FixedLaunch]) -> FixedLaunch:
        """The :class:`FixedLaunch` stored under ``key`` (see :meth:`keyed`), made by
        ``make()`` the first time: for a caller that launches it many times itself."""
        launch = self._launches.get(key)
        if launch is None:
            if len(self._launches) >= self._limit:
                self._launches.clear()
            launch = self._launches[key] = make()
        return launch

    def clear(self) -> None:
        """Forget every launch (they are remade, and recompiled from Triton's cache, on use)."""
        self._launches.clear()


def _direct_launch_possible(compiled: Any, tensors: Sequence[torch.Tensor]) -> bool:
    """Whether ``compiled`` (what ``kernel[grid](...)`` returned) can be launched directly: a
    compiled CUDA kernel (not the interpreter), no launch hooks installed (profilers read
    them on the slow path)."""
    if compiled is None or not hasattr(compiled, "packed_metadata"):
        return False
    if not tensors or _device_of(tensors[0]).type != "cuda":
        return False
    try:
        from triton import knobs

        hooks = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    except (ImportError, AttributeError):
        return False
    # a hook is None, or (triton 3.6) an empty HookChain, unless a profiler installed one
    if any(h is not None and getattr(h, "calls", True) for h in hooks):
        return False
    run = getattr(compiled, "run", None)
    return run is not None and getattr(compiled, "function", None) is not None
