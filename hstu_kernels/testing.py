"""Helpers for testing and benchmarking backends against the reference.

A :class:`PagedCase` holds one random batch in two forms: whole jagged sequences (for
``hstu_attention``) and the paged/delta form (cache + new rows, for ``paged_hstu_attention``),
so that the parity invariant of DESIGN.md §1 can be checked on any backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hstu_kernels import reference
from hstu_kernels.types import AttentionSpec, PageTable

__all__ = ["PagedCase", "assert_hstu_close", "hstu_tolerance", "make_paged_case", "poisoned_like"]


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``t`` filled with NaN, so an element a kernel forgets stays NaN."""
    return torch.full_like(t, float("nan"))


def hstu_tolerance(ref32: torch.Tensor, ref_lowp: torch.Tensor, eps: float = 1e-5) -> float:
    """DESIGN.md §5: ``2 * max|ref_lowp - ref32| + eps`` (eps scaled by the output's size)."""
    scale = max(1.0, ref32.float().abs().max().item())
    return 2 * (ref_lowp.float() - ref32.float()).abs().max().item() + eps * scale


def assert_hstu_close(
    out: torch.Tensor, ref32: torch.Tensor, ref_lowp: torch.Tensor, eps: float = 1e-5
) -> None:
    """``max|out - ref32| <= 2 * max|ref_lowp - ref32| + eps``, and every element finite."""
    assert out.shape == ref32.shape, (out.shape, ref32.shape)
    if out.numel() == 0:
        return
    finite = torch.isfinite(out)
    if not finite.all():
        bad = (~finite).nonzero()[:5].tolist()
        raise AssertionError(f"{int((~finite).sum())} non-finite output elements, first {bad}")
    err = (out.float() - ref32.float()).abs().max().item()
    tol = hstu_tolerance(ref32, ref_lowp, eps)
    assert err <= tol, f"max error {err:.3g} > tolerance {tol:.3g}"


@dataclass
class PagedCase:
    """One random batch, whole (jagged) and as cache + new rows (paged)."""

    histories: list[int]  # H_b
    new: list[int]  # N_b (new history rows)
    targets: list[int]  # T_b
    page_size: int
    # whole sequences: H_b + T_b rows each
    q_full: torch.Tensor
    k_full: torch.Tensor
    v_full: torch.Tensor
    cu_full: torch.Tensor
    # delta form: N_b + T_b rows each
    q: torch.Tensor
    k_new: torch.Tensor
    v_new: torch.Tensor
    cu_q: torch.Tensor
    num_targets: torch.Tensor
    kv_cache: torch.Tensor
    page_table: PageTable
    rows: torch.Tensor  # the rows of the whole packing that the delta rows are

    @property
    def max_total(self) -> int:
        return max(h + t for h, t in zip(self.histories, self.targets, strict=True))

    def spec(self, num_contexts: int = 0, max_attn_len: int = 0) -> AttentionSpec:
        head_dim = self.q.shape[-1]
        return AttentionSpec(head_dim**-0.5, self.max_total, num_contexts, max_attn_len)

    def reference_full(
        self, dtype: torch.dtype | None = None, num_contexts: int = 0, max_attn_len: int = 0
    ) -> torch.Tensor:
        """The reference jagged output over whole sequences, inputs cast to ``dtype``."""
        dtype = dtype or self.q.dtype
        q, k, v = (t.to(dtype) for t in (self.q_full, self.k_full, self.v_full))
        nt = self.num_targets
        return reference.jagged_hstu_attention(
            q, k, v, self.cu_full, nt, self.spec(num_contexts, max_attn_len)
        )


