"""Backend "cutedsl-hopper": the warp-specialised wgmma + TMA HSTU kernel (``cutedsl/hopper.py``).

Serves jagged and paged (delta) HSTU attention on sm_90 in bf16/fp16, head dims 64/128/256,
pages of exactly 32 tokens (one page = one 32-key tile), causal + targets, contexts and window
(a separately compiled variant), no ``append_kv``.

Status: compiled for sm_90a in CI (tests/test_cutedsl_hopper.py) and run on H100s (its GPU
tests, docs/hopper.md). On sm_90 it ranks above triton, but declines (``declines``)
grids too small for it, which triton's split kernels serve faster.

The DSL is imported only when a call needs the kernel.
"""

from __future__ import annotations

import torch

from hstu_kernels.backends.cutedsl.tma_ops import make_ops
from hstu_kernels.backends.cutedsl.tma_variants import HOPPER_PAGE_SIZE
from hstu_kernels.dispatch import Backend, register

NAME = "cutedsl-hopper"
ARCHS = frozenset({"sm_90"})
HEAD_DIMS = frozenset({64, 128, 256})
PAGE_SIZE = HOPPER_PAGE_SIZE  # one page = one key tile
PAGE_SIZES = frozenset({PAGE_SIZE})
# Above triton (20) on sm_90: faster on an H100 for the grids it does not decline (below).
PRIORITY = 30
# Grids below these sizes go to triton. grid_tiles() is the call's 128-row query tiles over
# batch x heads rounded up to a power of two, so paged grids of 32 tiles or fewer and jagged
# grids of 64 or fewer are declined. Measured on an H100 (docs/hopper.md), 4 heads of
# 256, history 4096: triton faster on paged 32 tiles (B=8 without targets: 77-83 us split in 2
# or 4, triton 74-77) and 12 (B=1 + 256 targets: 60.3 us in 11 splits, triton 33.3); hopper
# faster on paged 96 (B=8 + 256 targets: 120.8 vs 144.3 us), jagged 128 (B=1 without targets,
# in 2: 75.2 vs 96.8), 136 (B=1 + 256 targets, in 2: 79.4 vs 111.5) and 1088 (B=8: 517.7 vs
# 673.9). Unmeasured: paged grids of 33-64 tiles (e.g. B=4 + targets, 48) and jagged grids of
# fewer than 128 tiles (short sequences).
MIN_TILES = {"paged": 64, "jagged": 128}
# A paged call whose caller sums the split partials itself (Request.partials: the cached
# layer's LayerNorm does) skips the kernel's ticket sum, which is what lost on small grids.
# H100, same run, attention + the LayerNorm summing its partials, graph-replayed: B=8 without
# targets (32 tiles) hopper in 4 splits 72.5 us, triton 75.9; B=1 + 256 targets (12 tiles,
# rounded to 16) triton 32.3, hopper 37.0 at best (11 splits); B=4 + 256 targets (48 tiles)
# hopper in 2 splits 74.3, triton 78.2; B=2 + 256 targets (24 tiles, rounded to 32) hopper in
# 5 splits 47.6, triton 45.7 (kept: it shares the bucket of B=8 without targets).
MIN_TILES_PARTIALS = 32


def _probe(arch: str) -> str | None:
    if arch not in ARCHS:
        return f"arch {arch} not supported (wgmma needs sm_90)"
    from hstu_kernels.backends.cutedsl.compile import dsl_available

    return dsl_available()


def _split_kv(
    device: torch.device, batch: int, heads: int, max_seqlen_q: int, mean_pages: int | None,
    window: int = 0,
) -> tuple[int, int, int]:  # fmt: skip
    """The kernel's split-KV choice ``(splits, chunk_tiles, tiles)``. The key range in the
    op's tiles: ``mean_pages`` (paged: one page per tile), or the longest sequence in
    ``jagged_tile_n()``-key tiles (jagged: ``None``); a ``window`` W bounds it by the tiles a
    128-row q-tile's windows span."""
    from hstu_kernels.backends.cutedsl.split_kv import jagged_tile_n, split_layout
    from hstu_kernels.split_kv import window_kv_tiles

    paged = mean_pages is not None
    tile_n = PAGE_SIZE if paged else jagged_tile_n()
    kv_tiles = mean_pages if paged else -(-max(max_seqlen_q, 1) // tile_n)
    kv_tiles = window_kv_tiles(kv_tiles, 0, window, 128, tile_n)
    return split_layout(device, batch, heads, max_seqlen_q, kv_tiles, block_m=128, causal=not paged)


def grid_tiles(size: tuple[int, int, int] | None) -> int | None:
    """The kernel's 128-row query tiles over batch x heads of a call of ``size``
    (:attr:`Request.size`), rounded up to a power of two; ``None`` if unknown."""
    if size is None:
        return None
    batch, heads, rows = size
    tiles = max(1, batch * heads * -(-max(rows, 1) // 128))
    return 1 << (tiles - 1).bit_length()


def _declines(request) -> str | None:
    """Small grids go to triton (measured faster there; see MIN_TILES and
    MIN_TILES_PARTIALS)."""
    least = MIN_TILES_PARTIALS if request.partials else MIN_TILES.get(request.op)
    tiles = grid_tiles(request.size)
    if least is None or tiles is None or tiles >= least:
        return None
    return f"~{tiles} query tiles < {least}: triton measured faster on small grids"


_OPS, _PLANNERS = make_ops(NAME, "hopper", split_kv=_split_kv, mask_features=True)


register(
    Backend(
        name=NAME,
        ops=_OPS,
        planners=_PLANNERS,
        dtypes=frozenset({torch.bfloat16, torch.float16}),
        archs=ARCHS,
        head_dims=HEAD_DIMS,
        page_sizes=PAGE_SIZES,
        features=frozenset({"contexts", "window"}),
        priority={"sm_90": PRIORITY, "*": 0},
        probe=_probe,
        declines=_declines,
        description="CuTe DSL wgmma + TMA, warp-specialized (sm_90a); the Hopper default for "
        "large grids (measured on an H100)",
    )
)
