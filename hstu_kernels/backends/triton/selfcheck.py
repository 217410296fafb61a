"""One pass over every Triton kernel path on the GPU, checked against the reference.

``python -m hstu_kernels.backends.triton.selfcheck``: append_kv, paged attention (one page per
tile, several pages per tile, the split-KV path) and jagged attention, on odd lengths, with
outputs poisoned first. Small and quick, so it can run under
``compute-sanitizer --tool memcheck``.
"""

from __future__ import annotations

import torch

import hstu_kernels as hk
from hstu_kernels import reference
from hstu_kernels.backends.triton.attention import launch
from hstu_kernels.backends.triton.config import Config
from hstu_kernels.testing import assert_hstu_close, make_paged_case, poisoned_like


def main() -> None:
    dtype = torch.bfloat16
    for page_size, head_dim, batch in ((32, 256, 4), (16, 128, 1), (128, 64, 3)):
        c = make_paged_case(
            [300, 1, 77, 64][:batch], [40, 1, 77, 3][:batch], [16, 0, 3, 5][:batch],
            page_size=page_size, heads=2, head_dim=head_dim, device="cuda", seed=page_size,
        )  # fmt: skip
        q, k, v = (t.to(dtype) for t in (c.q, c.k_new, c.v_new))
        kv = torch.full_like(c.kv_cache, float("nan"), dtype=dtype)
        expected = kv.clone()
        reference.append_kv(expected, c.page_table, k, v, c.cu_q, c.num_targets)
        hk.append_kv(kv, c.page_table, k, v, c.cu_q, num_targets=c.num_targets, backend="triton")
        assert torch.equal(kv.nan_to_num(0.0), expected.nan_to_num(0.0)), "append_kv"
        kv = c.kv_cache.to(dtype)
        out = hk.paged_hstu_attention(
            q, k, v, kv, c.page_table, c.cu_q, num_targets=c.num_targets,
            scaling_seqlen=c.max_total, backend="triton", out=poisoned_like(q),
        )  # fmt: skip
        ref32 = c.reference_full(torch.float32)
        ref_lowp = c.reference_full(dtype)
        assert_hstu_close(out, ref32[c.rows], ref_lowp[c.rows])
        out = poisoned_like(q)  # the unsplit path too (small grids split by default)
        spec = c.spec()
        max_q = int((c.cu_q[1:] - c.cu_q[:-1]).max())
        launch(q, k, v, c.cu_q, c.num_targets, max_q, spec.alpha, spec.scaling_seqlen, out,
               Config(64, 64, 4, 2, splits=1), kv_cache=kv, page_table=c.page_table)  # fmt: skip
        assert_hstu_close(out, ref32[c.rows], ref_lowp[c.rows])
        qf, kf, vf = (t.to(dtype) for t in (c.q_full, c.k_full, c.v_full))
        out = hk.hstu_attention(
            qf, kf, vf, c.cu_full, num_targets=c.num_targets, backend="triton",
            out=poisoned_like(qf),
        )  # fmt: skip
        assert_hstu_close(out, ref32, ref_lowp)
        print(f"page_size={page_size} head_dim={head_dim} batch={batch}: ok", flush=True)
    torch.cuda.synchronize()
    print("selfcheck passed")


if __name__ == "__main__":
    main()