def make_paged_case(
    histories: Sequence[int],
    new: Sequence[int],
    targets: Sequence[int],
    *,
    page_size: int,
    heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    spare_pages: int = 3,
    fill_cache: bool = True,
) -> PagedCase:
    """Random q/k/v for whole sequences, and a shuffled paged cache holding their history.

    Cache slots that hold no history (unused pages, the tail of each last page) are NaN, so a
    kernel that reads past a sequence's history produces NaN. ``fill_cache=False`` leaves the
    whole cache NaN (for testing ``append_kv``).
    """
    batch = len(histories)
    if not (len(new) == len(targets) == batch):
        raise ValueError("histories, new and targets must have one entry per sequence")
    gen = torch.Generator().manual_seed(seed)
    lengths = [h + t for h, t in zip(histories, targets, strict=True)]
    total = sum(lengths)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    q_full, k_full, v_full = (randn(total, heads, head_dim) for _ in range(3))
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)

    rows = torch.cat(
        [
            torch.arange(s + h - n, s + h + t)
            for s, h, n, t in zip(starts[:-1], histories, new, targets, strict=True)
        ]
    ).to(device)
    q, k_new, v_new = (x[rows] for x in (q_full, k_full, v_full))
    cu_q = [0]
    for n, t in zip(new, targets, strict=True):
        cu_q.append(cu_q[-1] + n + t)

    pages_needed = [-(-h // page_size) for h in histories]
    num_pages = sum(pages_needed) + spare_pages
    perm = torch.randperm(num_pages, generator=gen).tolist()
    page_lists, i = [], 0
    for n in pages_needed:
        page_lists.append(perm[i : i + n])
        i += n
    kv_cache = torch.full(
        (num_pages, 2, page_size, heads, head_dim), float("nan"), dtype=dtype, device=device
    )
    if fill_cache:
        for b, plist in enumerate(page_lists):
            pos = torch.arange(histories[b], device=device)
            page = torch.tensor(plist, device=device)[pos // page_size]
            hist = slice(starts[b], starts[b] + histories[b])
            kv_cache[page, 0, pos % page_size] = k_full[hist]
            kv_cache[page, 1, pos % page_size] = v_full[hist]

    def i32(x: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(x), dtype=torch.int32, device=device)

    return PagedCase(
        histories=list(histories),
        new=list(new),
        targets=list(targets),
        page_size=page_size,
        q_full=q_full,
        k_full=k_full,
        v_full=v_full,
        cu_full=i32(starts),
        q=q,
        k_new=k_new,
        v_new=v_new,
        cu_q=i32(cu_q),
        num_targets=i32(targets),
        kv_cache=kv_cache,
        page_table=PageTable.from_lists(page_lists, histories, page_size, device),
        rows=rows,
    )


def fp8_pool(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An FP8 pool holding ``kv_cache`` quantised per token and head (:mod:`reference.fp8`),
    and its scales; slots that hold NaN (no history) stay NaN in both."""
    from hstu_kernels.reference import fp8

    x8, scales = fp8.quantize(kv_cache.float())
    unused = torch.isnan(kv_cache).any(dim=-1)
    return x8, scales.masked_fill(unused, float("nan"))


def check_paged_backend(
    case: PagedCase,
    dtype: torch.dtype,
    backend: str,
    num_contexts: int = 0,
    max_attn_len: int = 0,
    *,
    fp8: bool = False,
) -> None:
    """Run ``paged_hstu_attention`` on ``backend`` in ``dtype`` over ``case`` (output poisoned
    first) and assert the DESIGN.md §5 rule against the rows of the full jagged reference.

    ``fp8``: over an FP8 pool of the case's cache (:func:`fp8_pool`), against the paged
    reference over the same quantised pool (fp32: dequantised fp32 history; ``dtype``: rounded
    to ``dtype``, as a 16-bit kernel's matmuls take it)."""
    from hstu_kernels.ops import paged_hstu_attention

    mask = (num_contexts, max_attn_len)
    q, k_new, v_new = (t.to(dtype) for t in (case.q, case.k_new, case.v_new))
    if fp8:
        kv, scales = fp8_pool(case.kv_cache)

        def ref(t: torch.dtype) -> torch.Tensor:
            q, k, v = (x.to(t) for x in (case.q, case.k_new, case.v_new))
            return reference.paged_hstu_attention(
                q, k, v, kv, case.page_table, case.cu_q, case.num_targets, case.spec(*mask),
                scales,
            )  # fmt: skip

    else:
        kv, scales = case.kv_cache.to(dtype), None

        def ref(t: torch.dtype) -> torch.Tensor:
            return case.reference_full(t, *mask)[case.rows]

    out = paged_hstu_attention(
        q, k_new, v_new, kv, case.page_table, case.cu_q, num_targets=case.num_targets,
        scaling_seqlen=case.max_total, backend=backend, out=poisoned_like(q),
        num_contexts=num_contexts, max_attn_len=max_attn_len, kv_scales=scales,
    )  # fmt: skip
    assert_hstu_close(out, ref(torch.float32), ref(dtype))


def check_jagged_backend(
    case: PagedCase,
    dtype: torch.dtype,
    backend: str,
    num_contexts: int = 0,
    max_attn_len: int = 0,
) -> None:
    """Run ``hstu_attention`` on ``backend`` in ``dtype`` over the whole sequences of ``case``
    (output poisoned first) and assert the DESIGN.md §5 rule against the reference."""
    from hstu_kernels.ops import hstu_attention

    mask = (num_contexts, max_attn_len)
    q, k, v = (t.to(dtype) for t in (case.q_full, case.k_full, case.v_full))
    out = hstu_attention(
        q, k, v, case.cu_full, num_targets=case.num_targets, backend=backend,
        scaling_seqlen=case.max_total, out=poisoned_like(q), num_contexts=num_contexts,
        max_attn_len=max_attn_len,
    )  # fmt: skip
    assert_hstu_close(
        out, case.reference_full(torch.float32, *mask), case.reference_full(dtype, *mask)
    )


def check_all_target_jagged(backend: str, head_dim: int, device: str = "cuda") -> None:
    """A jagged batch whose first sequence has no history (every row a target, so no key
    tiles at all) and whose second has 3 targets: ``backend`` in bf16 against the reference
    (output poisoned first)."""
    from hstu_kernels.ops import hstu_attention

    g = torch.Generator(device=device).manual_seed(3)
    q, k, v = (torch.randn(47, 2, head_dim, device=device, generator=g) for _ in range(3))
    cu = torch.tensor([0, 4, 47], dtype=torch.int32, device=device)
    nt = torch.tensor([4, 3], dtype=torch.int32, device=device)
    lowp = [t.to(torch.bfloat16) for t in (q, k, v)]
    out = hstu_attention(*lowp, cu, num_targets=nt, backend=backend, out=poisoned_like(lowp[0]))
    ref32 = hstu_attention(q, k, v, cu, num_targets=nt, backend="reference")
    ref_lowp = hstu_attention(*lowp, cu, num_targets=nt, backend="reference")
    assert_hstu_close(out, ref32, ref_lowp)
