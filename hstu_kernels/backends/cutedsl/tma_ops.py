"""The ``jagged``/``paged`` ops and planners of the TMA DSL backends (``cutedsl-blackwell``,
``cutedsl-hopper``): argument checks, then the kernel module's compiled variant.

Importable without the DSL (the registration modules import it on every machine): the kernel
module is imported when a call is first planned.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hstu_kernels.types import PlannedBatch

__all__ = ["make_ops"]

# split_kv(device, batch, heads, max_seqlen_q, mean_pages, window) -> (splits, chunk_tiles, tiles)
SplitKV = Callable[[torch.device, int, int, int, "int | None", int], tuple[int, int, int]]


def make_ops(
    backend: str,
    family: str,
    split_kv: SplitKV | None = None,
    mask_features: bool = False,
) -> tuple[dict[str, Callable], dict[str, Callable]]:
    """``(ops, planners)`` for a backend running the TMA kernel ``family`` (``"hopper"``,
    ``"blackwell"``: :mod:`tma_variants`); the paged op takes pages of exactly that family's
    page size (one page per key tile).

    ``split_kv(device, batch, heads, max_seqlen_q, mean_pages, window)``, if given, is the
    kernel's split-KV choice ``(splits, chunk_tiles, tiles)``: the kernel then takes
    ``partials, tickets, chunk_tiles, unsummed`` after ``inv_scaling``; ``mean_pages`` is the
    mean cached history in pages (from shapes only, no sync), ``None`` for the jagged op (its
    key range is ``max_seqlen_q``); ``window`` is the window W bounding every q-tile's key range
    (0: none). With it there is a ``paged_partials`` op too (the fp32 partials of a
    split call, unsummed, else the output).

    ``mask_features``: the kernel has contexts/window (a ``windowed`` variant for calls with
    them) and takes ``num_contexts, max_attn_len`` after the split-KV arguments; without it
    such calls are refused."""
    from hstu_kernels.backends.cutedsl import compile as cc
    from hstu_kernels.backends.cutedsl import tma_variants

    page_size = tma_variants.FAMILIES[family][2]

    def windowed(b: PlannedBatch) -> bool:
        return bool(b.spec.num_contexts or b.spec.max_attn_len)

    def kernel(b: PlannedBatch, paged: bool):
        from hstu_kernels.dispatch import device_arch

        return tma_variants.get_kernel(family, device_arch(b.device), b.dtype, b.head_dim,
                                       paged=paged, windowed=windowed(b))  # fmt: skip

    def split_args(b: PlannedBatch, mean_pages: int | None, unsummed: bool):
        """``(run-time partials shape or None, fixed args after inv_scaling)``."""
        mask = (int(b.spec.num_contexts), int(b.spec.max_attn_len)) if mask_features else ()
        if split_kv is None:
            return None, mask
        # A window without contexts bounds every q-tile's key range (contexts do not: their
        # q-tiles walk the whole history).
        window = 0 if b.spec.num_contexts else int(b.spec.max_attn_len)
        splits, chunk_tiles, tiles = split_kv(b.device, b.batch, b.heads, b.max_seqlen,
                                              mean_pages, window)  # fmt: skip
        ticket_dummy = torch.empty((1,), dtype=torch.int32, device=b.device)
        if splits == 1:
            stand_in = torch.empty((1, 1, 1, b.head_dim), dtype=torch.float32, device=b.device)
            return None, (stand_in, ticket_dummy, 0, 0, *mask)
        # The plan owns the tickets; each run zeroes them (``run_split`` below) rather than
        # trusting the previous launch to have left them at zero.
        tickets = ticket_dummy if unsummed else torch.zeros((tiles,), dtype=torch.int32,
                                                            device=b.device)  # fmt: skip
        return splits, (None, tickets, chunk_tiles, int(unsummed), *mask)

    def run_split(fn, splits: int, extra: tuple, q: torch.Tensor, *args) -> torch.Tensor:
        """Launch a split call: fresh fp32 partials, the tickets zeroed; returns the
        partials."""
        partials = torch.empty((splits, *q.shape), dtype=torch.float32, device=q.device)
        tickets = extra[1]
        if not extra[3]:
            tickets.zero_()
        fn(*args, partials, *extra[1:])
        return partials

    def refuse(b: PlannedBatch) -> None:
        if not mask_features:
            cc.refuse_mask_features(backend, b.spec)

    def plan_jagged(b: PlannedBatch) -> Callable:
        refuse(b)
        fn = kernel(b, paged=False)
        splits, extra = split_args(b, None, False)
        scalars = (int(b.max_seqlen), float(b.spec.alpha), 1.0 / float(b.spec.scaling_seqlen))
        meta = (b.cu_seqlens, b.num_targets)

        def run(q, k, v, out) -> None:
            for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
                if t.data_ptr() % 16:
                    cc.check_tma_aligned(name, t)
            if q.shape[0] == 0:
                return
            if splits is None:
                fn(q, k, v, out, *meta, *scalars, *extra)
            else:
                run_split(fn, splits, extra, q, q, k, v, out, *meta, *scalars)

        return run

    def plan_paged_launch(b: PlannedBatch, unsummed: bool) -> Callable:
        refuse(b)
        if b.page_size != page_size:
            raise ValueError(
                f"kv_cache: {backend} takes pages of {page_size} tokens, got {b.page_size}"
            )
        fn = kernel(b, paged=True)
        pt = b.page_table
        mean_pages = max(1, pt.page_ids.numel() // max(b.batch, 1))
        splits, extra = split_args(b, mean_pages, unsummed)
        meta = (b.cu_seqlens, b.num_targets, pt.page_indptr, pt.page_ids, pt.last_page_len)
        scalars = (int(b.max_seqlen), float(b.spec.alpha), 1.0 / float(b.spec.scaling_seqlen))

        def run(q, k_new, v_new, kv_cache, out) -> torch.Tensor | None:
            """Returns the unsummed partials of a split (``unsummed``), else ``None``."""
            for name, t in (("q", q), ("k_new", k_new), ("v_new", v_new),
                            ("kv_cache", kv_cache), ("out", out)):  # fmt: skip
                if t.data_ptr() % 16:
                    cc.check_tma_aligned(name, t)
            if q.shape[0] == 0:
                return None
            if splits is None:
                fn(q, k_new, v_new, kv_cache, out, *meta, *scalars, *extra)
                return None
            partials = run_split(fn, splits, extra, q, q, k_new, v_new, kv_cache, out, *meta,
                                 *scalars)  # fmt: skip
            return partials if unsummed else None

        return run

    def plan_paged(b: PlannedBatch) -> Callable:
        return plan_paged_launch(b, unsummed=False)

    def plan_paged_partials(b: PlannedBatch) -> Callable:
        launch = plan_paged_launch(b, unsummed=True)

        def run(q, k_new, v_new, kv_cache) -> torch.Tensor:
            out = torch.empty_like(q)
            partials = launch(q, k_new, v_new, kv_cache, out)
            return out if partials is None else partials

        return run

    def batch_of(op, q, cu, nt, max_seqlen, spec, page_table=None, kv_cache=None):
        return PlannedBatch(
            op, q.device, q.dtype, q.shape[1], q.shape[2], cu.shape[0] - 1, q.shape[0], cu, nt,
            int(max_seqlen), spec, page_table, None if kv_cache is None else kv_cache.shape[2],
        )  # fmt: skip

    def jagged(q, k, v, cu_seqlens, num_targets, max_seqlen, spec, out):
        plan_jagged(batch_of("jagged", q, cu_seqlens, num_targets, max_seqlen, spec))(q, k, v, out)

    def paged(q, k_new, v_new, kv_cache, page_table, cu_seqlens_q, num_targets, max_seqlen_q,
              spec, out):  # fmt: skip
        b = batch_of("paged", q, cu_seqlens_q, num_targets, max_seqlen_q, spec, page_table,
                     kv_cache)  # fmt: skip
        plan_paged(b)(q, k_new, v_new, kv_cache, out)

    def paged_partials(q, k_new, v_new, kv_cache, page_table, cu_seqlens_q, num_targets,
                       max_seqlen_q, spec):  # fmt: skip
        b = batch_of("paged", q, cu_seqlens_q, num_targets, max_seqlen_q, spec, page_table,
                     kv_cache)  # fmt: skip
        return plan_paged_partials(b)(q, k_new, v_new, kv_cache)

    ops = {"jagged": jagged, "paged": paged}
    planners = {"jagged": plan_jagged, "paged": plan_paged}
    if split_kv is not None:
        ops["paged_partials"] = paged_partials
        planners["paged_partials"] = plan_paged_partials
    return ops, planners
