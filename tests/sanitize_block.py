"""Every GPU kernel of the cached HSTU block, once each, small, for compute-sanitizer:

    compute-sanitizer --tool memcheck  python tests/sanitize_block.py
    compute-sanitizer --tool racecheck python tests/sanitize_block.py
    compute-sanitizer --tool memcheck  python tests/sanitize_block.py --only=block,triton

Runs the cached block (append or the projection's fused append, paged attention with and
without a KV split, the LayerNorm kernels summing split partials, the projection GEMMs) with
``backend="auto"`` and with each GPU attention backend forced, over odd lengths (a one-token
history, a sequence with no targets, page edges), checks the outputs against the reference
backend and prints one line per case. Exits non-zero on a mismatch; the sanitizer's own report
says whether any kernel touched memory it should not have.
"""

from __future__ import annotations

import sys

import torch

import hstu_kernels as hk
from hstu_kernels.dispatch import Request, device_arch, registry
from hstu_kernels.model.block import HSTUBlock
from hstu_kernels.testing import assert_hstu_close, make_paged_case

HEADS, HEAD_DIM, HIDDEN, PAGE = 2, 64, 128, 32
# ``python tests/sanitize_block.py cpu``: a dry run of the script itself (fp32 would be the
# CPU's dtype; bf16 on the reference is slow but works). ``--only block,triton``: only the
# block and the named backends' ops (to split a sanitizer run that would take too long).
_ARGS = [a for a in sys.argv[1:] if not a.startswith("--only")]
DEVICE = _ARGS[0] if _ARGS else "cuda"
_ONLY = next((a.split("=", 1)[1].split(",") for a in sys.argv[1:] if a.startswith("--only=")),
             None)  # fmt: skip


def wanted(part: str) -> bool:
    return _ONLY is None or part in _ONLY


# (cached, new, targets) per user of the block's two steps: page edges, a one-token history,
# no targets, a long one.
STEPS = [
    [(0, 1, 3), (0, 33, 0), (0, 64, 5)],
    [(1, 31, 2), (33, 1, 7), (64, 700, 0)],
]


def backends(op: str, head_dim: int, page_size: int | None) -> list[str]:
    """The GPU backends that serve ``op`` at this shape here (forced, every one runs)."""
    arch = device_arch(torch.device(DEVICE))
    names = []
    for name, b in registry().backends.items():
        if name == "reference" or b.probe(arch) is not None:
            continue
        req = Request(op, arch, torch.bfloat16, head_dim, page_size)
        if registry().explain(req, name).choice is not None:
            names.append(name)
    return names


def run_block() -> float:
    """The cached block with ``backend="auto"``: projection (fused append or separate),
    LayerNorms (summing split partials), append, attention, residual; against the reference
    block in fp32 and in bf16 (DESIGN.md §5)."""
    kw = dict(scaling_seqlen=1024, device=DEVICE, seed=3)
    blocks = [
        HSTUBlock(2, HIDDEN, HEADS, HEAD_DIM, backend=b, dtype=dt, **kw)
        for b, dt in (("auto", torch.bfloat16), ("reference", torch.float32),
                      ("reference", torch.bfloat16))
    ]  # fmt: skip
    caches = [b.make_cache(64, PAGE) for b in blocks]
    worst = 0.0
    for i, step in enumerate(STEPS):
        users = list(range(len(step)))
        outs = []
        for block, cache in zip(blocks, caches, strict=True):
            cached = [cache.cached_length(u) for u in users]
            assert cached == [c for c, _, _ in step], (cached, step)
            meta = cache.prepare(users, cached, [n for _, n, _ in step], [t for *_, t in step])
            gen = torch.Generator().manual_seed(i)
            x = torch.randn(meta.num_tokens, HIDDEN, generator=gen).to(DEVICE, block.dtype)
            outs.append(block.forward_cached(x, meta, cache).float())
        assert_hstu_close(*outs)
        worst = max(worst, (outs[0] - outs[1]).abs().max().item())
    return worst


def run_ops(backend: str, head_dim: int, shape: tuple) -> float:
    """``backend``'s paged and jagged attention (and append, where it has one) on one case,
    against the reference in fp32 and in bf16."""
    histories, new, targets = shape
    c = make_paged_case(histories, new, targets, page_size=PAGE, heads=HEADS, head_dim=head_dim,
                        dtype=torch.float32, device=DEVICE, seed=1)  # fmt: skip
    worst = 0.0
    nt = dict(num_targets=c.num_targets)

    def paged(b, dtype):
        q, k, v, kv = (t.to(dtype) for t in (c.q, c.k_new, c.v_new, c.kv_cache))
        return hk.paged_hstu_attention(q, k, v, kv, c.page_table, c.cu_q, backend=b, **nt)

    def jagged(b, dtype):
        q, k, v = (t.to(dtype) for t in (c.q_full, c.k_full, c.v_full))
        return hk.hstu_attention(q, k, v, c.cu_full, backend=b, **nt)

    bf16 = torch.bfloat16
    for op in (paged, jagged):
        got, ref32, lowp = op(backend, bf16), op("reference", torch.float32), op("reference", bf16)
        assert_hstu_close(got.float(), ref32, lowp.float())
        worst = max(worst, (got.float() - ref32).abs().max().item())
    if backend in backends("append_kv", head_dim, PAGE):
        pools = []
        for b in (backend, "reference"):
            e = make_paged_case(histories, new, targets, page_size=PAGE, heads=HEADS,
                                head_dim=head_dim, dtype=bf16, device=DEVICE, seed=1)  # fmt: skip
            hk.append_kv(e.kv_cache, e.page_table, e.k_new, e.v_new, e.cu_q, backend=b, **nt)
            pools.append(e.kv_cache.nan_to_num())
        assert torch.equal(pools[0], pools[1]), f"{backend}: append_kv differs"
    return worst


# (histories, new, targets): page edges, a one-token history, no targets; then a long history
# at batch 1 (small grids: split KV ranges).
SHAPES = [([1, 33, 64, 95], [1, 1, 32, 17], [3, 0, 5, 2]), ([1500], [40], [24])]


def main() -> int:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    if wanted("block"):
        print(f"sanitize_block: block auto  max |diff| vs reference {run_block():.4f}")
    for head_dim in (64, 128):
        for name in filter(wanted, backends("paged", head_dim, PAGE)):
            for shape in SHAPES:
                worst = run_ops(name, head_dim, shape)
                print(f"sanitize_block: {name:16s} D={head_dim} B={len(shape[0])} "
                      f"max |diff| {worst:.4f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
