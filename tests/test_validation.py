"""Every validation error of the public ops names the argument, what was expected and what came."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import hstu_kernels as hk
from hstu_kernels.testing import make_paged_case


@pytest.fixture
def case():
    return make_paged_case([40, 17], [8, 17], [3, 2], page_size=16, heads=2, head_dim=8, seed=0)


def paged_args(case):
    return dict(
        q=case.q,
        k_new=case.k_new,
        v_new=case.v_new,
        kv_cache=case.kv_cache,
        page_table=case.page_table,
        cu_seqlens_q=case.cu_q,
        num_targets=case.num_targets,
    )


def table(case, **changes):
    """The case's table with ``changes``, as a device table would reach an op: construction
    reads a CPU table's values, a device table's it does not, so the changed fields are set
    after construction to exercise the ops' own value checks."""
    t = case.page_table
    fields = dict(page_indptr=t.page_indptr, page_ids=t.page_ids, last_page_len=t.last_page_len)
    out = hk.PageTable(**fields)
    for name, value in changes.items():
        object.__setattr__(out, name, value)
    return out


def i32(*xs):
    return torch.tensor(xs, dtype=torch.int32)


PAGED_CASES = [
    # (name, change to the arguments, exception, message pattern)
    ("q not a tensor", lambda c: {"q": [1.0]}, TypeError, r"q: expected a torch\.Tensor, got list"),
    ("q int dtype", lambda c: {"q": c.q.int()}, TypeError, r"q: expected dtype .*got int32"),
    ("q 2-D", lambda c: {"q": c.q[:, 0]}, ValueError, r"q: expected 3 dimensions"),
    (
        "k shape",
        lambda c: {"k_new": c.k_new[1:]},
        ValueError,
        r"k_new: expected shape \(30, 2, 8\)",
    ),
    ("v dtype", lambda c: {"v_new": c.v_new.double()}, TypeError, r"v_new: expected dtype"),
    (
        "v device",
        lambda c: {"v_new": c.v_new.to("meta")},
        ValueError,
        r"v_new: expected a tensor on cpu, got one on meta",
    ),
    (
        "q not contiguous",
        lambda c: {"q": c.q.transpose(0, 1).contiguous().transpose(0, 1)},
        ValueError,
        r"q: expected a contiguous tensor",
    ),
    (
        "cu int64",
        lambda c: {"cu_seqlens_q": c.cu_q.long()},
        TypeError,
        r"cu_seqlens_q: expected dtype int32, got int64",
    ),
    (
        "cu too short",
        lambda c: {"cu_seqlens_q": i32(0)},
        ValueError,
        r"cu_seqlens_q: expected \[batch \+ 1\] >= 2",
    ),
    (
        "cu first",
        lambda c: {"cu_seqlens_q": i32(1, 11, 30)},
        ValueError,
        r"cu_seqlens_q\[0\] == 0, got 1",
    ),
    ("cu decreasing", lambda c: {"cu_seqlens_q": i32(0, 31, 30)}, ValueError, r"non-decreasing"),
    (
        "cu last",
        lambda c: {"cu_seqlens_q": i32(0, 11, 29)},
        ValueError,
        r"cu_seqlens_q\[-1\] == 30 .*got 29",
    ),
    (
        "targets shape",
        lambda c: {"num_targets": i32(1)},
        ValueError,
        r"num_targets: expected shape \[2\]",
    ),
    (
        "targets dtype",
        lambda c: {"num_targets": c.num_targets.long()},
        TypeError,
        r"num_targets: expected dtype int32",
    ),
    (
        "targets too many",
        lambda c: {"num_targets": i32(12, 2)},
        ValueError,
        r"num_targets\[0\] <= 11",
    ),
    (
        "targets negative",
        lambda c: {"num_targets": i32(-1, 2)},
        ValueError,
        r"num_targets: expected 0 <= num_targets\[0\]",
    ),
    (
        "cache dtype",
        lambda c: {"kv_cache": c.kv_cache.half()},
        TypeError,
        r"kv_cache: expected dtype float32 \(as q\) or float8_e4m3fn \(an FP8 pool\), got float16",
    ),
    (
        "cache not K/V",
        lambda c: {"kv_cache": c.kv_cache[:, :1].contiguous()},
        ValueError,
        r"kv_cache: expected \[num_pages, 2, page_size",
    ),
    (
        "cache heads",
        lambda c: {"kv_cache": c.kv_cache[..., :1, :].contiguous()},
        ValueError,
        r"kv_cache: expected heads, head_dim = \(2, 8\)",
    ),
    (
        "cache page size",
        lambda c: {"kv_cache": c.kv_cache[:, :, :12].contiguous()},
        ValueError,
        r"power-of-two page size, got 12",
    ),
    (
        "table type",
        lambda c: {"page_table": (1, 2, 3)},
        TypeError,
        r"page_table: expected a PageTable, got tuple",
    ),
    (
        "table batch",
        lambda c: {
            "page_table": table(
                c, page_indptr=i32(0, c.page_table.page_ids.shape[0]), last_page_len=i32(8)
            )
        },
        ValueError,
        r"page_table\.page_indptr: expected shape \[3\]",
    ),
    (
        "page id too big",
        lambda c: {"page_table": table(c, page_ids=c.page_table.page_ids + 100)},
        ValueError,
        r"page_table\.page_ids: expected ids in 0\.\.7",
    ),
    (
        "page id negative",
        lambda c: {"page_table": table(c, page_ids=c.page_table.page_ids - 5)},
        ValueError,
        r"page_table\.page_ids: expected ids in 0\.\.7",
    ),
    (
        "last page len 0",
        lambda c: {"page_table": table(c, last_page_len=i32(0, 1))},
        ValueError,
        r"last_page_len: expected 1\.\.16 \(page size\), got 0",
    ),
    (
        "last page len big",
        lambda c: {"page_table": table(c, last_page_len=i32(8, 17))},
        ValueError,
        r"last_page_len: expected 1\.\.16 \(page size\), got 17",
    ),
    (
        "indptr first",
        lambda c: {"page_table": table(c, page_indptr=i32(1, 3, 5))},
        ValueError,
        r"page_indptr: expected \[0\] == 0",
    ),
    (
        "zero pages",
        lambda c: {"page_table": table(c, page_indptr=i32(0, 0, 5))},
        ValueError,
        r"every sequence to own >= 1 page, sequence 0 owns 0",
    ),
    (
        "indptr end",
        lambda c: {"page_table": table(c, page_indptr=i32(0, 3, 4))},
        ValueError,
        r"page_indptr: expected \[-1\] == len\(page_ids\) = 5",
    ),
    (
        "new > history",
        lambda c: {
            "page_table": table(
                c,
                last_page_len=i32(8, 1),
                page_indptr=i32(0, 3, 4),
                page_ids=c.page_table.page_ids[:4].contiguous(),
            )
        },
        ValueError,
        r"17 new history rows but .* only 1 tokens",
    ),
    (
        "contexts negative",
        lambda c: {"num_contexts": -1},
        ValueError,
        r"num_contexts: expected >= 0, got -1",
    ),
    (
        "contexts type",
        lambda c: {"num_contexts": 1.5},
        TypeError,
        r"num_contexts: expected an int, got float",
    ),
    (
        "contexts > history",
        lambda c: {"num_contexts": 18},
        ValueError,
        r"num_contexts: .*sequence 1 has 17",
    ),
    ("window type", lambda c: {"max_attn_len": None}, TypeError, r"max_attn_len: expected an int"),
    ("alpha nan", lambda c: {"alpha": float("nan")}, TypeError, r"alpha: expected a finite float"),
    (
        "scaling 0",
        lambda c: {"scaling_seqlen": 0},
        ValueError,
        r"scaling_seqlen: expected a positive int",
    ),
    (
        "max_seqlen_q",
        lambda c: {"max_seqlen_q": -3},
        ValueError,
        r"max_seqlen_q: expected a positive int",
    ),
    (
        "out shape",
        lambda c: {"out": c.q[1:]},
        ValueError,
        r"out: expected shape \(30, 2, 8\) \(as q\)",
    ),
    ("out dtype", lambda c: {"out": c.q.half()}, TypeError, r"out: expected dtype float32"),
    ("unknown backend", lambda c: {"backend": "nope"}, hk.BackendError, r"nope: unknown backend"),
    (
        "page size the backend lacks",
        # a table that does not say its page size (one that does is refused: see below)
        lambda c: {"kv_cache": c.kv_cache[:, :, :8].contiguous(), "page_table": table(c)},
        hk.BackendError,
        r"reference: page size 8 not in \[16, 32, 64, 128, 256\]",
    ),
]


