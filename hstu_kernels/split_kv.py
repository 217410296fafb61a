"""The one split-KV chooser: into how many key-range chunks an attention grid splits.

A grid of fewer query tiles than the GPU has slots (a batch of one, a delta call without
targets) leaves SMs idle, and a causal grid waits on its longest tile (jagged: tile ``i`` walks
~``i`` key tiles). Splitting each tile's key range over several programs fixes both, at a price
per extra program (the query tile's load, the pipeline fill, an fp32 partial written and summed)
of about :data:`SPLIT_OVERHEAD_TILES` key tiles. Every kernel family asks :func:`choose_splits`,
with the rule its kernel was measured with (the measurements are in ``docs/triton.md``,
``docs/hopper.md`` and ``docs/cutedsl.md``):

- causal grids (``causal=True``, every rule but ``"share"``): the split minimising the longer of
  the mean load per SM and the longest chunk;
- ``"fill"`` (Triton, paged): a grid of fewer than half as many tiles as SMs, into as many
  chunks as fill one wave, unless even one-tile chunks plus the overhead would not beat the
  whole range (``kv_tiles <= 1 + overhead``: a split that cannot win costs a sum kernel);
- ``"waves"`` (the Hopper kernel, paged): among the splits that fit one wave, the one that
  minimises ``waves * (chunk + overhead)``;
- ``"share"`` (the warp-MMA DSL kernel, both kinds): the split that minimises a tile's share of
  whole waves plus a small cost per split, with at least 4 key tiles per chunk.

A larger split is taken only if it wins by more than 2 % (``"share"``: by any margin).
"""

from __future__ import annotations

import math
from typing import Literal

__all__ = ["MAX_SPLITS", "SPLIT_OVERHEAD_TILES", "choose_splits", "window_kv_tiles"]

MAX_SPLITS = 16
# One more program of a query tile costs about this many key tiles of work (~1.5 at D=256 by
# the H100 figures), rounded up so that a split must win clearly.
SPLIT_OVERHEAD_TILES = 2.0

Rule = Literal["fill", "waves", "share"]


def window_kv_tiles(
    kv_tiles: int, num_contexts: int, max_attn_len: int, block_m: int, block_n: int
) -> int:
    """The longest key range in ``block_n``-key tiles of a ``block_m``-row query tile, given
    the longest without a window (``kv_tiles``): with a window W and no contexts (whose rows
    see the whole history) a tile's keys span at most its rows plus W."""
    if not max_attn_len or num_contexts:
        return kv_tiles
    return min(kv_tiles, -(-(max_attn_len + block_m) // block_n) + 1)


def choose_splits(
    tiles: int, kv_tiles: int, slots: int, *, causal: bool, rule: Rule = "fill"
) -> int:
    """Splits per query tile for ``tiles`` query tiles whose longest walks ``kv_tiles`` key
    tiles, on ``slots`` concurrent programs (SMs, times the occupancy for ``"share"``)."""
    if rule == "share":
        return _share(tiles, kv_tiles, slots)
    if rule not in ("fill", "waves"):
        raise ValueError(f"rule: expected 'fill', 'waves' or 'share', got {rule!r}")
    if slots <= 1 or tiles <= 0 or kv_tiles <= 1:
        return 1
    if causal:
        return _causal(tiles, kv_tiles, slots)
    if rule == "fill":
        if tiles >= slots // 2 or kv_tiles <= 1 + SPLIT_OVERHEAD_TILES:
            return 1
        return max(1, min(MAX_SPLITS, slots // tiles, kv_tiles))
    if 2 * tiles > slots:
        return 1
    best, best_cost = 1, float("inf")
    for s in range(1, min(MAX_SPLITS, kv_tiles, slots // tiles) + 1):
        chunk = math.ceil(kv_tiles / s) + (SPLIT_OVERHEAD_TILES if s > 1 else 0.0)
        cost = math.ceil(tiles * s / slots) * chunk
        if cost < best_cost * 0.98:
            best, best_cost = s, cost
    return best


def _causal(tiles: int, kv_tiles: int, slots: int) -> int:
    best, best_cost = 1, float("inf")
    for s in range(1, min(MAX_SPLITS, kv_tiles) + 1):
        chunk = math.ceil(kv_tiles / s) + (SPLIT_OVERHEAD_TILES if s > 1 else 0.0)
        mean_load = tiles * (kv_tiles / 2 + (s - 1) * SPLIT_OVERHEAD_TILES) / slots
        cost = max(mean_load, chunk)
        if cost < best_cost * 0.98:
            best, best_cost = s, cost
    return best


def _share(ctas: int, key_tiles: int, slots: int) -> int:
    if ctas >= slots:
        return 1
    best, best_cost = 1, 1.0
    for s in range(2, min(MAX_SPLITS, max(1, key_tiles // 4)) + 1):
        cost = -(-ctas * s // slots) / s + 0.02 * s
        if cost < best_cost:
            best, best_cost = s, cost
    return best
