"""Hypothesis strategies shared by the backend tests."""

from __future__ import annotations

from hypothesis import strategies as st


@st.composite
def masks(draw, shape) -> tuple[int, int]:
    """(num_contexts, max_attn_len) for a batch ``shape = (histories, new, targets)``: contexts
    up to the shortest history, windows from one key to longer than any history (0: off)."""
    histories = shape[0]
    contexts = draw(st.sampled_from([0, 0, 1, min(histories)]) | st.integers(0, min(histories)))
    window = draw(st.sampled_from([0, 1, 16, 4096]) | st.integers(1, max(histories) + 2))
    return contexts, window


@st.composite
def batches(
    draw,
    max_history: int,
    max_targets: int,
    max_batch: int = 3,
    *,
    edges: tuple[int, ...] = (),
    whole: bool = False,
    min_new: int = 1,
) -> tuple[list[int], list[int], list[int]]:
    """(histories, new, targets) of a paged batch: odd lengths, one-token histories and zero
    targets included. ``edges``: lengths a history is often drawn from (page and tile edges);
    ``whole``: a sequence's history is often all new; ``min_new=0`` allows sequences with no new
    rows (the batch keeps at least one query row)."""
    b = draw(st.integers(1, max_batch))
    lengths = st.integers(1, max_history)
    if edges:
        lengths = st.one_of(st.sampled_from(edges), lengths)
    histories = draw(st.lists(lengths, min_size=b, max_size=b))
    if whole:
        new = [draw(st.one_of(st.just(h), st.integers(min_new, h))) for h in histories]
    else:
        new = [draw(st.integers(min_new, h)) for h in histories]
    targets = draw(st.lists(st.integers(0, max_targets), min_size=b, max_size=b))
    if sum(new) + sum(targets) == 0:
        targets[0] = 1
    return histories, new, targets
