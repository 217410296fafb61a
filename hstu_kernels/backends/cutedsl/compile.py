"""Compile, cache and launch CuTe DSL kernels (shared by every DSL kernel of this package).

A DSL kernel is a ``@cute.jit`` host function. Tracing and compiling it costs seconds, and
calling it un-compiled re-traces on every call, so each *variant* (arch, dtype, head dim, page
size, tile shape, mask features, ...) is compiled exactly once:

1. in-process cache: ``(name, variant)`` -> the compiled function;
2. on-disk cache: the compiled module exported as an object file (``export_to_c``) and,
   where a C compiler is found, linked into a shared library against the DSL's runtime and
   tvm-ffi. A later process loads the shared library with ``tvm_ffi.load_module`` alone --
   without importing the DSL, which takes about two seconds -- or else the object file with
   ``cutlass.runtime.load_module``. Its file name is a hash of the kernel's source files, the
   DSL version, the arch, the compile options and the variant, so a changed kernel or DSL
   never loads a stale module. Location: ``$HSTU_KERNELS_CUTEDSL_CACHE`` (default
   ``~/.cache/hstu_kernels/cutedsl``); set it to ``0``/``off`` to disable it.

Every kernel is compiled with ``--enable-tvm-ffi`` and a fake stream that takes the caller's
*environment stream* (``torch.cuda.current_stream()``): the compiled function is then called
with torch tensors and Python scalars directly, costs a few µs of host time, and works inside
``torch.cuda.graph`` capture (the launch goes to the capturing stream).

Typical use (see ``ampere.py``)::

    fn = compile_cached(
        "hstu_fwd_sm80", variant, lambda: (host_fn, (fake_tensor(...), ..., env_stream())),
        arch="sm_90a", sources=[__file__],
    )
    fn(q, k, v, ..., out)          # torch tensors + python scalars, no stream argument

Nothing here imports ``cutlass`` at module import time except through the functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from hstu_kernels import settings

__all__ = [
    "CACHE_ENV",
    "cache_dir",
    "check_tma_aligned",
    "compile_cached",
    "compile_kernel",
    "compile_stats",
    "module_sources",
    "cutlass_dtype",
    "dsl_arch",
    "dsl_available",
    "dsl_version",
    "env_stream",
    "fake_attention_args",
    "fake_tensor",
    "ptx_of",
    "refuse_mask_features",
]

CACHE_ENV = "HSTU_KERNELS_CUTEDSL_CACHE"

_LOCK = threading.Lock()
_MEMORY: dict[tuple[str, str], Callable] = {}
_FAST: dict[tuple, Callable] = {}  # (name, variant, arch, options) -> compiled, no hashing
# (name, key) -> how the function was obtained: {"source": "compile"|"disk", "seconds": float}
_STATS: dict[tuple[str, str], dict[str, Any]] = {}


@cache
def dsl_version() -> str | None:
    """The installed ``nvidia-cutlass-dsl`` version, or ``None`` when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version("nvidia-cutlass-dsl")
    except metadata.PackageNotFoundError:
        return None


@cache
def dsl_available() -> str | None:
    """``None`` when the CUTLASS DSL and tvm-ffi are installed here, else why not. Found
    without importing them: the DSL's import takes about a second, paid by the first call
    that plans one of its kernels, not by every dispatch decision."""
    import importlib.util

    for module in ("cutlass", "tvm_ffi"):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError) as exc:
            return f"CUTLASS DSL unavailable ({module}: {type(exc).__name__}: {exc})"
        if not found:
            return f"CUTLASS DSL unavailable ({module} is not installed)"
    return None


def dsl_arch(arch: str) -> str:
    """The DSL's target name for a dispatcher arch: ``sm_90`` -> ``sm_90a``, ``sm_100`` ->
    ``sm_100a``, ``sm_120`` -> ``sm_120a``, ``sm_80``/``sm_86``/``sm_89`` unchanged.

    The ``a`` targets enable the arch-specific instructions (wgmma, tcgen05); warp-MMA kernels
    compile for them too. Names already ending in ``a`` pass through.
    """
    if not arch.startswith("sm_"):
        raise ValueError(f"arch: expected 'sm_<major><minor>', got {arch!r}")
    if arch.endswith("a"):
        return arch
    cc = int(arch[3:])
    if cc in (90, 100, 101, 103, 110, 120, 121):
        return arch + "a"
    return arch