@pytest.mark.parametrize(
    "change,exc,pattern", [c[1:] for c in PAGED_CASES], ids=[c[0] for c in PAGED_CASES]
)
def test_paged_validation_errors(case, change, exc, pattern):
    args = paged_args(case)
    args.update(change(case))
    with pytest.raises(exc, match=pattern):
        hk.paged_hstu_attention(**args)


CPU_TABLE_CASES = [
    ("indptr first", dict(page_indptr=i32(1, 3, 5)), r"page_indptr: expected \[0\] == 0"),
    ("zero pages", dict(page_indptr=i32(0, 0, 5)), r"sequence 0 owns 0"),
    ("indptr end", dict(page_indptr=i32(0, 2, 4)), r"\[-1\] == len\(page_ids\) = 5"),
    ("page id negative", dict(page_ids=i32(1, 2, -5, 4, 5)), r"page_ids: expected ids >= 0"),
    ("last page len 0", dict(last_page_len=i32(0, 3)), r"last_page_len: expected 1\.\.16"),
    ("last page len big", dict(last_page_len=i32(3, 17)), r"last_page_len: expected 1\.\.16"),
]


@pytest.mark.parametrize(
    "fields,pattern", [c[1:] for c in CPU_TABLE_CASES], ids=[c[0] for c in CPU_TABLE_CASES]
)
def test_cpu_page_table_values_are_checked_at_construction(fields, pattern):
    good = dict(page_indptr=i32(0, 2, 5), page_ids=i32(1, 2, 3, 4, 5), last_page_len=i32(3, 9))
    hk.PageTable(**good, page_size=16)
    with pytest.raises(ValueError, match=pattern):
        hk.PageTable(**(good | fields), page_size=16)


