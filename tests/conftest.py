"""Shared pytest setup: the Triton interpreter switch, hypothesis profiles, the ``gpu``
marker and the ``knobs`` fixture.

Without a GPU the Triton kernels run in Triton's interpreter: ``TRITON_INTERPRET=1`` is set
here, once, before anything imports Triton (its ``@triton.jit`` decorators read it).

Profiles: ``ci`` (few examples, no deadline: the 2-core CI machine), ``dev`` (default, more
examples), ``gpu`` (many examples, for runs on the GPU machine), ``smoke`` (3 examples: a
quick check where compiling each new kernel variant dominates). Pick one with
``HYPOTHESIS_PROFILE``; ``CI=true`` selects ``ci``.
"""

from __future__ import annotations

import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import HealthCheck, settings

from hstu_kernels import settings as hk_settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("ci", max_examples=12, derandomize=False, **_common)
settings.register_profile("dev", max_examples=30, **_common)
settings.register_profile("gpu", max_examples=60, **_common)
settings.register_profile("smoke", max_examples=3, **_common)  # a quick look on a device
_default = "ci" if os.environ.get("CI") else "dev"
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", _default))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def knobs():
    """``knobs(**changes)`` changes library settings (``hstu_kernels.settings``) for the rest
    of the test; they are restored afterwards."""
    with contextlib.ExitStack() as stack:
        yield lambda **changes: stack.enter_context(hk_settings.override(**changes))
