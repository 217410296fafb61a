"""Kernel configurations and the autotune cache of the Triton backend.

A :class:`Config` fixes the tile shape and the launch parameters of the attention kernel. The
first call of each *tuning key* (head dim, dtype, page size or jagged, power-of-two buckets of
the longest query range and of ``batch * heads``) times every candidate on the
call's own tensors and keeps the fastest, so a new batch shape in the same bucket never
re-tunes. ``HSTU_TRITON_AUTOTUNE=0`` (or a CUDA graph capture, which cannot time anything)
uses the fixed default of the key instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hstu_kernels import settings

__all__ = ["Config", "autotune_enabled", "candidates", "default_config", "tuning_key"]


@dataclass(frozen=True)
class Config:
    """Tile sizes and launch parameters of one attention launch.

    ``splits`` is the number of programs that share one query tile's KV range (their partial
    outputs are summed by a second kernel); ``None`` picks it from the grid size.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    splits: int | None = None
    prefetch: bool = True  # look the next KV tile's pages up one iteration ahead
    # One program per SM sharing all tiles' KV ranges evenly (tiles cut where a program's
    # share ends, pieces combined by the last one's program); ``splits`` is then unused.
    # Balances alike tiles (paged); a paged tuning candidate (docs/triton.md).
    stream_k: bool = False
    # Paged K/V tiles by TMA (a tensor descriptor of the cache) instead of pointer loads;
    # only where a tile lies in one page (else, and for jagged calls, pointer loads).
    tma: bool = False

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}: expected a power of two >= 16, got {v}")
        if self.splits is not None and self.splits < 1:
            raise ValueError(f"splits: expected >= 1 or None, got {self.splits}")


def autotune_enabled() -> bool:
    """Autotuning is on unless ``settings.triton_autotune`` is off (``HSTU_TRITON_AUTOTUNE=0``)."""
    return settings.get().triton_autotune


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def tuning_key(
    head_dim: int,
    dtype: torch.dtype,
    page_size: int | None,
    max_seqlen: int,
    batch_heads: int,
    kv_dtype: torch.dtype | None = None,
) -> tuple:
    """What a tuned config is shared by: shapes in the same power-of-two buckets of the longest
    query range and of ``batch * heads`` (which sets the grid size) reuse it; an FP8 pool
    (``kv_dtype``) tunes apart."""
    key = (head_dim, str(dtype), page_size, _bucket(max_seqlen), _bucket(batch_heads))
    return key if kv_dtype is None else (*key, str(kv_dtype))


def default_config(head_dim: int, page_size: int | None, interpret: bool) -> Config:
    """The fixed config used without autotuning (and as the tuner's fallback).

    Chosen from H100 sweeps (docs/triton.md); ``page_size=None`` is the jagged kernel.
    """
    if interpret:
        # The interpreter's cost grows with the number of tiles visited, not their size; fp32
        # on a GPU uses this small set too (~64 KB of shared memory at head dim 256).
        return Config(32, 16, 4, 1)
    if head_dim >= 256:
        return Config(128, 64, 8, 2)
    if head_dim >= 128:
        return Config(64, 64, 4, 3) if page_size is None else Config(128, 32, 4, 4)
    return Config(128, 64, 4, 3)


def candidates(head_dim: int, page_size: int | None, fp8: bool = False) -> list[Config]:
    """The configs the autotuner times for a key (the default first); ``fp8`` (an FP8 pool,
    loaded through pointers) leaves out the TMA ones."""
    out = [default_config(head_dim, page_size, False)]
    if head_dim >= 256:
        out += [Config(128, 32, 8, 2), Config(64, 64, 4, 2), Config(128, 64, 8, 2, prefetch=False)]
        if page_size is not None:
            # Deeper K/V pipelines for the paged kernel, whose short programs (few query rows
            # over a long cached history) wait on memory more than the jagged ones.
            out += [Config(128, 32, 8, 3), Config(128, 32, 8, 4), Config(64, 64, 4, 3)]
            # Stream-K: one program per SM, so 96 tiles (B=8 with targets) no longer leave
            # 36 SMs idle (150 -> 145 us on an H100; slower for the other shapes).
            out += [Config(128, 32, 8, 3, stream_k=True), Config(128, 64, 8, 2, stream_k=True)]
            # K/V pages by TMA: H100, one run, kernel alone, B=1 + 256 targets in 11 splits
            # 28.5 -> 26.7 us (and 27.6 with 64-row tiles in 5), B=8 + targets unsplit
            # 152 -> 132; B=8 without targets unchanged (70).
            out += [Config(128, 32, 8, 4, tma=True), Config(64, 32, 4, 4, tma=True)]
    elif head_dim >= 128:
        out += [Config(64, 64, 4, 3), Config(128, 32, 4, 4), Config(128, 128, 8, 2)]
    else:
        out += [Config(128, 128, 8, 3), Config(64, 64, 4, 3), Config(128, 32, 4, 4)]
    seen, unique = set(), []
    for c in out:
        if fp8 and c.tma:
            continue
        if c not in seen:
            seen.add(c)
            unique.append(c)
    return unique
