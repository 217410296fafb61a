"""CUTLASS Python DSL (CuTe DSL) kernels for HSTU attention.

Modules: ``compile`` (compile once per variant, in-process and on-disk caches, tvm-ffi launch),
``hstu_common`` (arch-neutral pieces shared by every DSL kernel: tile scheduling, page-table
walk, mask classification, the SiLU epilogue), ``tma_views`` (TMA views of packed and paged
tensors, the host entry points of the TMA kernels), ``tma_ops`` (their backends' op functions),
``ampere`` (warp-MMA kernel, sm80..sm120), ``hopper`` (wgmma kernel, sm90a; compiled, not yet
run) and ``blackwell`` (tcgen05 kernel, sm100). Nothing here imports ``cutlass`` at package
import time: the registration modules (``backends/cutedsl_*.py``) are imported on machines
without the DSL.
"""
