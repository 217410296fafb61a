"""The HSTU layer's LayerNorm row kernels (Triton): ``layernorm`` and ``layernorm_mul`` of the
layer op families (:mod:`hstu_kernels.layer_ops`; the math is :mod:`hstu_kernels.reference.layer`).

One program normalises one or two rows of ``[rows, n]`` in fp32. ``layernorm_mul`` multiplies by
``u`` (the projection's SiLU(u) slot, any row stride) in the same pass, and where the attention
split its KV range it sums the fp32 partials ``[S, rows, n]`` in split order first, rounded to
the output dtype as the attention's own sum kernel would have stored them: one kernel and one
round trip of the attention output fewer. Each shape's launch is a :class:`FixedLaunch`, made once. A Triton that cannot build the kernel here (a compile error, not an
out-of-memory error) makes the ops use the reference's torch ops for the rest of the process,
with one warning; ``HSTU_FUSED_LAYERNORM=0`` does so from the start.
"""

from __future__ import annotations

import torch

from hstu_kernels import reference, settings
from hstu_kernels.backends.triton.launcher import (
    FixedLaunch,
    LaunchCache,
    cannot_compile,
    cdiv,
    next_power_of_2,
)

__all__ = [
    "LAUNCHES",
    "SMALL_GRID_ROWS",
    "layernorm",
    "layernorm_mul",
    "plan_rows",
    "reset",
    "rows_per_program",
]

_KERNELS: dict | None = None
# Rows per program of the row kernels: one while the grid is small (a few thousand rows), for
# more programs in flight, two beyond (H100, width 1024: 384 rows 3.1 -> 2.7 us with one row
# per program instead of four, 1024 rows 3.5 -> 3.2, 3072 rows best at two; docs/block.md)
SMALL_GRID_ROWS = 2048


def rows_per_program(rows: int) -> int:
    """Rows each program of the row kernels normalises, for a call over ``rows`` rows."""
    return 1 if rows <= SMALL_GRID_ROWS else 2


def _kernels() -> dict:
    """The Triton kernels (defined, and compiled, on first use)."""
    global _KERNELS
    if _KERNELS is None:
        import triton
        import triton.language as tl

        @triton.jit
        def layernorm_kernel(
            X, U, W, B, Y, rows, n_cols, stride_u, eps, splits,
            HAS_U: tl.constexpr, SPLIT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
        ):  # fmt: skip
            r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
            cols = tl.arange(0, BLOCK)
            mask = (r < rows)[:, None] & (cols < n_cols)[None, :]
            offs = r[:, None] * n_cols + cols[None, :]
            if SPLIT:
                # X: fp32 partials [splits, rows, n_cols]; summed in split order and rounded
                # to Y's dtype, as the attention's own sum kernel would have stored them.
                x = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
                part = X + offs  # 64-bit pointers: splits * rows * n_cols may pass 2^31
                for _ in range(splits):
                    x += tl.load(part, mask=mask, other=0.0)
                    part += rows * n_cols
                x = x.to(Y.dtype.element_ty).to(tl.float32)
            else:
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

        _KERNELS = {"layernorm": layernorm_kernel}
    return _KERNELS


_BROKEN: list[str] = []  # why the Triton row kernels were switched off in this process


def _use_triton(t: torch.Tensor) -> bool:
    """Whether the kernel runs on ``t``: on a GPU (or the interpreter), unless switched off;
    rows wider than 8192 take the torch ops."""
    return _runs_on(t.device, t.shape[-1])


def _runs_on(device: torch.device, n: int) -> bool:
    """:func:`_use_triton` for rows of width ``n`` on ``device``."""
    if not settings.get().fused_layernorm or _BROKEN:
        return False
    if device.type != "cuda" and not settings.get().triton_interpret:
        return False
    return n <= 8192


def _fall_back(exc: Exception, t: torch.Tensor, fallback):
    """After a row kernel raised ``exc``: if it cannot run here (a Triton that fails to
    compile it), say so once, switch the row kernels off for this process and return
    ``fallback()`` (the torch ops); anything else propagates."""
    # (asked of CUDA tensors only: a CUDA build without a driver raises on the question)
    capturing = t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if capturing or not cannot_compile(exc):
        raise exc
    import warnings

    _BROKEN.append(f"{type(exc).__name__}: {exc}")
    warnings.warn(
        f"hstu_kernels: Triton LayerNorm row kernels disabled ({_BROKEN[0]}); using torch ops",
        RuntimeWarning,
        stacklevel=3,
    )
    return fallback()


