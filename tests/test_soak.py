"""GPU soak test: the ranking model under random request sequences on the GPU kernels.

A hypothesis state machine serves batches of users whose histories grow by random amounts, in a
pool small enough that users are evicted (offloaded to a host pool, or dropped when that is
full) and onloaded again, with bad requests (ids outside the tables, a failure inside a layer)
mixed in. Every served score must match the uncached baseline (DESIGN.md §5 rule), every failed
request must leave the cache as it was, and no page may be lost or owned twice.

``SOAK_EXAMPLES`` / ``SOAK_STEPS`` (defaults 10 and 25) size a run; the run's totals
are printed (``-s``) so a run on the device can say how many steps and requests it survived.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from hstu_kernels.kvcache import KVCacheError
from hstu_kernels.model.ranking import HSTURankingModel, RankingConfig
from hstu_kernels.model.requests import RequestBatch, SyntheticRequests, UserRequest
from hstu_kernels.testing import assert_hstu_close

USERS = 6
MAX_HISTORY = 480
TOTALS = {"steps": 0, "requests": 0, "served": 0, "refused": 0, "failed": 0, "evictions": 0}


def _config(device: str) -> RankingConfig:
    # Shapes the GPU kernels serve (head dim 64, 32-token pages: Triton and cutedsl-hopper);
    # on the CPU (a smoke run of the machine itself) fp32 on the reference.
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return RankingConfig.tiny(num_layers=2, hidden=128, heads=2, head_dim=64, max_batch=3,
                              max_history=MAX_HISTORY, max_targets=24, page_size=32,
                              dtype=dtype)  # fmt: skip


def _where(cache) -> dict:
    return {u: (cache.location(u), cache.cached_length(u)) for u in cache.users}


class SoakMachine(RuleBasedStateMachine):
    device = "cuda"

    def __init__(self) -> None:
        super().__init__()
        self.model = _model(self.device)
        c = self.model.config
        # 12 usable pages of 32 tokens: at most ~1.5 users of full history stay on the device.
        self.cache = self.model.make_cache(num_pages=13, host_pages=20)
        self.gen = SyntheticRequests(num_items=c.num_items, num_actions=c.num_actions,
                                     start=1, stop=MAX_HISTORY, step=1, targets=8, seed=7)  # fmt: skip
        self.histories: dict[int, int] = {}  # what each user has shown so far
        self.request_no = 0

    def _batch(self, users, grow, targets) -> RequestBatch:
        requests = []
        for u, g, t in zip(users, grow, targets, strict=False):
            items, actions = self.gen.user_history(u)
            h = min(MAX_HISTORY, self.histories.get(u, 0) + g)
            cand = torch.randint(self.model.config.num_items, (t,),
                                 generator=torch.Generator().manual_seed(self.request_no))  # fmt: skip
            new = h - self.cache.cached_length(u)
            requests.append(UserRequest(u, items[:h], actions[:h], cand, max(new, 0)))
        self.request_no += 1
        return RequestBatch(self.request_no, tuple(requests))

    @rule(users=st.lists(st.integers(0, USERS - 1), min_size=1, max_size=3, unique=True),
          grow=st.lists(st.integers(1, 150), min_size=3, max_size=3),
          cands=st.lists(st.integers(0, 24), min_size=3, max_size=3),
          mode=st.sampled_from(["kvcache", "kvcache+graphs"]))  # fmt: skip
    def serve(self, users, grow, cands, mode):
        TOTALS["steps"] += 1
        if mode == "kvcache+graphs" and self.device != "cuda":
            mode = "kvcache"  # CUDA graphs need a GPU
        batch = self._batch(users, grow, cands)
        before = self.cache.snapshot()
        located = {u: self.cache.location(u) for u in self.histories}
        try:
            got = self.model.score(batch, mode, self.cache)
        except KVCacheError:  # the pool cannot hold the batch: refused, unchanged
            assert self.cache.snapshot() == before
            TOTALS["refused"] += 1
            return
        TOTALS["requests"] += 1
        TOTALS["served"] += batch.size
        ref32, ref_lowp = _baselines(self.device, batch)
        assert_hstu_close(got.float(), ref32, ref_lowp)
        for r in batch.requests:
            self.histories[r.user_id] = r.history
        moved = sum(1 for u, where in located.items() if where == "device"
                    and self.cache.location(u) != "device")  # fmt: skip
        TOTALS["evictions"] += moved

    @rule(users=st.lists(st.integers(0, USERS - 1), min_size=1, max_size=3, unique=True),
          grow=st.lists(st.integers(1, 60), min_size=3, max_size=3),
          how=st.sampled_from(["bad id", "layer fails"]))  # fmt: skip
    def fail(self, users, grow, how):
        TOTALS["steps"] += 1
        batch = self._batch(users, grow, [4] * 3)
        before = _where(self.cache)
        if how == "bad id":
            r = batch.requests[-1]
            bad = r.candidates.clone()
            if bad.numel() == 0:
                return
            bad[0] = self.model.config.num_items
            batch = dataclasses.replace(
                batch, requests=(*batch.requests[:-1], dataclasses.replace(r, candidates=bad))
            )
            with pytest.raises(ValueError, match="candidates"):
                self.model.score(batch, "kvcache", self.cache)
        else:
            layer = self.model.block.layers[-1]
            real = layer._forward_planned  # (the eager block's per-layer call)

            def boom(*args, **kwargs):
                real(*args, **kwargs)  # the pages of this layer are written, then it fails
                raise RuntimeError("injected failure")

            layer._forward_planned = boom
            try:
                with pytest.raises((RuntimeError, ValueError)):
                    self.model.score(batch, "kvcache", self.cache)
            finally:
                del layer._forward_planned
        TOTALS["failed"] += 1
        # Evictions made to fit the failed request stand; what it prepared is gone.
        after = _where(self.cache)
        assert set(after) <= set(before), "a failed request left a new user behind"
        for u, (where, length) in after.items():
            assert length == before[u][1], (u, before[u], (where, length))

    @invariant()
    def consistent(self):
        self.cache.check_invariants()  # no page owned twice, owned and free, or leaked
        for u in self.cache.users:
            assert self.cache.cached_length(u) <= self.histories.get(u, 0)


_MODELS: dict[tuple[str, bool], HSTURankingModel] = {}


def _model(device: str, fp32_reference: bool = False) -> HSTURankingModel:
    """One model per device for every example (its kernels compile and tune once); with
    ``fp32_reference`` its fp32 twin on the reference backend (the same weights)."""
    key = (device, fp32_reference)
    if key not in _MODELS:
        config = _config(device)
        if fp32_reference:
            config = dataclasses.replace(config, dtype=torch.float32, backend="reference")
        _MODELS[key] = HSTURankingModel(config, device=device)
    return _MODELS[key]


def _baselines(device: str, batch: RequestBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The DESIGN.md §5 references of a batch's scores: the uncached fp32 model on the
    reference backend, and the uncached model in the served dtype."""
    lowp = _model(device).score(batch, "baseline").float()
    if _model(device).config.dtype == torch.float32:
        return lowp, lowp
    return _model(device, fp32_reference=True).score(batch, "baseline").float(), lowp


class CpuSoakMachine(SoakMachine):
    device = "cpu"


def _run(machine: type[SoakMachine], examples: int, steps: int, fixed: bool = False) -> None:
    """``fixed``: the same draws every run (a short run must not come out vacuous by chance)."""
    for k in TOTALS:
        TOTALS[k] = 0
    machine.TestCase.settings = settings(max_examples=examples, stateful_step_count=steps,
                                         deadline=None, derandomize=fixed)  # fmt: skip
    machine.TestCase().runTest()
    print(f"\nsoak totals ({machine.device}, {examples} x {steps} steps): {TOTALS}")
    assert TOTALS["requests"] > 0 and TOTALS["failed"] > 0


def test_soak_cpu():
    """The machine itself, on the reference backend (a short run)."""
    _run(CpuSoakMachine, 4, 15, fixed=True)


@pytest.mark.gpu
def test_soak_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _run(SoakMachine, int(os.environ.get("SOAK_EXAMPLES", "10")),
         int(os.environ.get("SOAK_STEPS", "25")))  # fmt: skip
