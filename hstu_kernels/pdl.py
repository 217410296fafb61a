"""Programmatic dependent launch (PDL) for this library's Triton kernels (Hopper and later).

In a CUDA graph the cached path at small batches is a chain of short kernels (a few µs each);
between two of them the GPU drains the first and only then launches the second. A kernel
launched with PDL may be scheduled while its predecessor in the stream is still finishing:
its programs start, wait at ``griddepcontrol.wait`` until the predecessor has completed and
its writes are visible, then run. So the launch latency overlaps the predecessor's tail.

Every kernel launched this way calls :func:`~hstu_kernels.pdl_triton.pdl_start` before it
touches global memory (so it never reads or overwrites what an earlier kernel still uses),
then lets its own successor launch. ``HSTU_PDL=0`` switches it off.
"""

from __future__ import annotations

import os

import torch

__all__ = ["PDL_ENV", "launch_options", "pdl_enabled"]

PDL_ENV = "HSTU_PDL"
_SUPPORTED: list[bool] = []  # whether this Triton can launch with PDL (asked once)


def _triton_supports_pdl() -> bool:
    if not _SUPPORTED:
        try:
            import triton.language as tl
            from triton.backends.nvidia.compiler import CUDAOptions

            ok = "launch_pdl" in CUDAOptions.__dataclass_fields__ and hasattr(
                tl.extra.cuda, "gdc_wait"
            )
        except Exception:
            ok = False
        _SUPPORTED.append(ok)
    return _SUPPORTED[0]


def pdl_enabled(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device launch with PDL: a CUDA device of compute capability
    9.0 or later, not the interpreter, a Triton that supports it, and ``HSTU_PDL`` not 0."""
    if t.device.type != "cuda" or os.environ.get(PDL_ENV, "1") == "0":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    if torch.cuda.get_device_capability(t.device)[0] < 9:
        return False
    return _triton_supports_pdl()


def launch_options(t: torch.Tensor) -> dict:
    """The keyword arguments of a launch of a kernel that takes ``USE_PDL``."""
    if pdl_enabled(t):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}
