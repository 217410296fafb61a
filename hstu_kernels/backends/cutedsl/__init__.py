"""CUTLASS Python DSL (CuTe DSL) kernels for HSTU attention.

Modules: ``compile`` (compile once per variant, in-process and on-disk caches, tvm-ffi launch),
``hstu_common`` (arch-neutral pieces shared by every DSL kernel: tile scheduling, page-table
walk, mask classification, the SiLU epilogue), ``ampere`` (warp-MMA kernel, sm80..sm120) and
``blackwell`` (tcgen05 kernel, sm100). Nothing here imports ``cutlass`` at package import time:
the registration modules (``backends/cutedsl_*.py``) are imported on machines without the DSL.
"""
