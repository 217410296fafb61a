"""Every knob of the library in one place: read from the environment once, typed.

The environment is read on first use (:func:`get`), never on a call path afterwards. Each
field below names its variable; the README's settings table is this list. Tests and tools
change settings through :func:`override` (a context manager) or :func:`configure`, not by
writing ``os.environ``; caches that depend on a setting register with :func:`on_change` and
are cleared whenever settings change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Settings", "configure", "get", "on_change", "override", "reload"]

_OFF = ("0", "false", "off", "no", "none")


@dataclass(frozen=True)
class Settings:
    """The library's knobs. Field: environment variable (default) -- meaning."""

    # HSTU_KERNELS_BACKEND ("auto"): a backend name forced on every backend="auto" call.
    backend: str = "auto"
    # HSTU_KERNELS_CUTEDSL_CACHE (~/.cache/hstu_kernels/cutedsl; 0/off: none): compiled DSL
    # kernels on disk.
    cutedsl_cache: Path | None = Path.home() / ".cache" / "hstu_kernels" / "cutedsl"
    # HSTU_KERNELS_TUNING_CACHE (~/.cache/hstu_kernels/tuning; 0/off: none): the Triton
    # autotuners' choices (attention, projection, fused append) on disk, per card and versions.
    tuning_cache: Path | None = Path.home() / ".cache" / "hstu_kernels" / "tuning"
    # HSTU_TRITON_AUTOTUNE (1): time the Triton attention configs on first use of a shape
    # (0: the fixed default config).
    triton_autotune: bool = True
    # TRITON_INTERPRET (0): Triton's CPU interpreter; the Triton backend then serves CPU calls.
    triton_interpret: bool = False
    # HSTU_PROJECTION_AUTOTUNE (1): time the layer's projection GEMM candidates per shape.
    projection_autotune: bool = True
    # HSTU_FUSED_PROJECTION (1): the projection GEMM with its SiLU in the epilogue.
    fused_projection: bool = True
    # HSTU_PROJECTION_FAST_SILU (1): tanh.approx SiLU in the projection's epilogue.
    projection_fast_silu: bool = True
    # HSTU_FUSED_LAYERNORM (1): the layer's Triton LayerNorm row kernels (0: torch ops).
    fused_layernorm: bool = True
    # HSTU_FUSED_APPEND (1): the cached layer's K/V append from the projection's epilogue.
    fused_append: bool = True
    # HSTU_CUTEDSL_SILU (per dtype: tanh for bf16, exp for fp16): the DSL kernels' SiLU.
    cutedsl_silu: str | None = None
    # HSTU_CUTEDSL_PINGPONG (1): the Hopper kernel's two consumer warpgroups in ping-pong.
    cutedsl_pingpong: bool = True
    # HSTU_CUTEDSL_SPLITS (chosen per grid): force the DSL kernels' split-KV factor.
    cutedsl_splits: int | None = None
    # HSTU_CUTEDSL_JAGGED_TILE_N (64): keys per tile of the Hopper kernel's jagged op (32/64).
    cutedsl_jagged_tile_n: int = 64
    # HSTU_CUTEDSL_TILE (per arch): "BM,BN,threads" of the warp-MMA DSL kernel (tuning runs).
    cutedsl_tile: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise TypeError(f"{f.name}: expected a bool, got {value!r}")
            if f.type == "str" and not isinstance(value, str):
                raise TypeError(f"{f.name}: expected a str, got {value!r}")
            if f.type == "Path | None" and not isinstance(value, (Path, type(None))):
                if not isinstance(value, str):
                    raise TypeError(f"{f.name}: expected a path or None, got {value!r}")
                object.__setattr__(self, f.name, Path(value))
        if self.cutedsl_silu not in (None, "tanh", "exp"):
            raise ValueError(
                f"cutedsl_silu: expected 'tanh', 'exp' or None, got {self.cutedsl_silu!r}"
            )
        if self.cutedsl_jagged_tile_n not in (32, 64):
            raise ValueError(
                f"cutedsl_jagged_tile_n: expected 32 or 64, got {self.cutedsl_jagged_tile_n!r}"
            )
        if self.cutedsl_splits is not None and (
            not isinstance(self.cutedsl_splits, int) or self.cutedsl_splits < 1
        ):
            raise ValueError(
                f"cutedsl_splits: expected an int >= 1 or None, got {self.cutedsl_splits!r}"
            )
        if not self.backend:
            raise ValueError("backend: expected 'auto' or a backend name, got ''")
        tile = self.cutedsl_tile
        if tile is not None and not (
            isinstance(tile, tuple) and len(tile) == 3
            and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in tile)
        ):  # fmt: skip
            raise ValueError(f"cutedsl_tile: expected (BM, BN, threads) ints > 0, got {tile!r}")


