"""Reference ``append_kv``: write new history K/V into their pages."""

from __future__ import annotations

import torch

from hstu_kernels.reference.fp8 import quantize
from hstu_kernels.types import PageTable

__all__ = ["append_kv", "append_positions"]


def append_positions(
    page_table: PageTable,
    page_size: int,
    cu_seqlens: torch.Tensor,
    num_targets: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every new history row of the packed batch: (row, page id, slot in page).

    Sequence ``b``'s first ``N_b = len_b - num_targets[b]`` rows go to history positions
    ``H_b - N_b .. H_b - 1``.
    """
    device = cu_seqlens.device
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    targets = torch.zeros_like(lengths) if num_targets is None else num_targets.long()
    new = lengths - targets
    history = page_table.history_lengths(page_size).long()
    batch = lengths.shape[0]
    seq = torch.repeat_interleave(torch.arange(batch, device=device), new)
    first_new = torch.cumsum(new, 0) - new
    i = torch.arange(seq.shape[0], device=device) - first_new[seq]
    rows = cu_seqlens[:-1].long()[seq] + i
    pos = history[seq] - new[seq] + i
    pages = page_table.page_ids.long()[page_table.page_indptr.long()[seq] + pos // page_size]
    return rows, pages, pos % page_size


def append_kv(
    kv_cache: torch.Tensor,
    page_table: PageTable,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    num_targets: torch.Tensor | None,
    kv_scales: torch.Tensor | None = None,
) -> None:
    """Scatter the new history rows of ``k``/``v`` into ``kv_cache`` (in place).

    ``kv_scales [pages, 2, page_size, heads]``: the cache is an FP8 pool (:mod:`reference.fp8`);
    the rows are quantised (:func:`~hstu_kernels.reference.fp8.quantize`) and their scales
    scattered beside them. Rows already cached are not touched either way."""
    rows, pages, slots = append_positions(page_table, kv_cache.shape[2], cu_seqlens, num_targets)
    for i, x in enumerate((k, v)):
        if kv_scales is None:
            kv_cache[pages, i, slots] = x[rows].to(kv_cache.dtype)
        else:
            x8, scale = quantize(x[rows])
            # (as bytes: the e4m3 codes unchanged, through indexing every device has)
            kv_cache.view(torch.uint8)[pages, i, slots] = x8.view(torch.uint8)
            kv_scales[pages, i, slots] = scale
