"""CUTLASS Python DSL (CuTe DSL) kernels for HSTU attention.

Modules: ``compile`` (compile once per variant, in-process and on-disk caches, tvm-ffi launch),
``hstu_common`` (arch-neutral pieces shared by every DSL kernel: tile scheduling, page-table
walk, mask classification, the SiLU epilogue), ``tma_views`` (TMA views of packed and paged
tensors, the host entry points of the TMA kernels), ``tma_variants`` (what names a TMA kernel's
compiled variant, without the DSL), ``tma_ops`` (their backends' op functions and planners),
``split_kv`` (the TMA kernels' split-KV layout), ``ampere`` (warp-MMA kernel, sm80..sm120),
``hopper`` (wgmma kernel, sm90a; the sm_90 default, run on H100s and an H200) and
``blackwell`` (tcgen05 kernel, sm100; compiled in CI, never run here). Nothing here imports
``cutlass`` at package import time: the registration modules (``backends/cutedsl_*.py``) are
imported on machines without the DSL.
"""