def _launch(
    rows: int, n: int, split: bool, splits: int, has_u: bool, stride_u: int, eps: float
) -> FixedLaunch:
    """The fixed launch of the row kernel over ``[rows, n]`` (``split``: ``splits`` fp32
    partials to sum; ``has_u``: a ``u`` of row stride ``stride_u``); its five tensors are the
    per-call slots."""
    per = rows_per_program(rows)
    block = next_power_of_2(n)
    return FixedLaunch(
        _kernels()["layernorm"], (cdiv(rows, per),),  # (the kernel the caller's key holds)
        [None, None, None, None, None, rows, n, stride_u, eps, splits], range(5),
        dict(HAS_U=has_u, SPLIT=split, ROWS=per, BLOCK=block),
        num_warps=min(16, max(4, per * block // 512)),
    )  # fmt: skip


def _launch_key(kernel, shape, x_dtype, device, out_dtype, stride_u, no_u, weight_dtype,
                bias_dtype, eps) -> tuple:  # fmt: skip
    """Everything a row launch fixes (a FixedLaunch specialises on its slots' dtypes too):
    :data:`LAUNCHES`' key, shared by the ops and :func:`plan_rows`."""
    return (kernel, shape, x_dtype, device, out_dtype, stride_u, no_u, weight_dtype, bias_dtype,
            eps, rows_per_program(shape[-2]))  # fmt: skip


def _row_layernorm(
    x: torch.Tensor, u: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """``x [rows, n]``, or fp32 split partials ``[S, rows, n]`` (then ``u`` gives the
    output dtype)."""
    x = x.contiguous()  # the kernel indexes rows by the width
    split = x.dim() == 3
    rows, n = x.shape[-2:]
    dtype = u.dtype if split else x.dtype
    y = torch.empty((rows, n), dtype=dtype, device=x.device)
    if rows:
        stride_u = 0 if u is None else u.stride(0)
        kernel = _kernels()["layernorm"]  # (re-made when the interpreter is switched)
        key = _launch_key(kernel, x.shape, x.dtype, x.device, dtype, stride_u, u is None,
                          weight.dtype, bias.dtype, eps)  # fmt: skip
        splits = x.shape[0] if split else 1
        LAUNCHES.keyed(
            key, lambda: _launch(rows, n, split, splits, u is not None, stride_u, eps),
            x, x if u is None else u, weight, bias, y,
        )  # fmt: skip
    return y


# Launches by everything they fix: a call then costs a dict lookup and the launch itself.
LAUNCHES = LaunchCache()


def reset() -> None:
    """Switch the row kernels back on (after a failure switched them off) and forget their
    launches."""
    _BROKEN.clear()
    LAUNCHES.clear()


def plan_rows(
    shape: tuple[int, ...],
    x_dtype: torch.dtype,
    out_dtype: torch.dtype,
    device: torch.device,
    eps: float,
    stride_u: int | None,
    param_dtype: torch.dtype,
):
    """The row kernel's launch for inputs of ``shape`` (``[rows, n]``, or split partials
    ``[S, rows, n]``), fixed once: ``run(x, u, weight, bias, y)`` (``u`` is ``x`` where
    ``stride_u`` is ``None``: no multiply) writes ``y [rows, n]`` with no per-call key or
    checks beyond the launch's own (devices, alignment). ``None`` where :func:`layernorm`
    would take the torch ops (off, not on a GPU or the interpreter, too wide, or no rows):
    call the ops then.
    A launch that cannot compile here switches the row kernels off as the ops do, and that
    call runs the torch ops."""
    rows, n = shape[-2:]
    if not rows or not _runs_on(device, n):
        return None
    split = len(shape) == 3
    has_u = stride_u is not None
    stride = stride_u or 0
    key = _launch_key(_kernels()["layernorm"], torch.Size(shape), x_dtype, device, out_dtype,
                      stride, not has_u, param_dtype, param_dtype, eps)  # fmt: skip
    splits = shape[0] if split else 1
    launch = LAUNCHES.get(key, lambda: _launch(rows, n, split, splits, has_u, stride, eps))

    def run(x, u, weight, bias, y) -> None:
        try:
            launch(x, u, weight, bias, y)
        except Exception as exc:
            ref = reference.layernorm_mul if has_u else reference.layernorm
            args = (x, u, weight, bias, eps) if has_u else (x, weight, bias, eps)
            y.copy_(_fall_back(exc, y, lambda: ref(*args)))

    return run


def layernorm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """``LayerNorm(x)`` over the last dim of ``x [rows, n]``."""
    if not _use_triton(x):
        return reference.layernorm(x, weight, bias, eps)
    try:
        return _row_layernorm(x, None, weight, bias, eps)
    except Exception as exc:
        return _fall_back(exc, x, lambda: reference.layernorm(x, weight, bias, eps))


def layernorm_mul(
    a: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """``LayerNorm(a) * u``; ``a`` may be fp32 split partials ``[S, rows, n]`` (summed in the
    same pass). ``u`` needs unit column stride."""
    if not _use_triton(a):
        return reference.layernorm_mul(a, u, weight, bias, eps)
    if u.stride(1) != 1:
        raise ValueError(f"u: expected unit column stride, got strides {u.stride()}")
    try:
        return _row_layernorm(a, u, weight, bias, eps)
    except Exception as exc:
        return _fall_back(exc, u, lambda: reference.layernorm_mul(a, u, weight, bias, eps))
