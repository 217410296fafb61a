"""How many key-range splits the Hopper kernel's grid gets.

Importable without the DSL (the op functions run it before the kernel module is imported).
One CTA owns one 128-row query tile; a grid of fewer tiles than SMs (a batch of one, a delta
call without targets) or of lopsided causal tiles (jagged: tile ``i`` walks ~``i`` key tiles)
leaves SMs idle or waits on its longest tile. Splitting a tile's key range over a cluster of
2, 4 or 8 CTAs (``cutedsl/hopper.py``: the cluster sums its fp32 partials through distributed
shared memory) fixes both, at the price of a per-CTA overhead (the Q load, the pipeline fill,
the reduction) and of the clusters' placement: a cluster's CTAs must fit in one GPC at once,
so fewer clusters than ``SMs / S`` may run side by side.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from hstu_kernels.dispatch import sm_count

__all__ = [
    "JAGGED_TILE_N",
    "SPLIT_SIZES",
    "choose_splits",
    "cluster_capacity",
    "jagged_tile_n",
    "split_args",
]

SPLIT_SIZES = (1, 2, 4, 8)  # cluster sizes the kernel takes (hopper.SPLIT_SIZES)
JAGGED_TILE_N = 64  # keys per tile of the Hopper kernel's jagged op (paged: one 32-token page)


def jagged_tile_n() -> int:
    """The jagged op's key tile: ``JAGGED_TILE_N``, or ``HSTU_CUTEDSL_JAGGED_TILE_N`` (32 or
    64; for A/B runs)."""
    tile = int(os.environ.get("HSTU_CUTEDSL_JAGGED_TILE_N", JAGGED_TILE_N))
    if tile not in (32, 64):
        raise ValueError(f"HSTU_CUTEDSL_JAGGED_TILE_N: expected 32 or 64, got {tile}")
    return tile


# Every CTA costs about this many 32-key tiles of work beyond its key tiles, whatever its
# split (fitted on an H100 over splits 1..8 of 4096-token histories: ~0.65-0.75 us per key
# tile plus ~25 us per CTA; bench/NOTES-hopper.md).
CTA_OVERHEAD_TILES = 28.0


def choose_splits(
    tiles: int, kv_tiles: int, sms: int, causal: bool, clusters: dict[int, int] | None = None
) -> int:
    """Splits per query tile (one of ``SPLIT_SIZES``) for ``tiles`` query tiles of
    ``kv_tiles`` key tiles each, on ``sms`` SMs (one CTA per SM at a time), where at most
    ``clusters[S]`` clusters of ``S`` CTAs run at once (default ``sms // S``).

    - Paged (``causal=False``): the tiles are alike, so the launch lasts ``waves`` CTA times:
      the count that minimises ``ceil(tiles / clusters[S]) * (ceil(kv_tiles / S) +
      CTA_OVERHEAD_TILES)``. A larger split is taken only if it wins by more than 2 %.
    - Jagged (``causal=True``): 1. Its lopsided causal grids were split in 2 with fp32
      partials in global memory (-8 % at B=1); with the cluster reduction the one run
      measured was slower (124 against 99 us at B=1 + 256 targets on an H200, before the
      owner's sum was vectorised), so splitting waits for a measurement that says otherwise.
    """
    if causal or tiles <= 0 or kv_tiles <= 1 or sms <= 1:
        return 1
    best, best_cost = 1, float("inf")
    for s in SPLIT_SIZES:
        if s > kv_tiles:
            break
        at_once = (clusters or {}).get(s, sms // s)
        cost = math.ceil(tiles / max(at_once, 1)) * (math.ceil(kv_tiles / s) + CTA_OVERHEAD_TILES)
        if cost < best_cost * 0.98:
            best, best_cost = s, cost
    return best


@functools.cache
def cluster_capacity(device_index: int) -> dict[int, int]:
    """``{S: clusters of S one-CTA-per-SM CTAs the device runs at once}``: the CUDA occupancy
    query through the DSL's ``HardwareInfo`` (``SMs // S`` where that fails), less 1/16 for
    clusters of 4 and 8: on an H100 it answers 33 and 16 where Nsight Compute reports 30 and
    15 for this kernel (its dummy kernel is not ours)."""
    sms = torch.cuda.get_device_properties(device_index).multi_processor_count
    capacity = {s: sms // s for s in SPLIT_SIZES}
    try:
        from cutlass.utils import HardwareInfo

        with torch.cuda.device(device_index):
            info = HardwareInfo(device_index)
            for s in SPLIT_SIZES[1:]:
                capacity[s] = int(info.get_max_active_clusters(s))
    except Exception:  # an estimate is the fallback, not an error
        pass
    for s in SPLIT_SIZES[2:]:
        capacity[s] -= -(-capacity[s] // 16)
    return capacity


def split_args(
    q: torch.Tensor, batch: int, max_seqlen_q: int, kv_tiles: int, block_m: int, causal: bool
) -> tuple[int, int]:
    """``(num_splits, chunk_tiles)`` for one call: the kernel's splits per query tile (its
    cluster size) and the fixed chunk length in key tiles (jagged: short tiles are not
    split; 0 for equal parts of each tile's own range, paged).

    ``HSTU_CUTEDSL_SPLITS=N`` forces ``N`` splits (measurements, tests; here one of
    ``SPLIT_SIZES``)."""
    heads = q.shape[1]
    tiles = batch * heads * math.ceil(max(max_seqlen_q, 1) / block_m)
    forced = os.environ.get("HSTU_CUTEDSL_SPLITS")
    if forced:
        splits = int(forced)
        if splits not in SPLIT_SIZES:
            raise ValueError(
                f"HSTU_CUTEDSL_SPLITS={forced}: cutedsl-hopper splits a query tile over a "
                f"cluster of {', '.join(map(str, SPLIT_SIZES))} CTAs"
            )
    elif q.device.type == "cuda":
        index = q.device.index if q.device.index is not None else torch.cuda.current_device()
        splits = choose_splits(tiles, kv_tiles, sm_count(q.device), causal, cluster_capacity(index))
    else:
        splits = 1
    if splits == 1:
        return 1, 0
    return splits, (math.ceil(kv_tiles / splits) if causal else 0)