def test_paged_valid_call_passes(case):
    out = hk.paged_hstu_attention(**paged_args(case))
    assert out.shape == case.q.shape and torch.isfinite(out).all()


def test_validate_false_skips_value_checks(case):
    bad = table(case, last_page_len=i32(8, 17))
    args = paged_args(case) | {"page_table": bad}
    with pytest.raises(ValueError, match="last_page_len"):
        hk.paged_hstu_attention(**args)
    # the structural checks still run with validate=False ...
    with pytest.raises(TypeError, match="q: expected dtype"):
        hk.paged_hstu_attention(**(args | {"q": case.q.int()}), validate=False)


JAGGED_CASES = [
    ("k shape", lambda c: {"k": c.k_full[1:]}, ValueError, r"k: expected shape"),
    ("cu last", lambda c: {"cu_seqlens": i32(0, 43, 61)}, ValueError, r"cu_seqlens\[-1\] == 62"),
    ("targets", lambda c: {"num_targets": i32(44, 0)}, ValueError, r"num_targets\[0\] <= 43"),
    ("window", lambda c: {"max_attn_len": -2}, ValueError, r"max_attn_len: expected >= 0"),
    ("max_seqlen", lambda c: {"max_seqlen": 0}, ValueError, r"max_seqlen: expected a positive int"),
]


@pytest.mark.parametrize(
    "change,exc,pattern", [c[1:] for c in JAGGED_CASES], ids=[c[0] for c in JAGGED_CASES]
)
def test_jagged_validation_errors(case, change, exc, pattern):
    args = dict(
        q=case.q_full,
        k=case.k_full,
        v=case.v_full,
        cu_seqlens=case.cu_full,
        num_targets=case.num_targets,
    )
    args.update(change(case))
    with pytest.raises(exc, match=pattern):
        hk.hstu_attention(**args)


APPEND_CASES = [
    ("k dtype", lambda c: {"k": c.k_new.half()}, TypeError, r"v: expected dtype float16 \(as k\)"),
    (
        "cache dtype",
        lambda c: {"kv_cache": c.kv_cache.half()},
        TypeError,
        r"kv_cache: expected dtype float32 \(as k\)",
    ),
    (
        "page id",
        lambda c: {"page_table": table(c, page_ids=c.page_table.page_ids + 50)},
        ValueError,
        r"page_ids: expected ids in 0\.\.7",
    ),
    ("cu", lambda c: {"cu_seqlens": i32(0, 11, 31)}, ValueError, r"cu_seqlens\[-1\] == 30"),
]


