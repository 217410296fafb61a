"""Shared pytest setup: hypothesis profiles and the ``gpu`` marker.

Profiles: ``ci`` (few examples, no deadline: the 2-core CI machine), ``dev`` (default, more
examples), ``gpu`` (many examples, for runs on the GPU machine). Pick one with
``HYPOTHESIS_PROFILE``; ``CI=true`` selects ``ci``.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("ci", max_examples=12, derandomize=False, **_common)
settings.register_profile("dev", max_examples=30, **_common)
settings.register_profile("gpu", max_examples=60, **_common)
_default = "ci" if os.environ.get("CI") else "dev"
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", _default))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
