"""Pure-PyTorch reference implementations of every fused op.

These are the semantics the CUDA kernels in ``csrc/`` must reproduce; CPU paths and the
op tests use them directly. Shapes in comments: B batch, T tokens, H hidden, D head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "layer_norm",
    "rms_norm",
    "residual_layer_norm",
    "residual_rms_norm",
    "activation",
    "gated_activation",
    "rotary",
    "attention",
]


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back before the weight (LLaMA's order)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def residual_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (LayerNorm(x + residual), x + residual)."""
    summed = x + residual
    return layer_norm(summed, weight, bias, eps), summed


def residual_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (RMSNorm(x + residual), x + residual)."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def activation(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Element-wise activation: gelu (erf), gelu_new (tanh), relu."""
    if kind == "gelu":
        return F.gelu(x)
    if kind == "gelu_new":
        # GPT-2's tanh approximation, written as in its reference implementation.
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    if kind == "relu":
        return F.relu(x)
    raise ValueError(f"unknown activation {kind!r}; allowed: gelu, gelu_new, relu")


def gated_activation(gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
    """act(gate) * up for SwiGLU (silu_gated) and GeGLU (gelu_gated)."""
    if kind == "silu_gated":
        return F.silu(gate) * up
    if kind == "gelu_gated":
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"unknown gated activation {kind!r}; allowed: silu_gated, gelu_gated")


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding. x: [B, heads, T, D]; cos/sin: [B, T, D]."""
    cos = cos.unsqueeze(1).to(x.dtype)
    sin = sin.unsqueeze(1).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention. q: [B, Hq, T, D]; k, v: [B, Hkv, K, D]; mask: [B, 1, T, K] bool."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
