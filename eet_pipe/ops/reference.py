"""Pure-PyTorch reference implementations of every fused op.

These are the semantics the CUDA kernels in ``csrc/`` must reproduce; CPU paths and the
op tests use them directly. Shapes in comments: B batch, T tokens, H hidden, D head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812  (the usual PyTorch alias)

from eet_pipe.ops.quant import int8_linear

__all__ = [
    "ACTIVATIONS",
    "GATED_ACTIVATIONS",
    "layer_norm",
    "rms_norm",
    "residual_layer_norm",
    "residual_rms_norm",
    "activation",
    "bias_activation",
    "gated_activation",
    "rotary",
    "attention",
    "qkv_rotary_cache",
    "decode_attention",
    "int8_linear",
]

ACTIVATIONS = ("gelu", "gelu_new", "relu")
"""Kinds accepted by `activation` and `bias_activation`."""
GATED_ACTIVATIONS = ("silu_gated", "gelu_gated")
"""Kinds accepted by `gated_activation`."""


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


def bias_activation(x: torch.Tensor, bias: torch.Tensor, kind: str) -> torch.Tensor:
    """activation(x + bias). x: [..., N]; bias: [N]."""
    return activation(x + bias, kind)


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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              causal: bool = False) -> torch.Tensor:
    """Scaled dot-product attention. q: [B, Hq, T, D]; k, v: [B, Hkv, K, D]; mask: [B, 1, T, K] bool, or
    None for unpadded batches: then `causal` selects causal or full attention (the fused flash path)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and causal,
                                          enable_gqa=k.shape[1] != q.shape[1])


_apply_rotary = rotary  # qkv_rotary_cache's `rotary` flag shadows the function's name


def qkv_rotary_cache(qkv: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     write_index: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                     rotary: bool = True, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Split the fused qkv projection, rotate q and k, store k and v in the cache, return q.

    Args:
        qkv: [B, T, (Hq + 2 * Hkv) * D], q heads first, then k heads, then v heads.
        cos, sin: [B, T, D] per token, or [P, D] tables when `positions` is given (unused if not rotary).
        k_cache, v_cache: [S, Hkv, L, D]; row ``slots[b]``, column ``write_index[b, t]`` is written in place.
        slots: [B] int64 cache rows; write_index: [B, T] int64 cache columns.
        rotary: apply rotate-half rotary to q and k.
        positions: [B, T] int64 rows of the cos/sin tables.
    Returns:
        q: [B, Hq, T, D] contiguous.
    """
    b, t, _ = qkv.shape
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = q.reshape(b, t, num_heads, head_dim).transpose(1, 2)  # [B, Hq, T, D]
    k = k.reshape(b, t, num_kv_heads, head_dim).transpose(1, 2)  # [B, Hkv, T, D]
    v = v.reshape(b, t, num_kv_heads, head_dim).transpose(1, 2)
    if rotary:
        if cos is None or sin is None:
            raise ValueError("qkv_rotary_cache: rotary=True needs cos and sin")
        if positions is not None:
            cos, sin = cos[positions], sin[positions]  # [B, T, D]
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
    rows = slots.view(-1, 1).expand_as(write_index)
    k_cache[rows, :, write_index] = k.transpose(1, 2).to(k_cache.dtype)
    v_cache[rows, :, write_index] = v.transpose(1, 2).to(v_cache.dtype)
    return q.contiguous()


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     lengths: torch.Tensor, valid: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Attention of one new token per sequence over its KV-cache slot, computed in fp32.

    Key column j of sequence b takes part iff ``j < lengths[b]`` and ``valid[slots[b], j]``; a
    sequence with no such column gets zeros. Query head h reads kv head ``h // (Hq // Hkv)``.

    Args:
        q: [B, Hq, 1, D].
        k_cache, v_cache: [S, Hkv, L, D].
        slots: [B] int64 cache rows; lengths: [B] int64 columns to consider (write index + 1).
        valid: [S, L] bool, True where the cache column holds a real token.
        scale: softmax scale, default 1 / sqrt(D).
    Returns:
        [B, Hq, 1, D] in q's dtype.
    """
    hq, d = q.shape[1], q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    k = k_cache[slots].float()  # [B, Hkv, L, D]
    v = v_cache[slots].float()
    group = hq // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [B, Hq, L, D]
    cols = torch.arange(k.shape[2], device=q.device)
    keep = valid[slots] & (cols.view(1, -1) < lengths.view(-1, 1))  # [B, L]
    scores = (q.float() @ k.transpose(-1, -2)) * scale  # [B, Hq, 1, L]
    scores = scores.masked_fill(~keep.view(keep.shape[0], 1, 1, -1), float("-inf"))
    top = scores.amax(-1, keepdim=True)
    weights = torch.exp(scores - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
    denom = weights.sum(-1, keepdim=True)
    probs = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    return (probs @ v).to(q.dtype)