@pytest.mark.parametrize(
    "change,exc,pattern", [c[1:] for c in APPEND_CASES], ids=[c[0] for c in APPEND_CASES]
)
def test_append_validation_errors(case, change, exc, pattern):
    args = dict(
        kv_cache=case.kv_cache,
        page_table=case.page_table,
        k=case.k_new,
        v=case.v_new,
        cu_seqlens=case.cu_q,
        num_targets=case.num_targets,
    )
    args.update(change(case))
    before = case.kv_cache.clone()
    with pytest.raises(exc, match=pattern):
        hk.append_kv(**args)
    # a refused call writes nothing
    assert torch.equal(case.kv_cache.nan_to_num(7.0), before.nan_to_num(7.0))


def test_page_table_from_lists_errors():
    with pytest.raises(
        ValueError,
        match=re.escape("pages[0]: history of 40 tokens in pages of 16 needs 3 pages, got 2"),
    ):
        hk.PageTable.from_lists([[0, 1]], [40], 16)
    with pytest.raises(ValueError, match=r"history_lengths\[0\]: expected >= 1"):
        hk.PageTable.from_lists([[]], [0], 16)
    t = hk.PageTable.from_lists([[4, 2, 9], [0]], [40, 3], 16)
    assert t.page_indptr.tolist() == [0, 3, 4] and t.last_page_len.tolist() == [8, 3]
    assert t.history_lengths(16).tolist() == [40, 3]


def test_page_table_construction_errors(case):
    """A table is refused when built, not when first used: wrong dtype, inconsistent
    lengths, a page size that is not a power of two; and one built for another page size is
    refused by the ops."""
    t = case.page_table
    with pytest.raises(TypeError, match=r"page_table\.page_ids: expected dtype int32, got int64"):
        hk.PageTable(t.page_indptr, t.page_ids.long(), t.last_page_len)
    with pytest.raises(ValueError, match=r"page_table\.last_page_len: expected shape \[2\]"):
        hk.PageTable(t.page_indptr, t.page_ids, t.last_page_len[:1])
    with pytest.raises(TypeError, match=r"page_table\.page_indptr: expected a torch.Tensor"):
        hk.PageTable([0, 3, 5], t.page_ids, t.last_page_len)
    with pytest.raises(ValueError, match="page_size: expected a power-of-two int"):
        hk.PageTable(t.page_indptr, t.page_ids, t.last_page_len, page_size=24)
    for bad in (0, 24, 16.0, -16):
        with pytest.raises(ValueError, match="page_size: expected a power-of-two int"):
            hk.PageTable.from_lists([[0, 1]], [20], bad)
    for pages, lengths, pattern in (([[-1, 2]], [20], r"pages\[0\]: expected page ids"),
                                    ([[1.0, 2]], [20], r"pages\[0\]: expected page ids"),
                                    ([[1, 2]], [20.0], r"history_lengths\[0\]")):  # fmt: skip
        with pytest.raises(ValueError, match=pattern):
            hk.PageTable.from_lists(pages, lengths, 16)
    built32 = hk.PageTable(t.page_indptr, t.page_ids, t.last_page_len, page_size=32)
    with pytest.raises(ValueError, match="built for pages of 32 tokens, but the cache's pages"):
        hk.paged_hstu_attention(**(paged_args(case) | {"page_table": built32}))
    with pytest.raises(ValueError, match="built for pages of 32 tokens, but the cache's pages"):
        hk.append_kv(case.kv_cache, built32, case.k_new, case.v_new, case.cu_q,
                     num_targets=case.num_targets)  # fmt: skip