def cache_dir() -> Path | None:
    """The on-disk cache folder (``settings.cutedsl_cache``), or ``None`` when disabled
    (``$HSTU_KERNELS_CUTEDSL_CACHE=0``)."""
    return settings.get().cutedsl_cache


def cutlass_dtype(dtype: Any) -> Any:
    """The ``cutlass`` numeric type of a torch dtype (bf16, fp16, fp32, int32)."""
    import cutlass
    import torch

    table = {
        torch.bfloat16: cutlass.BFloat16,
        torch.float16: cutlass.Float16,
        torch.float32: cutlass.Float32,
        torch.int32: cutlass.Int32,
    }
    if dtype not in table:
        raise TypeError(f"dtype: no CUTLASS DSL type for {dtype}")
    return table[dtype]


def fake_tensor(dtype: Any, shape: Sequence[int | None], *, divisibility: int = 1, align: int = 16):
    """A compile-time placeholder for a compact row-major torch tensor.

    ``shape`` entries that are ``None`` are dynamic (bound at call time); the innermost
    dimension is stride 1. ``dtype`` is a torch or cutlass dtype. ``divisibility`` is promised
    for every dynamic extent (1: none). ``align`` is the promised byte alignment of the data
    pointer (16 lets the kernel use 128-bit copies; callers must check it).
    """
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_fake_compact_tensor

    if not hasattr(dtype, "width"):
        dtype = cutlass_dtype(dtype)
    dims = tuple(cute.sym_int32(divisibility=divisibility) if s is None else s for s in shape)
    order = tuple(range(len(dims) - 1, -1, -1))  # row-major: last dim fastest
    return make_fake_compact_tensor(dtype, dims, stride_order=order, assumed_align=align)


def env_stream() -> Any:
    """The fake stream argument that makes a compiled kernel launch on the caller's current
    torch stream (the tvm-ffi environment stream); the call then takes no stream argument."""
    from cutlass.runtime import make_fake_stream

    return make_fake_stream(use_tvm_ffi_env_stream=True)


def _options(arch: str, extra: str) -> str:
    return f"--enable-tvm-ffi --gpu-arch {dsl_arch(arch)} {extra}".strip()


def compile_kernel(
    host_fn: Callable, fake_args: Sequence[Any], *, arch: str, options: str = ""
) -> Any:
    """``cute.compile`` of ``host_fn`` for ``arch`` (works without a GPU), tvm-ffi enabled.

    ``options`` adds DSL compile flags, e.g. ``"--keep-ptx --dump-dir=/tmp/x"`` (see
    :func:`ptx_of`). Returns the DSL's compiled-function object (callable with torch tensors).
    """
    import cutlass.cute as cute

    return cute.compile(host_fn, *fake_args, options=_options(arch, options))


def ptx_of(host_fn: Callable, fake_args: Sequence[Any], *, arch: str) -> str:
    """The PTX that ``host_fn`` compiles to for ``arch`` (compile-only; for tests)."""
    with tempfile.TemporaryDirectory(prefix="hstu_ptx_") as tmp:
        compiled = compile_kernel(
            host_fn, fake_args, arch=arch, options=f"--keep-ptx --dump-dir={tmp}"
        )
        ptx = compiled.__ptx__
        if not ptx:
            dumped = sorted(Path(tmp).glob("*.ptx"))
            ptx = "".join(p.read_text() for p in dumped)
    return ptx


def _variant_repr(variant: Mapping[str, Any]) -> str:
    return repr(sorted((str(k), repr(v)) for k, v in variant.items()))


def _hash(
    name: str, variant: Mapping[str, Any], arch: str, options: str, sources: Sequence[str]
) -> str:
    h = hashlib.sha256()
    for part in (name, _variant_repr(variant), dsl_arch(arch), options, str(dsl_version())):
        h.update(part.encode())
        h.update(b"\0")
    for path in sorted(set(sources)):
        h.update(Path(path).read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:24]


