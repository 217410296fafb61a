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
