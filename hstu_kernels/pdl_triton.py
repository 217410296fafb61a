"""The device side of :mod:`hstu_kernels.pdl` (imports Triton)."""

import triton
import triton.language as tl


@triton.jit
def pdl_start():
    """Wait until the previous kernel in the stream has completed (its writes visible), then
    let the next one launch. First thing in a kernel launched with PDL."""
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()
