"""How many key-range splits the Hopper kernel's grid gets, and the buffers they need.

Importable without the DSL (the op functions run it before the kernel module is imported).
One CTA owns one 128-row query tile; a grid of fewer tiles than SMs (a batch of one, a delta
call without targets) or of lopsided causal tiles (jagged: tile ``i`` walks ~``i`` key tiles)
leaves SMs idle or waits on its longest tile. Splitting a tile's key range over several CTAs
(``cutedsl/hopper.py``: each writes an fp32 partial, the last to finish adds them up) fixes
both, at the price of a per-CTA overhead (the Q load, the pipeline fill) and the partials'
round trip through memory.
"""

from __future__ import annotations

import math

import torch

from hstu_kernels import settings
from hstu_kernels import split_kv as _shared
from hstu_kernels.dispatch import sm_count
from hstu_kernels.split_kv import MAX_SPLITS

__all__ = [
    "JAGGED_TILE_N",
    "MAX_SPLITS",
    "choose_splits",
    "jagged_tile_n",
    "split_buffers",
    "split_layout",
]

JAGGED_TILE_N = 64  # keys per tile of the Hopper kernel's jagged op (paged: one 32-token page)


def jagged_tile_n() -> int:
    """The jagged op's key tile: ``JAGGED_TILE_N`` unless ``settings.cutedsl_jagged_tile_n``
    (``HSTU_CUTEDSL_JAGGED_TILE_N``: 32 or 64; for A/B runs) says otherwise."""
    return settings.get().cutedsl_jagged_tile_n


def choose_splits(tiles: int, kv_tiles: int, sms: int, causal: bool) -> int:
    """Splits per query tile of the Hopper kernel's grid (:func:`hstu_kernels.split_kv.
    choose_splits`, rule ``"waves"``): ``tiles`` query tiles whose longest walks ``kv_tiles``
    key tiles, on ``sms`` SMs. Paged: among the one-wave splits (of a grid leaving more than half
    the SMs idle: 96 tiles of 128 keys measured 119 us unsplit, 157 in 2 on an H100), the one
    minimising waves x chunk: 48 tiles (B=4 + 256 targets) in 2, 74 us against 128 in 8 splits
    over three waves. The jagged op's 64-key tiles count the per-split overhead double
    (performance only)."""
    return _shared.choose_splits(tiles, kv_tiles, sms, causal=causal, rule="waves")


def split_layout(
    device: torch.device,
    batch: int,
    heads: int,
    max_seqlen_q: int,
    kv_tiles: int,
    block_m: int,
    causal: bool,
) -> tuple[int, int, int]:
    """``(splits, chunk_tiles, tiles)`` of one launch: the split count, the fixed chunk length
    in key tiles (jagged: short tiles are not split; 0 for equal parts of each tile's own
    range, paged) and the query tiles of the grid. ``settings.cutedsl_splits``
    (``HSTU_CUTEDSL_SPLITS=N``) forces ``N`` splits (measurements, tests)."""
    tiles = batch * heads * math.ceil(max(max_seqlen_q, 1) / block_m)
    forced = settings.get().cutedsl_splits
    if forced:
        splits = max(1, min(forced, kv_tiles, MAX_SPLITS))
    else:
        splits = choose_splits(tiles, kv_tiles, sm_count(device), causal)
    chunk_tiles = math.ceil(kv_tiles / splits) if causal and splits > 1 else 0
    return splits, chunk_tiles, tiles


def split_buffers(
    q: torch.Tensor,
    batch: int,
    max_seqlen_q: int,
    kv_tiles: int,
    block_m: int,
    causal: bool,
    unsummed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """``(partials, tickets, chunk_tiles, unsummed)`` for one call (:func:`split_layout`):
    fp32 ``partials [splits, *q.shape]`` (the kernel's split count is ``partials.shape[0]``;
    a one-element stand-in without a split), int32 zero ``tickets`` (one per query tile) and
    the chunk length. ``unsummed``: the kernel leaves the partials to the caller (no tickets;
    the flag is returned as the kernel's int argument, 0 without a split)."""
    splits, chunk_tiles, tiles = split_layout(
        q.device, batch, q.shape[1], max_seqlen_q, kv_tiles, block_m, causal
    )
    if splits == 1:
        stand_in = torch.empty((1, 1, 1, q.shape[2]), dtype=torch.float32, device=q.device)
        return stand_in, torch.empty((1,), dtype=torch.int32, device=q.device), 0, 0
    partials = torch.empty((splits, *q.shape), dtype=torch.float32, device=q.device)
    if unsummed:
        return partials, torch.empty((1,), dtype=torch.int32, device=q.device), chunk_tiles, 1
    tickets = torch.zeros((tiles,), dtype=torch.int32, device=q.device)
    return partials, tickets, chunk_tiles, 0