def test_append_refuses_a_page_two_sequences_would_share_for_writing():
    """Sequence 1's new tokens land in page 4, which sequence 0 also lists: refused (the
    append would overwrite sequence 0's K/V), nothing written. A page shared only for reading
    (a common prefix) is allowed, for the append and for attention."""
    heads, dim, ps = 1, 8, 16
    kv = torch.randn(8, 2, ps, heads, dim)
    k = torch.randn(6, heads, dim)
    cu, nt = i32(0, 3, 6), i32(1, 1)  # two new history rows each
    # seq 0: 20 tokens in pages [2, 4] (new: positions 18, 19 -> page 4)
    # seq 1: 20 tokens in pages [3, 4]: page 4 written by both
    bad = hk.PageTable.from_lists([[2, 4], [3, 4]], [20, 20], ps)
    before = kv.clone()
    for call in (
        lambda: hk.append_kv(kv, bad, k, k, cu, num_targets=nt),
        lambda: hk.plan_append_kv(
            bad, cu, nt, heads=heads, head_dim=dim, dtype=torch.float32, page_size=ps
        ).run(kv, k, k),
    ):
        with pytest.raises(ValueError, match="page 4 receives new tokens of sequence 0 but is "
                                             "also listed for sequence 1"):  # fmt: skip
            call()
    assert torch.equal(kv, before)
    # a shared prefix page 2, each sequence writing into its own last page: fine
    shared = hk.PageTable.from_lists([[2, 4], [2, 5]], [20, 20], ps)
    hk.append_kv(kv, shared, k, k, cu, num_targets=nt)
    q = torch.randn(6, heads, dim)
    out = hk.paged_hstu_attention(q, k, k, kv, shared, cu, num_targets=nt)
    assert torch.isfinite(out).all()


def test_out_sharing_memory_with_an_input_is_refused(case):
    args = paged_args(case)
    for name in ("q", "k_new", "v_new"):
        with pytest.raises(ValueError, match="out: must not share memory with"):
            hk.paged_hstu_attention(**args, out=args[name])
    q, k, v = case.q_full, case.k_full, case.v_full
    with pytest.raises(ValueError, match="out: must not share memory with k"):
        hk.hstu_attention(q, k, v, case.cu_full, num_targets=case.num_targets, out=k)
    with pytest.raises(TypeError, match="validate: expected a bool"):
        hk.paged_hstu_attention(**args, validate="yes")


VALUE_TYPE_CASES = [
    ("alpha nan", lambda: hk.AttentionSpec(float("nan"), 64), TypeError, r"alpha: expected a finite"),
    ("alpha str", lambda: hk.AttentionSpec("0.1", 64), TypeError, r"alpha: expected a finite"),
    ("scaling 0", lambda: hk.AttentionSpec(0.1, 0), ValueError, r"scaling_seqlen: expected an int >= 1"),
    ("contexts -1", lambda: hk.AttentionSpec(0.1, 8, -1), ValueError, r"num_contexts: expected"),
    ("window float", lambda: hk.AttentionSpec(0.1, 8, 0, 2.5), ValueError, r"max_attn_len: expected"),
    ("layout list", lambda: hk.BatchLayout([3], (0,)), TypeError, r"query_lengths: expected a tuple"),
    ("layout negative", lambda: hk.BatchLayout((3,), (-1,)), TypeError, r"num_targets: expected a tuple"),
    ("layout lengths", lambda: hk.BatchLayout((3, 4), (0,)), ValueError, r"num_targets: expected 2 entries"),
    ("layout histories", lambda: hk.BatchLayout((3,), (0,), (1, 2)), ValueError, r"history_lengths: expected 1"),
    ("layout id range", lambda: hk.BatchLayout((3,), (0,), (5,), (1,)), TypeError, r"page_id_range"),
    ("settings bool", lambda: hk.settings.Settings(fused_layernorm="no"), TypeError, r"fused_layernorm: expected a bool"),
    ("settings str", lambda: hk.settings.Settings(backend=3), TypeError, r"backend: expected a str"),
    ("settings path", lambda: hk.settings.Settings(tuning_cache=3), TypeError, r"tuning_cache: expected a path"),
    ("device xla", lambda: hk.PageTable.from_lists([[1]], [5], 16, device="xla"), ValueError, r"device: expected a cpu or cuda"),
    ("device int", lambda: hk.explain(device=0), TypeError, r"device: expected a torch.device"),
]  # fmt: skip


@pytest.mark.parametrize(
    "make,exc,pattern", [c[1:] for c in VALUE_TYPE_CASES], ids=[c[0] for c in VALUE_TYPE_CASES]
)
def test_value_types_and_settings_refuse_bad_fields(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make()


def test_settings_take_a_path_as_a_string():
    assert hk.settings.Settings(tuning_cache="/tmp/x").tuning_cache == Path("/tmp/x")
    assert hk.AttentionSpec(0.5, 64).features == frozenset()
    assert hk.BatchLayout((3, 4), (1, 0), (5, 6), (1, 2)).batch_size == 2
