"""The ``jagged``/``paged`` op functions of the TMA DSL backends (``cutedsl-blackwell``,
``cutedsl-hopper``): argument checks, then the kernel module's compiled variant.

Importable without the DSL (the registration modules import it on every machine): the kernel
module is imported by the first call.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

__all__ = ["make_ops"]


def make_ops(
    backend: str,
    kernel_module: str,
    page_size: int,
    split_kv: Callable[..., tuple] | None = None,
) -> dict[str, Callable]:
    """The ``jagged`` and ``paged`` op functions calling ``kernel_module.get_kernel``; the
    paged one takes pages of exactly ``page_size`` tokens (one page per key tile).

    ``split_kv(q, batch, max_seqlen_q, mean_pages, unsummed)``, if given, returns the
    arguments the kernel takes after ``inv_scaling`` (the Hopper kernel's split-KV buffers,
    ``partials`` first); ``mean_pages``: the mean cached history in pages, from shapes only
    (no sync), or ``None`` for the jagged op (its key range is ``max_seqlen_q``). With it
    there is a ``paged_partials`` op too (the dispatcher's optional op: the fp32 partials of
    a split call, unsummed, else the output)."""
    from hstu_kernels.backends.cutedsl import compile as cc

    def kernel(q, paged: bool):
        from hstu_kernels.dispatch import device_arch

        mod = importlib.import_module(kernel_module)
        return mod.get_kernel(device_arch(q.device), q.dtype, q.shape[2], paged=paged)

    def jagged(q, k, v, cu_seqlens, num_targets, max_seqlen, spec, out):
        cc.refuse_mask_features(backend, spec)
        for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
            cc.check_tma_aligned(name, t)
        if q.shape[0] == 0:
            return
        batch = cu_seqlens.shape[0] - 1
        extra = () if split_kv is None else split_kv(q, batch, int(max_seqlen), None, False)
        kernel(q, paged=False)(
            q, k, v, out, cu_seqlens, num_targets, int(max_seqlen),
            float(spec.alpha), 1.0 / float(spec.scaling_seqlen), *extra,
        )  # fmt: skip

    def paged(
        q, k_new, v_new, kv_cache, page_table, cu_seqlens_q, num_targets, max_seqlen_q, spec, out,
        unsummed: bool = False,
    ):  # fmt: skip
        cc.refuse_mask_features(backend, spec)
        if kv_cache.shape[2] != page_size:
            raise ValueError(
                f"kv_cache: {backend} takes pages of {page_size} tokens, got {kv_cache.shape[2]}"
            )
        for name, t in (("q", q), ("k_new", k_new), ("v_new", v_new), ("kv_cache", kv_cache),
                        ("out", out)):  # fmt: skip
            cc.check_tma_aligned(name, t)
        if q.shape[0] == 0:
            return None
        batch = cu_seqlens_q.shape[0] - 1
        mean_pages = max(1, page_table.page_ids.numel() // batch)
        extra = ()
        if split_kv is not None:
            extra = split_kv(q, batch, int(max_seqlen_q), mean_pages, unsummed)
        kernel(q, paged=True)(
            q, k_new, v_new, kv_cache, out, cu_seqlens_q, num_targets,
            page_table.page_indptr, page_table.page_ids, page_table.last_page_len,
            int(max_seqlen_q), float(spec.alpha), 1.0 / float(spec.scaling_seqlen), *extra,
        )  # fmt: skip
        # split_kv's tuple: the partials first, the kernel's unsummed flag last (set only
        # for a split call)
        return extra[0] if extra and extra[-1] else None

    def paged_partials(*args):
        out = torch.empty_like(args[0])
        partials = paged(*args, out, unsummed=True)
        return out if partials is None else partials

    ops = {"jagged": jagged, "paged": paged}
    if split_kv is not None:
        ops["paged_partials"] = paged_partials
    return ops
