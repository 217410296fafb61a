"""Backend "cutedsl-hopper": the warp-specialised wgmma + TMA HSTU kernel (``cutedsl/hopper.py``).

Serves jagged and paged (delta) HSTU attention on sm_90 in bf16/fp16, head dims 64/128/256,
pages of exactly 32 tokens (one page = one 32-key tile), causal + targets (no contexts/window),
no ``append_kv``.

Status: compiled for sm_90a in CI (tests/test_cutedsl_hopper.py); NOT YET RUN on a GPU. Its
priority is below every other backend's, so ``backend="auto"`` never picks it; it runs only
when forced (``backend="cutedsl-hopper"`` or ``HSTU_KERNELS_BACKEND``), which is what its GPU
tests and the next measurements do. Plan and expectations: ``bench/NOTES-hopper.md``.

The DSL is imported only when a call needs the kernel.
"""

from __future__ import annotations

import torch

from hstu_kernels.backends.cutedsl.tma_ops import make_ops
from hstu_kernels.dispatch import Backend, register

NAME = "cutedsl-hopper"
ARCHS = frozenset({"sm_90"})
HEAD_DIMS = frozenset({64, 128, 256})
PAGE_SIZE = 32  # one page = one key tile
PAGE_SIZES = frozenset({PAGE_SIZE})
PRIORITY = -20  # forced only until measured (below the reference's 0)


def _probe(arch: str) -> str | None:
    if arch not in ARCHS:
        return f"arch {arch} not supported (wgmma needs sm_90)"
    from hstu_kernels.backends.cutedsl.compile import dsl_available

    return dsl_available()


_jagged, _paged = make_ops(NAME, "hstu_kernels.backends.cutedsl.hopper", page_size=PAGE_SIZE)


register(
    Backend(
        name=NAME,
        ops={"jagged": _jagged, "paged": _paged},
        dtypes=frozenset({torch.bfloat16, torch.float16}),
        archs=ARCHS,
        head_dims=HEAD_DIMS,
        page_sizes=PAGE_SIZES,
        features=frozenset(),
        priority={"*": PRIORITY},
        probe=_probe,
        description="CuTe DSL wgmma + TMA, warp-specialized (sm_90a); compiled in CI, not yet "
        "run on a GPU, so only used when forced",
    )
)
