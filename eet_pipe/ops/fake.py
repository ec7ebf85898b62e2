"""Fake (meta) implementations of every ``torch.ops.eet_pipe`` op.

They give output shapes/dtypes without running a kernel, so the ops trace under torch.compile,
FakeTensor propagation and CUDA-graph capture tooling. Registered once by ``eet_pipe.ops`` when
the extension is present (the op schemas come from the extension, csrc/bindings.cpp). Outputs are
contiguous, as the kernels return them.
"""

from __future__ import annotations

import torch

__all__ = ["register_fakes"]

_done = False


def _like(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape)


def _norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _like(x)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _like(x)


def _residual_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _like(x), _like(x)


def _residual_rms(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _like(x), _like(x)


def _activation(x: torch.Tensor, kind: str) -> torch.Tensor:
    return _like(x)


def _bias_activation(x: torch.Tensor, bias: torch.Tensor, kind: str) -> torch.Tensor:
    return _like(x)


def _gated(gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
    return _like(gate)


def _qkv_rotary_cache(qkv: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, write_index: torch.Tensor,
                      num_heads: int, num_kv_heads: int, head_dim: int, rotary: bool,
                      positions: torch.Tensor | None) -> torch.Tensor:
    return qkv.new_empty((qkv.shape[0], num_heads, qkv.shape[1], head_dim))  # [B, Hq, T, D]


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                      lengths: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
    return _like(q)  # [B, Hq, 1, D]


def _decode_attention_qkv(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                          write_index: torch.Tensor, lengths: torch.Tensor, valid: torch.Tensor, num_heads: int,
                          scale: float) -> torch.Tensor:
    return qkv.new_empty((qkv.shape[0], num_heads, 1, k_cache.shape[-1]))  # [B, Hq, 1, D]


def _gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
          residual: torch.Tensor | None, activation: str) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))  # [M, N]


def _gemv_gated(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gate_scale: torch.Tensor | None,
                up_scale: torch.Tensor | None, gate_bias: torch.Tensor | None, up_bias: torch.Tensor | None,
                kind: str) -> torch.Tensor:
    return x.new_empty((x.shape[0], gate.shape[0]))  # [M, N]


def _dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return qweight.new_empty(qweight.shape, dtype=scale.dtype)


def _gemm_lt(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
             activation: str, algo: torch.Tensor | None, workspace: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))  # [M, N]


_FAKES = {
    "layer_norm": _norm,
    "rms_norm": _rms,
    "residual_layer_norm": _residual_norm,
    "residual_rms_norm": _residual_rms,
    "activation": _activation,
    "bias_activation": _bias_activation,
    "gated_activation": _gated,
    "qkv_rotary_cache": _qkv_rotary_cache,
    "decode_attention": _decode_attention,
    "decode_attention_qkv": _decode_attention_qkv,
    "gemv": _gemv,
    "gemv_gated": _gemv_gated,
    "gemm_lt": _gemm_lt,
    "dequantize_int8": _dequantize_int8,
}
"""gemm_lt_algos has none: it returns a data-dependent number of CPU rows and is only called eagerly."""


def register_fakes() -> None:
    """Register the fake implementations (idempotent). Needs the extension's op schemas."""
    global _done
    if _done:
        return
    for name, fn in _FAKES.items():
        torch.library.register_fake(f"eet_pipe::{name}", fn)
    _done = True
