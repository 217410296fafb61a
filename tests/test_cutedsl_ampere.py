"""GPU tests of the "cutedsl-ampere" backend against the PyTorch reference.

Hypothesis draws batches with odd lengths (page and tile edges, one-token histories, zero
targets) and checks the DESIGN.md §5 tolerance on poisoned outputs, in bf16 and fp16. The
variants (dtype, head dim, page size) come from a short list: each one is a separate compile
(seconds), so the list covers every head dim, both dtypes, pages smaller than, equal to and
larger than the 64-key tile, and both ops. Skipped without a GPU or without the DSL.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import batches as shared_batches

import hstu_kernels as hk
from hstu_kernels import settings as hk_settings
from hstu_kernels.testing import (
    PagedCase,
    assert_hstu_close,
    check_jagged_backend,
    check_paged_backend,
    make_paged_case,
    poisoned_like,
)

pytest.importorskip("cutlass.cute")

pytestmark = pytest.mark.gpu
BACKEND = "cutedsl-ampere"
# Split-KV factor: "" = the backend's own choice (small test batches mostly split), "1" = the
# single-pass kernel, "3" = three KV chunks summed.
SPLITS = ["", "1", "3"]


def forced_splits(value: str):
    """The DSL kernels' split-KV factor forced to ``value`` ("": chosen per grid)."""
    return hk_settings.override(cutedsl_splits=int(value) if value else None)


PAGED_VARIANTS = [
    (torch.bfloat16, 128, 16),
    (torch.bfloat16, 128, 32),
    (torch.float16, 64, 256),
    (torch.bfloat16, 256, 64),
    (torch.float16, 128, 128),
]
JAGGED_VARIANTS = [
    (torch.bfloat16, 64),
    (torch.bfloat16, 128),
    (torch.float16, 128),
    (torch.bfloat16, 256),
]


def batches(max_history: int = 300, max_targets: int = 150, max_batch: int = 4):
    return shared_batches(max_history, max_targets, max_batch)


def _case(shape, page_size: int, heads: int, head_dim: int, seed: int) -> PagedCase:
    histories, new, targets = shape
    return make_paged_case(
        histories, new, targets, page_size=page_size, heads=heads, head_dim=head_dim,
        dtype=torch.float32, device="cuda", seed=seed,
    )  # fmt: skip


def check_paged(case: PagedCase, dtype: torch.dtype) -> None:
    check_paged_backend(case, dtype, BACKEND)


def check_jagged(case: PagedCase, dtype: torch.dtype) -> None:
    check_jagged_backend(case, dtype, BACKEND)


@given(
    shape=batches(),
    variant=st.sampled_from(PAGED_VARIANTS),
    heads=st.integers(1, 3),
    splits=st.sampled_from(SPLITS),
    seed=st.integers(0, 2**16),
)
def test_paged_parity(shape, variant, heads, splits, seed):
    dtype, head_dim, page_size = variant
    with forced_splits(splits):
        check_paged(_case(shape, page_size, heads, head_dim, seed), dtype)


@given(
    shape=batches(),
    variant=st.sampled_from(JAGGED_VARIANTS),
    heads=st.integers(1, 3),
    splits=st.sampled_from(SPLITS),
    seed=st.integers(0, 2**16),
)
def test_jagged_parity(shape, variant, heads, splits, seed):
    dtype, head_dim = variant
    with forced_splits(splits):
        check_jagged(_case(shape, 32, heads, head_dim, seed), dtype)


@pytest.mark.parametrize("splits", ["1", "3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_edges(dtype, splits):
    """Fixed edge cases: one-token history, zero targets, lengths on and one past tile edges."""
    shape = ([1, 64, 65, 128, 129, 200], [1, 64, 1, 128, 2, 77], [0, 0, 63, 64, 1, 129])
    with forced_splits(splits):
        check_paged(_case(shape, 32, 2, 128, 7), dtype)
        check_jagged(_case(shape, 32, 2, 128, 7), dtype)


def test_refuses_contexts():
    case = _case(([40], [40], [3]), 32, 1, 128, 0)
    q = case.q_full.to(torch.bfloat16)
    with pytest.raises(ValueError, match="contexts"):
        hk.hstu_attention(q, q, q, case.cu_full, num_targets=case.num_targets, num_contexts=2,
                          backend=BACKEND)  # fmt: skip


@pytest.mark.parametrize("splits", ["1", "3"])
def test_cuda_graph_capture_and_replay(splits):
    """Captured once, replayed on new inputs copied into the same buffers (the split-KV path
    allocates its workspace and sums it inside the graph)."""
    dtype = torch.bfloat16
    case = _case(([300, 77], [20, 77], [40, 5]), 32, 2, 128, 1)
    q, k_new, v_new, kv = (t.to(dtype) for t in (case.q, case.k_new, case.v_new, case.kv_cache))
    out = poisoned_like(q)
    max_q = max(n + t for n, t in zip(case.new, case.targets, strict=True))

    def call():
        hk.paged_hstu_attention(
            q, k_new, v_new, kv, case.page_table, case.cu_q, num_targets=case.num_targets,
            scaling_seqlen=case.max_total, max_seqlen_q=max_q, validate=False,
            backend=BACKEND, out=out,
        )  # fmt: skip

    with forced_splits(splits):
        call()  # compile + warm up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
    # New values in the same buffers; the graph must compute on them.
    other = _case(([300, 77], [20, 77], [40, 5]), 32, 2, 128, 2)
    for dst, src in (
        (q, other.q),
        (k_new, other.k_new),
        (v_new, other.v_new),
        (kv, other.kv_cache),
    ):
        dst.copy_(src.to(dtype))
    case.page_table.page_ids.copy_(other.page_table.page_ids)  # read at replay time too
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref32 = other.reference_full(torch.float32)[other.rows]
    assert_hstu_close(out, ref32, other.reference_full(dtype)[other.rows])