def module_sources(*modules: str) -> list[str]:
    """The source files of ``modules`` (dotted names), found without importing them: what a
    kernel's disk-cache key hashes."""
    import importlib.util

    paths = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ValueError(f"modules: {name!r} has no source file")
        paths.append(spec.origin)
    return paths


def compile_cached(
    name: str,
    variant: Mapping[str, Any],
    build: Callable[[], tuple[Callable, Sequence[Any]]],
    *,
    arch: str,
    sources: Sequence[str] = (),
    options: str = "",
) -> Callable:
    """The compiled kernel for one variant: from memory, else from disk, else compiled now.

    Args:
        name: kernel family, a C identifier prefix (e.g. ``"hstu_fwd_sm80"``).
        variant: everything that specialises the compiled code beyond its source files
            (dtype, head dim, flags, ...; plain values, computed without the DSL).
        build: ``() -> (host_fn, fake_args)``: the ``@cute.jit`` host function (or bound
            method) and its compile-time arguments (fake tensors, scalars,
            :func:`env_stream`); called only to compile, so a disk hit never imports the DSL
            (when the cached module is a shared library, see the module docstring).
        arch: target, dispatcher or DSL spelling (``"sm_90"`` or ``"sm_90a"``).
        sources: files whose contents define the kernel (hashed into the disk-cache key).
        options: extra DSL compile flags.

    Returns:
        A callable taking torch tensors and Python scalars in ``host_fn``'s order, without the
        stream (it launches on ``torch.cuda.current_stream()``).
    """
    fast_key = (name, _variant_repr(variant), arch, options)
    fn = _FAST.get(fast_key)
    if fn is not None:  # the per-call path: no hashing, no file reads
        return fn
    key = _hash(name, variant, arch, options, sources)
    mem_key = (name, key)
    fn = _MEMORY.get(mem_key)
    if fn is not None:
        _FAST[fast_key] = fn
        return fn
    with _LOCK:
        fn = _MEMORY.get(mem_key)
        if fn is not None:
            return fn
        symbol = f"{name}_{key}"
        folder = cache_dir()
        start = time.perf_counter()
        fn, source = (None, "compile") if folder is None else _load(folder, symbol)
        if fn is None:
            host_fn, fake_args = build()
            compiled = compile_kernel(host_fn, fake_args, arch=arch, options=options)
            fn = compiled
            if folder is not None:
                # A read-only home etc.: the in-process cache still works.
                with contextlib.suppress(OSError):
                    _store(compiled, folder, symbol)
        _STATS[mem_key] = {"source": source, "seconds": time.perf_counter() - start}
        _MEMORY[mem_key] = fn
        _FAST[fast_key] = fn
        return fn


def _load(folder: Path, symbol: str) -> tuple[Callable | None, str]:
    """``(function, how)`` from the disk cache, or ``(None, "compile")`` on a miss. A shared
    library loads through tvm-ffi alone; an object file needs the DSL's loader (and is linked
    into a shared library for the next process, where a C compiler is found). A corrupt or
    foreign file counts as a miss: it is recompiled and overwritten."""
    shared, obj = folder / f"{symbol}.so", folder / f"{symbol}.o"
    if shared.exists():
        try:
            import tvm_ffi

            return getattr(tvm_ffi.load_module(str(shared)), symbol), "disk"
        except Exception:
            pass
    if obj.exists():
        try:
            from cutlass.runtime import load_module

            fn = getattr(load_module(str(obj), enable_tvm_ffi=True), symbol)
        except Exception:
            return None, "compile"
        _link_shared(obj, shared)
        return fn, "disk-object"
    return None, "compile"


def _store(compiled: Any, folder: Path, symbol: str) -> None:
    """The compiled module as ``<symbol>.o`` and, where it can be linked, ``<symbol>.so``."""
    folder.mkdir(parents=True, exist_ok=True)
    obj = folder / f"{symbol}.o"
    fd, tmp = tempfile.mkstemp(prefix=obj.name, suffix=".o", dir=folder)
    os.close(fd)
    try:
        compiled.export_to_c(tmp, function_name=symbol)
        os.replace(tmp, obj)  # atomic: a concurrent reader sees a whole file or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _link_shared(obj, folder / f"{symbol}.so")


