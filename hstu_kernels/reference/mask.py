"""The HSTU attention mask of DESIGN.md §1, written for clarity."""

from __future__ import annotations

import torch

__all__ = ["hstu_mask"]


def _clamped_ids(pos: torch.Tensor, history_len: int, num_contexts: int) -> torch.Tensor:
    # Targets share one id (H_b or H_b - C + 1), so no target sees another; with a contextual
    # prefix every context token has id 0.
    if num_contexts == 0:
        return torch.clamp(pos, max=history_len)
    return torch.clamp(pos - num_contexts + 1, min=0, max=history_len - num_contexts + 1)


def hstu_mask(
    history_len: int,
    total_len: int,
    num_contexts: int = 0,
    max_attn_len: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean ``[total_len, total_len]`` mask, ``mask[p, j]`` = query ``p`` may attend key ``j``.

    Positions ``0 .. history_len-1`` are history, the rest (``total_len - history_len``) are
    targets. ``num_contexts`` (C) marks a contextual prefix that sees the whole history and is
    seen by everyone; ``max_attn_len`` (W) limits history rows to the last W ids. With
    C = W = 0: history rows are causal, target rows see all history and themselves.
    """
    if not 0 <= history_len <= total_len:
        raise ValueError(f"history_len: expected 0..{total_len}, got {history_len}")
    if num_contexts < 0 or max_attn_len < 0:
        raise ValueError("num_contexts and max_attn_len must be >= 0")
    pos = torch.arange(total_len, device=device)
    ids = _clamped_ids(pos, history_len, num_contexts)
    diff = ids[:, None] - ids[None, :]
    valid = diff > 0
    if max_attn_len > 0:
        valid &= diff <= max_attn_len
    valid |= pos[:, None] == pos[None, :]
    if num_contexts > 0:
        history_end_id = _clamped_ids(
            torch.tensor(history_len, device=device), history_len, num_contexts
        )
        valid |= (ids[:, None] == 0) & (ids[None, :] < history_end_id)
    return valid
