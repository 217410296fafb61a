"""Compile-only tests of the CuTe DSL layer (no GPU needed), and the arch-neutral helpers.

- The warp-MMA HSTU kernel compiles for sm_80, sm_89, sm_90a, sm_100a and sm_120a, and its PTX
  uses the instructions meant: ``mma.sync.aligned.m16n8k16``, ``cp.async`` and ``ldmatrix``.
  One variant per arch, compiled once per module (a compile takes a few seconds).
- The on-disk cache round-trips a compiled kernel (export, load in place of a compile).
- ``hstu_common``'s tile walk visits exactly the non-empty KV tiles of the HSTU mask, and its
  "full" tiles are the ones where the mask keeps every pair (checked against the reference
  mask, pure Python).
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from hstu_kernels.backends.cutedsl import hstu_common as hc
from hstu_kernels.reference.mask import hstu_mask

ARCHS = ["sm_80", "sm_89", "sm_90a", "sm_100a", "sm_120a"]


# ---------------------------------------------------------------- hstu_common (pure Python)


def _walk(p0, p1, history, total, block_n):
    count, n_a, n_b = hc.kv_tile_range(p0, p1, history, total, block_n)
    return [hc.kv_tile_at(i, n_a, n_b) for i in range(count)]


@pytest.mark.parametrize("block_m,block_n", [(128, 64), (64, 64), (16, 32)])
@pytest.mark.parametrize("history,targets", [(1, 0), (1, 5), (63, 1), (64, 64), (200, 37)])
def test_tile_walk_matches_mask(block_m, block_n, history, targets):
    total = history + targets
    mask = hstu_mask(history, total)
    for new in sorted({1, history // 2 or 1, history}):
        q_pos0 = history - new
        for p0 in range(q_pos0, total, block_m):
            p1 = min(p0 + block_m, total)
            visited = _walk(p0, p1, history, total, block_n)
            assert len(set(visited)) == len(visited), "a tile visited twice"
            for n in range(-(-total // block_n)):
                j0, j1 = n * block_n, (n + 1) * block_n
                kind = hc.classify_tile(p0, p1, j0, j1, history, total)
                sub = mask[p0:p1, j0 : min(j1, total)]
                assert kind == "empty" or bool(sub.any())
                assert (n in visited) == (kind != "empty"), (p0, p1, n, kind)
                if n in visited and hc.tile_is_full(n, block_n, p0, history):
                    assert kind == "full", (p0, p1, n)


@pytest.mark.parametrize("block_m,block_n", [(128, 64), (128, 32), (16, 16)])
@pytest.mark.parametrize(
    "history,targets,contexts,window",
    [(1, 0, 0, 1), (1, 3, 1, 0), (70, 5, 0, 1), (70, 5, 3, 16), (200, 37, 0, 40),
     (200, 37, 32, 0), (200, 0, 7, 300), (257, 9, 64, 64)],
)  # fmt: skip
def test_window_tile_walk_matches_mask(block_m, block_n, history, targets, contexts, window):
    """With contexts/window, a q-tile's history tiles ``[first, end)`` are exactly those with a
    kept pair, and a tile called full has every pair kept (the mask of DESIGN.md §1)."""
    total = history + targets
    mask = hstu_mask(history, total, contexts, window)[:, :history]
    for p in range(total):
        for j in range(history):
            assert bool(mask[p, j]) == hc.window_keep(p, j, history, contexts, window), (p, j)
    for new in sorted({1, history // 2 or 1, history}):
        for p0 in range(history - new, total, block_m):
            p1 = min(p0 + block_m, total)
            first, end = hc.window_tile_range(p0, p1, history, contexts, window, block_n)
            for n in range(-(-history // block_n)):
                sub = mask[p0:p1, n * block_n : (n + 1) * block_n]
                assert (first <= n < end) == bool(sub.any()), (p0, p1, n, first, end)
                full = hc.window_tile_is_full(n, block_n, p0, p1 - 1, history, contexts, window)
                if first <= n < end and full:
                    assert bool(sub.all()) and (n + 1) * block_n <= history, (p0, p1, n)


@pytest.mark.parametrize("num_m_blocks", [1, 2, 5, 34])
@pytest.mark.parametrize("contexts", [0, 1, 128, 129, 10_000])
def test_contexts_first_order(num_m_blocks, contexts):
    """The q-tiles with context rows launch first, then the rest longest first."""
    order = [hc.contexts_first(m, num_m_blocks, contexts, 128) for m in
             range(num_m_blocks - 1, -1, -1)]  # fmt: skip
    k = min(-(-contexts // 128), num_m_blocks)
    assert order == list(range(k)) + list(range(num_m_blocks - 1, k - 1, -1))


def test_sequence_info_paged_and_jagged():
    cu, nt = [0, 7, 12], [3, 0]
    jag = hc.sequence_info(1, cu, nt)
    assert (jag.q_start, jag.q_len, jag.q_pos0, jag.history, jag.total) == (7, 5, 0, 5, 5)
    # paged: sequence 0 has 3 pages of 16 with 5 in the last -> H = 37; 4 new rows + 3 targets
    info = hc.sequence_info(0, cu, nt, [0, 3, 4], [5, 16], page_size=16, paged=True)
    assert (info.history, info.total, info.q_pos0, info.page_base) == (37, 40, 33, 0)
    assert hc.page_slot(37 - 1, 16) == (2, 4)
    assert hc.kv_key_source(38, info, True) == (False, True, 0 + 38 - 33)


# ---------------------------------------------------------------- compile only (DSL)


@pytest.fixture(scope="module", params=ARCHS)
def ptx(request):
    pytest.importorskip("cutlass.cute")
    from hstu_kernels.backends.cutedsl import ampere
    from hstu_kernels.backends.cutedsl import compile as cc

    arch = request.param
    kernel, _, fake_args, _ = ampere.build_variant(arch, torch.bfloat16, 128, 32, paged=True)
    return arch, cc.ptx_of(kernel, fake_args(), arch=arch)


def test_ptx_uses_warp_mma(ptx):
    arch, text = ptx
    assert re.search(r"^\.target " + arch + r"\b", text, re.M), "compiled for another arch"
    assert re.search(r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.bf16\.bf16\.f32", text)
    assert re.search(r"cp\.async\.c[ga]\.shared\.global", text)
    assert re.search(r"ldmatrix\.sync\.aligned\.m8n8\.x4(\.trans)?\.shared\.b16", text)
    assert ".trans" in text  # V is read transposed by ldmatrix
    assert "wgmma" not in text and "tcgen05" not in text


def test_disk_cache_round_trip(tmp_path, knobs):
    pytest.importorskip("cutlass.cute")
    from hstu_kernels.backends.cutedsl import ampere
    from hstu_kernels.backends.cutedsl import compile as cc

    knobs(cutedsl_cache=tmp_path)
    cc.clear_memory_cache()
    try:
        ampere.get_kernel("sm_90", torch.float16, 64, 0, paged=False)
        (first,) = cc.compile_stats().values()
        assert first["source"] == "compile"
        assert len(list(tmp_path.glob("hstu_fwd_mma_sm90a_*.o"))) == 1
        cc.clear_memory_cache()
        fn, _ = ampere.get_kernel("sm_90", torch.float16, 64, 0, paged=False)
        (second,) = cc.compile_stats().values()
        assert second["source"] == "disk" and second["seconds"] < first["seconds"]
        assert callable(fn)
    finally:
        cc.clear_memory_cache()


def test_disk_hit_loads_without_the_dsl(tmp_path):
    """A process whose disk cache holds a TMA kernel's variant loads it as a shared library
    through tvm-ffi alone: the DSL (about two seconds to import) is never imported."""
    pytest.importorskip("cutlass.cute")
    import shutil
    import subprocess
    import sys

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler to link the shared library")
    code = (
        "import sys, torch\n"
        "from hstu_kernels.backends.cutedsl import compile as cc, tma_variants\n"
        "tma_variants.get_kernel('hopper', 'sm_90', torch.bfloat16, 64, True)\n"
        "(s,) = cc.compile_stats().values()\n"
        "print('SOURCE', s['source'], 'cutlass' in sys.modules)\n"
    )
    env = {**os.environ, "HSTU_KERNELS_CUTEDSL_CACHE": str(tmp_path)}
    seen = []
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=600)  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        seen.append(next(x for x in run.stdout.splitlines() if x.startswith("SOURCE")))
    assert seen == ["SOURCE compile True", "SOURCE disk False"]
    assert len(list(tmp_path.glob("hstu_fwd_wgmma_sm90a_*.so"))) == 1


def test_object_file_entry_without_a_compiler(tmp_path, knobs, monkeypatch):
    """Without a C compiler the object file is the cache entry, loaded through the DSL."""
    pytest.importorskip("cutlass.cute")
    import shutil

    from hstu_kernels.backends.cutedsl import compile as cc
    from hstu_kernels.backends.cutedsl import tma_variants

    monkeypatch.setattr(shutil, "which", lambda name: None)
    knobs(cutedsl_cache=tmp_path)
    cc.clear_memory_cache()
    try:
        tma_variants.get_kernel("hopper", "sm_90", torch.bfloat16, 64, True)
        assert not list(tmp_path.glob("*.so")) and len(list(tmp_path.glob("*.o"))) == 1
        cc.clear_memory_cache()
        fn = tma_variants.get_kernel("hopper", "sm_90", torch.bfloat16, 64, True)
        (stats,) = cc.compile_stats().values()
        assert stats["source"] == "disk-object" and callable(fn)
    finally:
        cc.clear_memory_cache()


def test_split_kv_heuristic():
    from hstu_kernels.backends.cutedsl_ampere import num_splits

    assert num_splits(1088, 68, 1, 132) == 1  # jagged B=8: the q-tiles fill the GPU
    assert num_splits(12, 68, 1, 132) > 4  # delta B=1: 12 q-tiles for 132 SMs
    assert num_splits(12, 4, 1, 132) == 1  # too few KV tiles to split
    for ctas in (1, 7, 96, 192):
        assert 1 <= num_splits(ctas, 68, 2, 132) <= 16


def test_split_range_covers_the_walk():
    for count in range(0, 30):
        for parts in range(1, 8):
            steps = [i for s in range(parts) for i in range(*hc.split_range(count, s, parts))]
            assert steps == list(range(count))


def test_dsl_arch_names():
    from hstu_kernels.backends.cutedsl.compile import dsl_arch

    assert [dsl_arch(a) for a in ("sm_80", "sm_89", "sm_90", "sm_100", "sm_120")] == [
        "sm_80", "sm_89", "sm_90a", "sm_100a", "sm_120a",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="arch"):
        dsl_arch("cpu")


def test_backend_registered_without_touching_the_dsl():
    from hstu_kernels.dispatch import explain, registry

    backend = registry().backends["cutedsl-ampere"]
    assert "append_kv" not in backend.ops and not backend.features
    why = str(explain("paged", arch="sm_90", head_dim=128, num_contexts=2))
    assert "cutedsl-ampere: lacks mask features" in why
