"""Backend "cutedsl-blackwell": the tcgen05 + TMA HSTU kernel (``cutedsl/blackwell.py``).

The default on B200/B300 (sm_100/sm_103) for what it serves: jagged and paged (delta) HSTU
attention in bf16/fp16, head dims 64 and 128, pages of exactly 128 tokens (one page = one
128-key tile), causal + targets (no contexts/window: declared, so the dispatcher routes such
calls elsewhere), no ``append_kv``. Everything else on those archs goes to the warp-MMA DSL
kernel (``cutedsl-ampere``) or Triton, and ``explain()`` names the reason (head dim / page
size / mask features not served here).

Compiled for sm_100a/sm_103a in CI; never run by this project (no B200 was available):
``docs/blackwell.md`` lists what is unverified and the one command that validates it.

The DSL is imported only when a call needs the kernel: backend discovery imports this module
on every machine, with or without the DSL.
"""

from __future__ import annotations

import torch

from hstu_kernels.backends.cutedsl.tma_ops import make_ops
from hstu_kernels.backends.cutedsl.tma_variants import BLACKWELL_PAGE_SIZE
from hstu_kernels.dispatch import Backend, register

ARCHS = frozenset({"sm_100", "sm_103"})
HEAD_DIMS = frozenset({64, 128})
PAGE_SIZE = BLACKWELL_PAGE_SIZE  # one page = one key tile
PAGE_SIZES = frozenset({PAGE_SIZE})
PRIORITY = 40  # above cutedsl-ampere (10) and Triton (20 at most) on its archs


def _probe(arch: str) -> str | None:
    if arch not in ARCHS:
        return f"arch {arch} not supported (tcgen05 needs sm_100/sm_103)"
    from hstu_kernels.backends.cutedsl.compile import dsl_available

    return dsl_available()


_OPS, _PLANNERS = make_ops("cutedsl-blackwell", "blackwell")


register(
    Backend(
        name="cutedsl-blackwell",
        ops=_OPS,
        planners=_PLANNERS,
        verified_archs=frozenset(),  # never run by this project: checked on first use
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
