"""Reference FP8 (e4m3) KV pages: the quantisation and its inverse that define the math of an
FP8 page pool (the append: ``kv.append_kv`` with scales; the history read:
``attention.gather_history_kv`` with scales).

An FP8 pool stores every cached K and V row as ``float8_e4m3fn`` beside one fp32 scale per
token and head (``kv_scales [pages, 2, page_size, heads]``, index 0 = K, 1 = V, as in the
pool): ``x = x_fp8 * scale``. One scale per token and head is the granularity that survives
incremental appends (a new token never changes an earlier token's bytes or scale), and it
factors out of every dot product the kernels form: ``q . k_j = scale_j * (q . k8_j)`` and
``sum_j p_j v_j = sum_j (p_j scale_j) v8_j``. The scale is the row's largest magnitude over
e4m3's largest finite value (448), so every row uses the whole e4m3 range; an all-zero row gets
scale 1.

Bytes per cached token and head, K and V together: ``2 * (D + 4)`` against ``2 * 2 * D`` in
bf16, so a pool of the same bytes holds ``2 D / (D + 4)`` times the tokens: 1.97x at D = 256,
1.94x at 128, 1.88x at 64.
"""

from __future__ import annotations

import torch

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "SCALE_DTYPE",
    "dequantize",
    "quantize",
    "tokens_per_byte_ratio",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
SCALE_DTYPE = torch.float32


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x8, scale)`` of rows ``x [..., heads, D]`` (any float dtype): ``x8 [..., heads, D]``
    in e4m3 and one fp32 ``scale [..., heads]`` per row, ``x ~= x8 * scale``."""
    x32 = x.float()
    amax = x32.abs().amax(dim=-1)
    # Tensor by tensor: IEEE division on every device (torch's CUDA kernels multiply by the
    # reciprocal of a Python scalar divisor, an ulp off at times, and the kernels divide).
    scale = torch.where(amax > 0, amax / torch.full_like(amax, FP8_MAX), torch.ones_like(amax))
    # x / scale lies in [-448, 448] up to rounding; the clamp keeps a rounding up finite.
    x8 = (x32 / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x8, scale.to(SCALE_DTYPE)


def dequantize(x8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 ``x8 * scale`` (``x8 [..., heads, D]``, ``scale [..., heads]``)."""
    return x8.float() * scale.float()[..., None]


def tokens_per_byte_ratio(head_dim: int, base: torch.dtype = torch.bfloat16) -> float:
    """How many more tokens an FP8 pool holds than a ``base`` pool of the same bytes, scales
    included."""
    base_bytes = torch.empty((), dtype=base).element_size() * head_dim
    fp8_bytes = head_dim + torch.empty((), dtype=SCALE_DTYPE).element_size()
    return base_bytes / fp8_bytes