def _flag(env: dict[str, str], name: str, default: bool) -> bool:
    value = env.get(name)
    if value is None or not value.strip():
        return default
    return value.strip().lower() not in _OFF


def _path(env: dict[str, str], name: str, default: Path | None) -> Path | None:
    value = env.get(name)
    if value is None:
        return default
    if value.strip().lower() in ("", *_OFF):
        return None
    return Path(value)


def _int(env: dict[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: expected an int, got {value!r}") from None


def from_environment(env: dict[str, str] | None = None) -> Settings:
    """The settings the environment (``os.environ`` by default) asks for."""
    env = dict(os.environ if env is None else env)
    d = Settings()
    tile = env.get("HSTU_CUTEDSL_TILE", "").strip()
    try:
        parsed_tile = tuple(int(x) for x in tile.split(",")) if tile else None
    except ValueError:
        parsed_tile = None
    if tile and (parsed_tile is None or len(parsed_tile) != 3):
        raise ValueError(f"HSTU_CUTEDSL_TILE: expected 'BM,BN,threads', got {tile!r}")
    silu = env.get("HSTU_CUTEDSL_SILU", "").strip() or None
    try:
        return Settings(
            backend=env.get("HSTU_KERNELS_BACKEND", "").strip() or "auto",
            cutedsl_cache=_path(env, "HSTU_KERNELS_CUTEDSL_CACHE", d.cutedsl_cache),
            tuning_cache=_path(env, "HSTU_KERNELS_TUNING_CACHE", d.tuning_cache),
            triton_autotune=_flag(env, "HSTU_TRITON_AUTOTUNE", True),
            triton_interpret=_flag(env, "TRITON_INTERPRET", False),
            projection_autotune=_flag(env, "HSTU_PROJECTION_AUTOTUNE", True),
            fused_projection=_flag(env, "HSTU_FUSED_PROJECTION", True),
            projection_fast_silu=_flag(env, "HSTU_PROJECTION_FAST_SILU", True),
            fused_layernorm=_flag(env, "HSTU_FUSED_LAYERNORM", True),
            fused_append=_flag(env, "HSTU_FUSED_APPEND", True),
            cutedsl_silu=silu,
            cutedsl_pingpong=_flag(env, "HSTU_CUTEDSL_PINGPONG", True),
            cutedsl_splits=_int(env, "HSTU_CUTEDSL_SPLITS"),
            cutedsl_jagged_tile_n=_int(env, "HSTU_CUTEDSL_JAGGED_TILE_N") or 64,
            cutedsl_tile=parsed_tile,  # type: ignore[arg-type]
        )
    except ValueError as exc:
        raise ValueError(f"hstu_kernels settings from the environment: {exc}") from None


_LOCK = threading.Lock()
_CURRENT: Settings | None = None
_LISTENERS: list[Callable[[], None]] = []


def get() -> Settings:
    """The current settings (the environment is read on the first call only)."""
    current = _CURRENT
    if current is None:
        return reload()
    return current


def _set(new: Settings) -> Settings:
    global _CURRENT
    with _LOCK:
        changed = _CURRENT is not None and new != _CURRENT
        _CURRENT = new
    if changed:
        for fn in list(_LISTENERS):
            fn()
    return new


def reload() -> Settings:
    """Read the environment again (for a process that changed it on purpose)."""
    return _set(from_environment())


def configure(**changes: object) -> Settings:
    """Change settings for the rest of the process, e.g. ``configure(triton_autotune=False)``;
    returns the new settings. Unknown names raise ``TypeError``."""
    known = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise TypeError(f"settings: unknown {unknown}; known: {sorted(known)}")
    new = dataclasses.replace(get(), **changes)
    if "backend" in changes:
        from hstu_kernels.dispatch import check_backend_name  # settings is imported first

        check_backend_name(new.backend)
    return _set(new)


@contextlib.contextmanager
def override(**changes: object) -> Iterator[Settings]:
    """Settings changed inside a ``with`` block, restored after it."""
    before = get()
    try:
        yield configure(**changes)
    finally:
        _set(before)


def on_change(fn: Callable[[], None]) -> Callable[[], None]:
    """Call ``fn()`` whenever settings change (caches derived from them clear themselves)."""
    _LISTENERS.append(fn)
    return fn
