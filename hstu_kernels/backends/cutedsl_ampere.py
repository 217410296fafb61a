"""Backend "cutedsl-ampere": the CuTe DSL warp-MMA HSTU kernel (``cutedsl/ampere.py``).

Serves jagged and paged (delta) HSTU attention in bf16/fp16, head dims 64/128/256, page sizes
16..256 on sm_80..sm_120. No contexts/window (declared: the dispatcher routes such calls
elsewhere), no ``append_kv``. The DSL is imported only when a call needs a kernel: this module
is imported by backend discovery on every machine, with or without the DSL.
"""

from __future__ import annotations

import torch

from hstu_kernels import settings
from hstu_kernels.dispatch import Backend, register, sm_count
from hstu_kernels.split_kv import choose_splits

ARCHS = frozenset({"sm_80", "sm_86", "sm_87", "sm_89", "sm_90", "sm_100", "sm_103", "sm_120"})


def _probe(arch: str) -> str | None:
    if arch not in ARCHS:
        return f"arch {arch} not supported"
    from hstu_kernels.backends.cutedsl.compile import dsl_available

    return dsl_available()


def _check(name: str, t: torch.Tensor) -> None:
    # The kernel copies 128-bit chunks; a view with an odd offset would fault.
    if t.data_ptr() % 16:
        raise ValueError(f"{name}: expected a 16-byte aligned data pointer (got a view?)")


def _refuse_features(spec) -> None:
    if spec.num_contexts or spec.max_attn_len:
        raise ValueError(
            "cutedsl-ampere: num_contexts/max_attn_len are not supported (use backend='auto')"
        )


_KERNELS: dict[tuple, tuple] = {}
_DUMMY_WS: dict[tuple, torch.Tensor] = {}


def _kernel(key: tuple) -> tuple:
    if key not in _KERNELS:  # one dict lookup per call once compiled/loaded
        from hstu_kernels.backends.cutedsl import ampere

        _KERNELS[key] = ampere.get_kernel(*key)
    return _KERNELS[key]


def num_splits(ctas: int, key_tiles: int, occupancy: int, sms: int) -> int:
    """Split-KV factor of the warp-MMA kernel (:func:`hstu_kernels.split_kv.choose_splits`,
    rule ``"share"``): fill the GPU when the q-tiles alone leave slots (``sms * occupancy``)
    idle; the split minimising a CTA's share of whole waves plus a small cost per split (the
    combine reads ``s`` fp32 partials), with at least 4 KV tiles per split."""
    return choose_splits(ctas, key_tiles, sms * occupancy, causal=False, rule="share")


def _launch(q, k, v, out, kv_cache, cu, num_targets, page_table, max_q, spec, paged: bool):
    from hstu_kernels.dispatch import device_arch

    _refuse_features(spec)
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out), ("kv_cache", kv_cache)):
        _check(name, t)
    if q.shape[0] == 0:
        return
    rows, heads, head_dim = q.shape
    page_size = kv_cache.shape[2] if paged else 0
    key = (device_arch(q.device), q.dtype, head_dim, page_size, paged)
    fn, cfg = _kernel(key)
    num_m_blocks = max(1, -(-int(max_q) // cfg.block_m))
    batch = num_targets.shape[0]
    forced = settings.get().cutedsl_splits
    if forced:
        splits = forced
    else:
        occupancy = 1 if cfg.num_threads > 128 else 2
        key_tiles = -(-int(spec.scaling_seqlen) // cfg.block_n)
        splits = num_splits(num_m_blocks * heads * batch, key_tiles, occupancy, sm_count(q.device))
    if paged:
        meta = (page_table.page_indptr, page_table.page_ids, page_table.last_page_len)
    else:
        meta = (cu, cu, cu)  # not read by the jagged variant
    scalars = (float(spec.alpha), 1.0 / float(spec.scaling_seqlen), num_m_blocks)
    if splits > 1:
        fn, _ = _kernel((*key, True))
        ws = torch.empty((splits, rows, heads, head_dim), dtype=torch.float32, device=q.device)
        fn(q, k, v, out, kv_cache, cu, num_targets, *meta, *scalars, ws, splits)
        out.copy_(ws.sum(dim=0))
        return
    dkey = (q.device, head_dim)
    if dkey not in _DUMMY_WS:
        _DUMMY_WS[dkey] = torch.zeros((1, 1, 1, head_dim), dtype=torch.float32, device=q.device)
    fn(q, k, v, out, kv_cache, cu, num_targets, *meta, *scalars, _DUMMY_WS[dkey], 1)


def _jagged(q, k, v, cu_seqlens, num_targets, max_seqlen, spec, out):
    # kv_cache is not read by the jagged variant; it takes any 1-D tensor of q's dtype.
    _launch(q, k, v, out, q.view(-1), cu_seqlens, num_targets, None, max_seqlen, spec, paged=False)


def _paged(
    q, k_new, v_new, kv_cache, page_table, cu_seqlens_q, num_targets, max_seqlen_q, spec, out
):
    _launch(
        q, k_new, v_new, out, kv_cache, cu_seqlens_q, num_targets, page_table, max_seqlen_q,
        spec, paged=True,
    )  # fmt: skip


register(
    Backend(
        name="cutedsl-ampere",
        ops={"jagged": _jagged, "paged": _paged},
        dtypes=frozenset({torch.bfloat16, torch.float16}),
        archs=ARCHS,
        head_dims=frozenset({64, 128, 256}),
        page_sizes=frozenset(2**i for i in range(4, 9)),
        features=frozenset(),
        # Set from measurements (docs/cutedsl.md); Triton registers 20 on its archs.
        priority={"*": 10},
        # Run by this project on H100s only: elsewhere its first auto use is checked.
        verified_archs=frozenset({"sm_90"}),
        probe=_probe,
        description="CuTe DSL warp-MMA (mma.sync m16n8k16 + cp.async + ldmatrix), sm80..sm120",
    )
)
