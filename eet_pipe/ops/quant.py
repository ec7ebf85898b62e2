"""Int8 weight-only quantisation: symmetric, one scale per output channel.

``quantize_int8`` turns an ``nn.Linear`` weight [N, K] into int8 codes and per-row scales;
``int8_linear`` here is the reference (dequantise + matmul) that the CUDA GEMV kernel reproduces
and that ``eet_pipe.ops.int8_linear`` uses on CPU and for large batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812  (the usual PyTorch alias)

__all__ = ["quantize_int8", "dequantize_int8", "int8_linear"]

_QMAX = 127


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 quantisation.

    Args:
        weight: [N, K] floating point (an ``nn.Linear`` weight).
    Returns:
        (qweight int8 [N, K], scale [N]) with ``weight ≈ qweight * scale[:, None]``. The scale has
        the weight's dtype (fp16/bf16/fp32); codes are rounded against that stored scale, so the
        error per element is at most about half a scale step. All-zero rows get the smallest
        normal scale and zero codes.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_int8 needs a floating-point [N, K] weight, "
                         f"got {weight.dtype} {tuple(weight.shape)}")
    w = weight.detach().float()
    tiny = torch.finfo(weight.dtype).tiny
    scale = (w.abs().amax(dim=1) / _QMAX).clamp_min(tiny).to(weight.dtype)  # [N], as stored
    qweight = torch.round(w / scale.float().unsqueeze(1)).clamp_(-_QMAX, _QMAX).to(torch.int8)
    return qweight, scale


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """qweight [N, K] int8 * scale [N] -> [N, K] in `dtype` (default: the scale's dtype)."""
    dtype = scale.dtype if dtype is None else dtype
    # int8 * float promotes to the float dtype inside one element-wise kernel (int8 -> float is exact): the
    # weight is read once as int8 and written once, with no intermediate float copy of it.
    return qweight * scale.to(dtype).unsqueeze(1)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference weight-only int8 linear: ``x @ (qweight * scale[:, None]).T + bias``.

    Args:
        x: [..., K] floating point.
        qweight: [N, K] int8; scale: [N]; bias: [N] or None.
    Returns:
        [..., N] in x's dtype (the weight is dequantised to x's dtype before the matmul).
    """
    if qweight.dtype != torch.int8:
        raise ValueError(f"int8_linear: qweight must be int8, got {qweight.dtype}")
    if x.shape[-1] != qweight.shape[1] or scale.shape != (qweight.shape[0],):
        raise ValueError(f"int8_linear: x {tuple(x.shape)}, qweight {tuple(qweight.shape)} and scale "
                         f"{tuple(scale.shape)} do not fit x [..., K], qweight [N, K], scale [N]")
    weight = dequantize_int8(qweight, scale, x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
