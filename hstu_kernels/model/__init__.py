"""Inference models built on the public ops: the HSTU layer and block (cached and uncached),
the CUDA-graph runner of the cached block, and the end-to-end ranking model."""

from hstu_kernels.model.block import HSTUBlock
from hstu_kernels.model.layer import HSTULayer

__all__ = ["HSTUBlock", "HSTULayer"]
