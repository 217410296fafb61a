"""Triton row kernels of the layer (:mod:`hstu_kernels.model.layer` drives them).

Kept apart so that importing the model never imports Triton, and so that the kernels can be
re-decorated (module reload) when the interpreter is switched on, as the CPU tests do.
"""

import triton
import triton.language as tl


@triton.jit
def layernorm_kernel(
    X, U, W, B, Y, rows, n_cols, stride_u, eps,
    HAS_U: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``Y = LayerNorm(X) (* U)`` for ``ROWS`` rows of ``n_cols`` per program."""
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (r < rows)[:, None] & (cols < n_cols)[None, :]
    offs = r[:, None] * n_cols + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    d = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / n_cols + eps)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    y = d * rstd[:, None] * w[None, :] + b[None, :]
    if HAS_U:
        u_offs = r[:, None] * stride_u + cols[None, :]
        u = tl.load(U + u_offs, mask=mask, other=0.0).to(tl.float32)
        y = y * u
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
