"""The compiled variants of the TMA kernels (``hopper``, ``blackwell``): what names one in the
compile cache, worked out without importing the DSL.

A variant's identity (its settings, dtype, head dim, paged or not, key tile) and the files its
code comes from are all that the compile cache's key needs, so a process whose disk cache holds
the variant loads it (:func:`compile.compile_cached`) without the DSL's import, which takes
about two seconds; the kernel module, and with it the DSL, is imported only to compile a
variant the cache does not hold. The kernel modules build their kernels from the same variant
(``build_variant``), so the key and the compiled code cannot disagree. Tile shapes and stage
counts that follow from the kernel module's constants are covered by its source hash.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from hstu_kernels import settings

__all__ = ["BLACKWELL_PAGE_SIZE", "FAMILIES", "HOPPER_PAGE_SIZE", "get_kernel", "variant"]

# The paged ops' pages: one page is one key tile of the kernel.
HOPPER_PAGE_SIZE = 32
BLACKWELL_PAGE_SIZE = 128
# family -> (kernel module, compile-cache name prefix, page size)
FAMILIES: dict[str, tuple[str, str, int]] = {
    "hopper": ("hstu_kernels.backends.cutedsl.hopper", "hstu_fwd_wgmma_", HOPPER_PAGE_SIZE),
    "blackwell": (
        "hstu_kernels.backends.cutedsl.blackwell",
        "hstu_fwd_tcgen05_",
        BLACKWELL_PAGE_SIZE,
    ),
}
_SHARED = ("hstu_kernels.backends.cutedsl.hstu_common", "hstu_kernels.backends.cutedsl.tma_views")


def _family(family: str) -> tuple[str, str, int]:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"family: expected one of {sorted(FAMILIES)}, got {family!r}") from None


def variant(
    family: str, torch_dtype: torch.dtype, head_dim: int, paged: bool, windowed: bool = False
) -> dict[str, Any]:
    """The variant of ``family``'s kernel for one call shape under the current settings;
    ``windowed``: with contexts/window (the Hopper kernel only)."""
    _, _, page_size = _family(family)
    if windowed and family != "hopper":
        raise ValueError(f"{family}: no contexts/window variant")
    # SiLU through tanh.approx for bf16 (its error is far below bf16 rounding), ex2 + rcp for
    # fp16; settings.cutedsl_silu (HSTU_CUTEDSL_SILU=tanh|exp) overrides it for A/B runs.
    silu = settings.get().cutedsl_silu or ("tanh" if torch_dtype == torch.bfloat16 else "exp")
    v: dict[str, Any] = {
        "silu": silu,
        "dtype": str(torch_dtype),
        "head_dim": head_dim,
        "paged": paged,
        "page_size": page_size if paged else 0,
    }
    if family == "hopper":
        from hstu_kernels.backends.cutedsl.split_kv import jagged_tile_n

        v["pingpong"] = settings.get().cutedsl_pingpong  # off: for A/B runs
        v["split_kv"] = True
        # The paged op's key tile is one page; the jagged op's 32 or 64 keys (A/B runs).
        v["tile_n"] = page_size if paged else jagged_tile_n()
        v["windowed"] = windowed
    return v


def get_kernel(family: str, arch: str, torch_dtype: torch.dtype, head_dim: int, paged: bool,
               windowed: bool = False) -> Callable:  # fmt: skip
    """The compiled kernel of one variant: from memory, from disk (no DSL import), or compiled
    now. Its arguments are those of the kernel module's ``build_variant``."""
    from hstu_kernels.backends.cutedsl import compile as cc

    module_name, prefix, _ = _family(family)
    v = variant(family, torch_dtype, head_dim, paged, windowed)
    extra = (windowed,) if windowed else ()  # only the Hopper module takes it

    def build() -> tuple[Callable, tuple]:
        host_fn, built, fake_args = importlib.import_module(module_name).build_variant(
            arch, torch_dtype, head_dim, paged, *extra
        )
        if built != v:  # the settings changed between the two reads
            raise RuntimeError(f"{family}: variant changed while compiling ({v} -> {built})")
        return host_fn, fake_args()

    return cc.compile_cached(
        prefix + cc.dsl_arch(arch).replace("sm_", "sm"), v, build, arch=arch,
        sources=cc.module_sources(module_name, *_SHARED),
    )  # fmt: skip
