"""Backend "cutedsl-blackwell": the tcgen05 + TMA HSTU kernel (``cutedsl/blackwell.py``).

The default on B200/B300 (sm_100/sm_103) for what it serves: jagged and paged (delta) HSTU
attention in bf16/fp16, head dims 64 and 128, pages of exactly 128 tokens (one page = one
128-key tile), causal + targets (no contexts/window: declared, so the dispatcher routes such
calls elsewhere), no ``append_kv``. Everything else on those archs goes to the warp-MMA DSL
kernel (``cutedsl-ampere``) or Triton, and ``explain()`` names the reason (head dim / page
size / mask features not served here).

Compiled for sm_100a/sm_103a in CI; never run by this project (no B200 was available):
``bench/NOTES-blackwell.md`` lists what is unverified and the one command that validates it.

The DSL is imported only when a call needs the kernel: backend discovery imports this module
on every machine, with or without the DSL.
"""

from __future__ import annotations

import torch

from hstu_kernels.dispatch import Backend, register

ARCHS = frozenset({"sm_100", "sm_103"})
HEAD_DIMS = frozenset({64, 128})
PAGE_SIZES = frozenset({128})
PRIORITY = 40  # above cutedsl-ampere (10) and Triton (20 at most) on its archs


def _probe(arch: str) -> str | None:
    if arch not in ARCHS:
        return f"arch {arch} not supported (tcgen05 needs sm_100/sm_103)"
    from hstu_kernels.backends.cutedsl.compile import dsl_available

    return dsl_available()


def _check_aligned(name: str, t: torch.Tensor) -> None:
    # TMA descriptors need 16-byte aligned bases; a view with an odd offset would fault.
    if t.data_ptr() % 16:
        raise ValueError(f"{name}: expected a 16-byte aligned data pointer (got a view?)")


def _refuse_features(spec) -> None:
    if spec.num_contexts or spec.max_attn_len:
        raise ValueError(
            "cutedsl-blackwell: num_contexts/max_attn_len are not supported (use backend='auto')"
        )


def _jagged(q, k, v, cu_seqlens, num_targets, max_seqlen, spec, out):
    from hstu_kernels.backends.cutedsl import blackwell
    from hstu_kernels.dispatch import device_arch

    _refuse_features(spec)
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        _check_aligned(name, t)
    if q.shape[0] == 0:
        return
    fn = blackwell.get_kernel(device_arch(q.device), q.dtype, q.shape[2], paged=False)
    fn(
        q, k, v, out, cu_seqlens, num_targets, int(max_seqlen),
        float(spec.alpha), 1.0 / float(spec.scaling_seqlen),
    )  # fmt: skip


def _paged(
    q, k_new, v_new, kv_cache, page_table, cu_seqlens_q, num_targets, max_seqlen_q, spec, out
):
    from hstu_kernels.backends.cutedsl import blackwell
    from hstu_kernels.dispatch import device_arch

    _refuse_features(spec)
    if kv_cache.shape[2] != blackwell.PAGE_SIZE:
        raise ValueError(
            f"kv_cache: cutedsl-blackwell takes pages of {blackwell.PAGE_SIZE} tokens, "
            f"got {kv_cache.shape[2]}"
        )
    for name, t in (("q", q), ("k_new", k_new), ("v_new", v_new), ("kv_cache", kv_cache),
                    ("out", out)):  # fmt: skip
        _check_aligned(name, t)
    if q.shape[0] == 0:
        return
    fn = blackwell.get_kernel(device_arch(q.device), q.dtype, q.shape[2], paged=True)
    fn(
        q, k_new, v_new, kv_cache, out, cu_seqlens_q, num_targets,
        page_table.page_indptr, page_table.page_ids, page_table.last_page_len,
        int(max_seqlen_q), float(spec.alpha), 1.0 / float(spec.scaling_seqlen),
    )  # fmt: skip


register(
    Backend(
        name="cutedsl-blackwell",
        ops={"jagged": _jagged, "paged": _paged},
        dtypes=frozenset({torch.bfloat16, torch.float16}),
        archs=ARCHS,
        head_dims=HEAD_DIMS,
        page_sizes=PAGE_SIZES,
        features=frozenset(),
        priority={"sm_100": PRIORITY, "sm_103": PRIORITY, "*": 0},
        probe=_probe,
        description="CuTe DSL tcgen05 MMA + TMA, warp-specialized (sm_100a/sm_103a); "
        "compiled in CI, not yet run on a B200",
    )
)
