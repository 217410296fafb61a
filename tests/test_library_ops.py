"""The torch.library registrations give the same results as the Python ops."""

from __future__ import annotations

import torch

import hstu_kernels as hk
from hstu_kernels.testing import make_paged_case


def test_custom_ops_match_python_ops():
    c = make_paged_case([40, 17], [8, 17], [3, 2], page_size=16, heads=2, head_dim=8, seed=5)
    pt = c.page_table
    paged_args = (c.q, c.k_new, c.v_new, c.kv_cache, pt.page_indptr, pt.page_ids, pt.last_page_len)
    paged_args += (c.cu_q, c.num_targets, 0, 0, 0.3, c.max_total, 20, "reference")
    out = torch.ops.hstu_kernels.paged_hstu_attention(*paged_args)
    expected = hk.paged_hstu_attention(
        c.q, c.k_new, c.v_new, c.kv_cache, pt, c.cu_q, num_targets=c.num_targets, alpha=0.3
    )
    assert torch.equal(out, expected)
    torch.library.opcheck(
        torch.ops.hstu_kernels.paged_hstu_attention.default,
        paged_args,
        test_utils=("test_schema", "test_faketensor"),
    )

    jagged_args = (c.q_full, c.k_full, c.v_full, c.cu_full, c.num_targets, 0, 3, 0.3, 99, 43)
    out = torch.ops.hstu_kernels.hstu_attention(*jagged_args, "reference")
    expected = hk.hstu_attention(
        c.q_full,
        c.k_full,
        c.v_full,
        c.cu_full,
        num_targets=c.num_targets,
        max_attn_len=3,
        alpha=0.3,
        scaling_seqlen=99,
    )
    assert torch.equal(out, expected)

    kv = torch.zeros_like(c.kv_cache)
    torch.ops.hstu_kernels.append_kv(
        kv,
        pt.page_indptr,
        pt.page_ids,
        pt.last_page_len,
        c.k_new,
        c.v_new,
        c.cu_q,
        c.num_targets,
        "reference",
        True,
        None,
    )
    expected = torch.zeros_like(c.kv_cache)
    hk.append_kv(expected, pt, c.k_new, c.v_new, c.cu_q, num_targets=c.num_targets)
    assert torch.equal(kv, expected) and kv.abs().sum() > 0