def _link_shared(obj: Path, shared: Path) -> bool:
    """Link the exported object file into a shared library against the DSL's runtime and
    tvm-ffi (found by the DSL, recorded as rpaths), so that a later process loads it with
    ``tvm_ffi.load_module`` and never imports the DSL. Without a C compiler, or if linking
    fails, the object file stays the cache entry."""
    import shutil
    import subprocess

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return False
    try:
        from cutlass.runtime import find_runtime_libraries

        libs = [Path(p) for p in find_runtime_libraries(enable_tvm_ffi=True)]
    except Exception:
        return False
    fd, tmp = tempfile.mkstemp(prefix=shared.name, suffix=".so", dir=shared.parent)
    os.close(fd)
    rpaths = [f"-Wl,-rpath,{p.parent}" for p in libs]
    try:
        done = subprocess.run(
            [compiler, "-shared", "-o", tmp, str(obj), *map(str, libs), *rpaths],
            capture_output=True, timeout=60,
        )  # fmt: skip
        if done.returncode:
            return False
        os.replace(tmp, shared)
        return True
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def compile_stats() -> dict[str, dict[str, Any]]:
    """How each cached kernel was obtained in this process: ``{symbol: {"source": "compile" |
    "disk" | "disk-object", "seconds": ...}}`` ("disk": the shared library, without the DSL;
    "disk-object": the object file, through the DSL), for first-call and warm-load costs."""
    return {f"{n}_{k}": dict(v) for (n, k), v in _STATS.items()}


def clear_memory_cache() -> None:
    """Forget the in-process cache (the disk cache stays); for tests and measurements."""
    with _LOCK:
        _MEMORY.clear()
        _FAST.clear()
        _STATS.clear()


def check_tma_aligned(name: str, t: Any) -> None:
    """Raise ValueError unless ``t``'s data pointer is 16-byte aligned: a TMA descriptor's base
    must be, and a view with an odd offset would fault inside the kernel."""
    if t.data_ptr() % 16:
        raise ValueError(f"{name}: expected a 16-byte aligned data pointer (got a view?)")


def refuse_mask_features(backend: str, spec: Any) -> None:
    """Raise ValueError for mask features the TMA kernels do not implement (contexts, a
    window); the dispatcher never sends them such calls, a forced backend gets this error."""
    if spec.num_contexts or spec.max_attn_len:
        raise ValueError(
            f"{backend}: num_contexts/max_attn_len are not supported (use backend='auto')"
        )


def fake_attention_args(dtype: Any, head_dim: int, *, paged: bool, page_size: int) -> tuple:
    """Compile-time arguments of the TMA attention kernels' host functions (``blackwell``,
    ``hopper``), in their order. Paged: ``(q, k_new, v_new, kv_cache, out, cu_seqlens_q,
    num_targets, page_indptr, page_ids, last_page_len, max_seqlen_q, alpha, inv_scaling,
    stream)``; jagged: ``(q, k, v, out, cu_seqlens, num_targets, max_seqlen, alpha,
    inv_scaling, stream)``. ``dtype`` is the cutlass dtype of q/k/v/out."""
    import cutlass

    row = (None, None, head_dim)
    i32 = cutlass.Int32
    scalars = (cutlass.Int32(1), cutlass.Float32(1.0), cutlass.Float32(1.0), env_stream())
    if paged:
        return (
            *(fake_tensor(dtype, row) for _ in range(3)),
            fake_tensor(dtype, (None, 2, page_size, None, head_dim)),
            fake_tensor(dtype, row),
            *(fake_tensor(i32, (None,), align=4) for _ in range(5)),
            *scalars,
        )
    return (
        *(fake_tensor(dtype, row) for _ in range(4)),
        *(fake_tensor(i32, (None,), align=4) for _ in range(2)),
        *scalars,
    )
