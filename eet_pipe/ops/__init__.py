"""Fused ops: the one dispatch point between the CUDA kernels (``eet_pipe._C``) and the references.

Each public op runs its CUDA kernel (``torch.ops.eet_pipe.*``) when its main tensor is on a CUDA
device and the extension is available (``HAVE_EXT``, decided once at import in ``_ext``), and the
pure-PyTorch reference in ``eet_pipe.ops.reference`` otherwise. CPU tensors always take the
reference. Shapes: B batch, T tokens, H hidden, D head dim, S cache slots, L cache length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812  (the usual PyTorch alias)

from eet_pipe.ops import _ext, gemm_select, quant, reference
from eet_pipe.ops.quant import quantize_int8
from eet_pipe.ops.reference import ACTIVATIONS, GATED_ACTIVATIONS, attention, rotary

__all__ = [
    "HAVE_EXT",
    "EXT_REASON",
    "DECODE_MAX_HEAD_DIM",
    "INT8_GEMV_MAX_ROWS",
    "GEMV_MAX_ROWS",
    "GEMV_ENABLED",
    "gemm_select",
    "set_pdl",
    "activation",
    "attention",
    "bias_activation",
    "decode_attention",
    "decode_attention_qkv",
    "dequantize_int8",
    "epilogue",
    "gated_activation",
    "gated_linear",
    "int8_linear",
    "linear",
    "layer_norm",
    "qkv_rotary_cache",
    "quantize_int8",
    "residual_layer_norm",
    "residual_rms_norm",
    "rms_norm",
    "rotary",
]

HAVE_EXT: bool = _ext.HAVE_EXT
"""True when the CUDA kernels (torch.ops.eet_pipe.*) are registered."""
EXT_REASON: str = _ext.reason
"""Why the extension is or is not available."""

DECODE_MAX_HEAD_DIM = 256
"""Largest head dim of the decode_attention kernel (which also needs D % 8 == 0)."""
INT8_GEMV_MAX_ROWS = 4
"""Up to this many rows int8_linear runs the GEMV kernel; above, the dequantisation kernel and `linear` (a
tensor-core GEMM, selected per shape). The GEMV takes up to 16 rows, but it re-reads x from L1 once per row:
measured on an H100 (docs/PERF.md, night section) it loses to dequantise + GEMM from 8 rows on."""
GEMV_MAX_ROWS = 1
"""Up to this many rows `linear` (fp16/bf16 on CUDA) runs the GEMV kernel; above, cuBLAS. Measured on an
H100 (docs/PERF.md, benchmarks/kernel_timings.py): at one row the kernel with its fused epilogue saves the
activation, residual-add and split-K reduce kernels of the cuBLAS path (decode step -10 %); from four rows
on cuBLAS's tensor-core tiles are faster (the kernel re-reads x per row from L1)."""


GEMV_ENABLED: bool = _ext.env_on("EET_PIPE_GEMV")
"""`linear` may use the GEMV kernel (default); EET_PIPE_GEMV=0 (or false/no/off) keeps every dense linear on
cuBLAS."""


def set_pdl(enabled: bool | None) -> bool:
    """Launch the kernels with programmatic dependent launch (on by default; EET_PIPE_PDL=0 turns it off at
    import) or without (None: unchanged); returns the setting before the call. With it, on sm_90+ GPUs, each
    kernel of this library starts while the one before it finishes and waits in hardware for its inputs, so the
    ~400 short kernels of a decode step overlap their launch and start-up (docs/KERNELS.md). Applies to
    launches (and CUDA graph captures) from now on. Without the extension there is nothing to set: False."""
    if not HAVE_EXT:
        return False
    return bool(torch.ops.eet_pipe.set_pdl(None if enabled is None else bool(enabled)))


if HAVE_EXT:
    from eet_pipe.ops.fake import register_fakes

    register_fakes()
    set_pdl(_ext.env_on("EET_PIPE_PDL"))


def _kernel(x: torch.Tensor) -> bool:
    return HAVE_EXT and x.is_cuda


def _rows(x: torch.Tensor) -> int:
    """Rows of x viewed as [rows, x.shape[-1]] (0 when the last dimension is empty)."""
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _check_kind(kind: str, allowed: tuple[str, ...], what: str) -> None:
    if kind not in allowed:
        raise ValueError(f"unknown {what} {kind!r}; allowed: {', '.join(allowed)}")


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension. x: [..., H]; weight, bias: [H] in x's dtype."""
    if _kernel(x):
        return torch.ops.eet_pipe.layer_norm(x, weight, bias, eps)
    return reference.layer_norm(x, weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (fp32 statistics, cast to x's dtype, then times weight). x: [..., H]; weight: [H]."""
    if _kernel(x):
        return torch.ops.eet_pipe.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def residual_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (LayerNorm(x + residual), x + residual). x, residual: [..., H]."""
    if _kernel(x):
        return torch.ops.eet_pipe.residual_layer_norm(x, residual, weight, bias, eps)
    return reference.residual_layer_norm(x, residual, weight, bias, eps)


def residual_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (RMSNorm(x + residual), x + residual). x, residual: [..., H]."""
    if _kernel(x):
        return torch.ops.eet_pipe.residual_rms_norm(x, residual, weight, eps)
    return reference.residual_rms_norm(x, residual, weight, eps)


def activation(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Element-wise gelu (erf), gelu_new (tanh) or relu."""
    _check_kind(kind, ACTIVATIONS, "activation")
    if _kernel(x):
        return torch.ops.eet_pipe.activation(x, kind)
    return reference.activation(x, kind)


def bias_activation(x: torch.Tensor, bias: torch.Tensor, kind: str) -> torch.Tensor:
    """activation(x + bias) in one pass. x: [..., N]; bias: [N]."""
    _check_kind(kind, ACTIVATIONS, "activation")
    if _kernel(x):
        return torch.ops.eet_pipe.bias_activation(x, bias, kind)
    return reference.bias_activation(x, bias, kind)


def gated_activation(gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
    """act(gate) * up: silu_gated (SwiGLU) or gelu_gated (GeGLU, tanh gelu)."""
    _check_kind(kind, GATED_ACTIVATIONS, "gated activation")
    if _kernel(gate):
        return torch.ops.eet_pipe.gated_activation(gate, up, kind)
    return reference.gated_activation(gate, up, kind)


def qkv_rotary_cache(qkv: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     write_index: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                     rotary: bool = True, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Split qkv into heads, rotate q and k, write k and v into the cache in place, return q.

    Args:
        qkv: [B, T, (Hq + 2 * Hkv) * D] (q heads, then k heads, then v heads).
        cos, sin: [B, T, D] per token, or [P, D] tables (fp32 or qkv's dtype) with `positions`;
            ignored (may be None) when `rotary` is False.
        k_cache, v_cache: [S, Hkv, L, D] in qkv's dtype; ``[slots[b], :, write_index[b, t]]`` is written.
        slots: [B] int64; write_index: [B, T] int64.
        num_heads, num_kv_heads, head_dim: Hq, Hkv, D.
        rotary: apply rotate-half rotary to q and k.
        positions: [B, T] int64 rows of the cos/sin tables, or None for per-token cos/sin.
    Returns:
        q: [B, Hq, T, D] contiguous.
    """
    if _kernel(qkv):
        return torch.ops.eet_pipe.qkv_rotary_cache(qkv, cos, sin, k_cache, v_cache, slots, write_index,
                                                   num_heads, num_kv_heads, head_dim, rotary, positions)
    return reference.qkv_rotary_cache(qkv, cos, sin, k_cache, v_cache, slots, write_index, num_heads,
                                      num_kv_heads, head_dim, rotary, positions)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     lengths: torch.Tensor, valid: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """One query token per sequence attending over its cache slot (split-K on long caches).

    Args:
        q: [B, Hq, 1, D]; the kernel takes D a multiple of 8 up to 256, other D the reference.
        k_cache, v_cache: [S, Hkv, L, D] (may be a view ``[:, :, :K]`` of a longer cache).
        slots: [B] int64; lengths: [B] int64, columns ``0..lengths[b]-1`` are considered.
        valid: [S, L] bool; columns that are False are excluded.
        scale: softmax scale, default 1 / sqrt(D).
    Returns:
        [B, Hq, 1, D] in q's dtype; zeros for a sequence with no valid column.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if _kernel(q) and q.shape[-1] % 8 == 0 and q.shape[-1] <= DECODE_MAX_HEAD_DIM:
        return torch.ops.eet_pipe.decode_attention(q, k_cache, v_cache, slots, lengths, valid, scale)
    return reference.decode_attention(q, k_cache, v_cache, slots, lengths, valid, scale)


def decode_attention_qkv(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                         write_index: torch.Tensor, lengths: torch.Tensor, valid: torch.Tensor, num_heads: int,
                         num_kv_heads: int, scale: float | None = None) -> torch.Tensor:
    """A decode step's attention straight from the fused q/k/v projection, without rotary: each sequence's new k
    and v are written into the cache (in place) and attended to with the rest of its cache slot --
    `decode_attention(qkv_rotary_cache(qkv, ..., rotary=False), ...)` in one kernel.

    Args:
        qkv: [B, 1, (Hq + 2 * Hkv) * D] (q heads, then k heads, then v heads).
        k_cache, v_cache: [S, Hkv, K, D] (may be a view ``[:, :, :K]`` of a longer cache); column
            ``write_index[b]`` of row ``slots[b]`` is written.
        slots, lengths, valid, scale: as in `decode_attention` (lengths counting the new column).
        write_index: [B, 1] int64 cache columns of the new tokens.
        num_heads, num_kv_heads: Hq, Hkv.
    Returns:
        [B, Hq, 1, D] in qkv's dtype.
    """
    d = k_cache.shape[-1]
    scale = d**-0.5 if scale is None else float(scale)
    if _kernel(qkv) and d % 8 == 0 and d <= DECODE_MAX_HEAD_DIM:
        return torch.ops.eet_pipe.decode_attention_qkv(qkv, k_cache, v_cache, slots, write_index, lengths, valid,
                                                       num_heads, scale)
    q = qkv_rotary_cache(qkv, None, None, k_cache, v_cache, slots, write_index, num_heads, num_kv_heads, d,
                         rotary=False)
    return decode_attention(q, k_cache, v_cache, slots, lengths, valid, scale)


def _gemv(x: torch.Tensor, rows: int, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
          activation_kind: str | None, residual: torch.Tensor | None) -> torch.Tensor:
    """The GEMV kernel on x viewed as [rows, K] (residual as [rows, N]); returns [..., N]."""
    n = weight.shape[0]
    res = None if residual is None else residual.reshape(rows, n)
    y = torch.ops.eet_pipe.gemv(x.reshape(rows, x.shape[-1]), weight, scale, bias, res, activation_kind or "none")
    return y.view(*x.shape[:-1], n)


def _epilogue_fits(x: torch.Tensor, n: int, activation_kind: str | None, residual: torch.Tensor | None) -> bool:
    """Whether the GEMV epilogue can take this activation and residual (else they run as separate ops)."""
    if activation_kind is not None:
        _check_kind(activation_kind, ACTIVATIONS, "activation")
    return residual is None or (residual.shape == (*x.shape[:-1], n) and residual.dtype == x.dtype
                                and residual.device == x.device)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd would record this call (the GEMV op has no backward: such calls take the matmul path)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def epilogue(y: torch.Tensor, activation_kind: str | None, residual: torch.Tensor | None) -> torch.Tensor:
    """``act(y) + residual`` as separate ops: the epilogue of `linear` / `int8_linear` when it is not fused."""
    if activation_kind is not None:
        y = activation(y, activation_kind)
    return y if residual is None else y + residual


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation_kind: str | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """``act(x @ weight.T + bias) + residual`` (`torch.nn.functional.linear`, then the optional epilogue).

    Args:
        x: [..., K]; weight: [N, K]; bias: [N] or None, all of one dtype.
        activation_kind: None or one of ACTIVATIONS, applied after the bias.
        residual: [..., N] added last, or None.
    Returns:
        [..., N]. With GEMV_ENABLED, on CUDA in fp16/bf16, inputs of at most GEMV_MAX_ROWS rows (decode
        steps) run the GEMV kernel, which streams each weight once and applies the epilogue before its
        single rounding (inference only: anything that needs gradients takes F.linear). On CUDA, fp16/bf16
        inputs whose row count is a decode batch bucket (`gemm_select.SELECT_ROWS`) run cuBLASLt with the
        algorithm selected for the shape and the epilogue fused (`gemm_select`). Everything else is F.linear
        followed by the activation and the addition as separate ops.
    """
    rows = _rows(x)
    if (GEMV_ENABLED and _kernel(x) and 0 < rows <= GEMV_MAX_ROWS and x.dtype in (torch.float16, torch.bfloat16)
            and weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype) and weight.is_contiguous()
            and _epilogue_fits(x, weight.shape[0], activation_kind, residual)
            and not _needs_grad(x, weight, bias, residual)):
        return _gemv(x, rows, weight, None, bias, activation_kind, residual)
    if _kernel(x) and not _needs_grad(x, weight, bias, residual):
        y = _selected_gemm(x, rows, weight, bias, activation_kind, residual)
        if y is not None:
            return y
    return epilogue(F.linear(x, weight, bias), activation_kind, residual)


def _selected_gemm(x: torch.Tensor, rows: int, weight: torch.Tensor, bias: torch.Tensor | None,
                   activation_kind: str | None, residual: torch.Tensor | None) -> torch.Tensor | None:
    """`linear` through `gemm_select` (cuBLASLt, per-shape algorithm, epilogue fused as far as cuBLASLt can):
    None when the shape does not take that path or its selection chose the plain one."""
    n = weight.shape[0]
    x2 = x.reshape(rows, x.shape[-1])
    res2 = None if residual is None or residual.shape != (*x.shape[:-1], n) else residual.reshape(rows, n)
    if not gemm_select.fits(x2, weight, bias, res2):
        return None
    # cuBLASLt adds its C matrix before the activation: fuse the activation if it has it, else the residual
    fused_act = activation_kind if activation_kind in gemm_select.EPILOGUE_ACTIVATIONS else None
    fused_res = res2 if activation_kind is None else None
    after_act = activation_kind if fused_act is None else None
    after_res = residual if fused_res is None else None
    act = fused_act or "none"

    def plain(w: torch.Tensor) -> torch.Tensor:  # what the cuBLASLt call computes, the way F.linear would
        return epilogue(F.linear(x2, w, bias), fused_act, fused_res)

    y = gemm_select.run(x2, weight, bias, fused_res, act, plain)
    if y is None:
        return None
    return epilogue(y.view(*x.shape[:-1], n), after_act, after_res)


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """qweight [N, K] int8 * scale [N] -> [N, K] in `dtype` (default: the scale's dtype); on CUDA one kernel
    that moves 16 weights per thread (the same values as the reference, `eet_pipe.ops.quant.dequantize_int8`)."""
    dtype = scale.dtype if dtype is None else dtype
    if (_kernel(qweight) and qweight.dtype == torch.int8 and qweight.dim() == 2 and dtype in _FLOAT_DTYPES
            and scale.shape == (qweight.shape[0],)):
        return torch.ops.eet_pipe.dequantize_int8(qweight, scale.to(dtype))
    return quant.dequantize_int8(qweight, scale, dtype)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                activation_kind: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only int8 linear ``act(x @ (qweight * scale[:, None]).T + bias) + residual``.

    Args:
        x: [..., K] fp16/bf16/fp32; qweight: [N, K] int8 (``quantize_int8``); scale, bias: [N] in x's dtype;
        activation_kind, residual: the optional epilogue, as in `linear`.
    Returns:
        [..., N]. On CUDA, up to INT8_GEMV_MAX_ROWS rows run the GEMV kernel with the epilogue fused; more
        rows dequantise the weight (one kernel) and run `linear` on it (fp16/bf16: a selected cuBLASLt GEMM with
        the epilogue fused, for decode-bucket row counts). Elsewhere the reference: dequantise + matmul.
    """
    rows = _rows(x)
    if _kernel(x) and not _needs_grad(x, scale, bias, residual):
        if 0 < rows <= INT8_GEMV_MAX_ROWS and _epilogue_fits(x, qweight.shape[0], activation_kind, residual):
            return _gemv(x, rows, qweight, scale, bias, activation_kind, residual)
        if (rows > INT8_GEMV_MAX_ROWS and x.dtype in (torch.float16, torch.bfloat16) and qweight.dtype == torch.int8
                and qweight.shape == (qweight.shape[0], x.shape[-1]) and scale.shape == (qweight.shape[0],)
                and (bias is None or bias.dtype == x.dtype)):
            return linear(x, dequantize_int8(qweight, scale, x.dtype), bias, activation_kind, residual)
    return epilogue(reference.int8_linear(x, qweight, scale, bias), activation_kind, residual)


def gated_linear(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, kind: str, gate_bias: torch.Tensor | None = None,
                 up_bias: torch.Tensor | None = None, gate_scale: torch.Tensor | None = None,
                 up_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The first half of a gated MLP: ``gated_activation(x @ gate.T + gate_bias, x @ up.T + up_bias, kind)``.

    Args:
        x: [..., K]; gate, up: [N, K], both in x's dtype or both int8 (`quantize_int8`) with `gate_scale` and
        `up_scale` [N]; biases [N] or None; kind: silu_gated (SwiGLU) or gelu_gated (GeGLU).
    Returns:
        [..., N]. On CUDA, decode-sized inputs (as `linear` and `int8_linear` pick the GEMV kernel: up to
        GEMV_MAX_ROWS rows dense, INT8_GEMV_MAX_ROWS int8) run one kernel that streams both weights and applies
        the activation before its single rounding, instead of two GEMVs and the element-wise product. Anything
        else runs the two projections (`linear` / `int8_linear`) and `gated_activation`.
    """
    _check_kind(kind, GATED_ACTIVATIONS, "gated activation")
    if (gate_scale is None) != (up_scale is None):
        raise ValueError("gated_linear: gate_scale and up_scale are given together (int8 weights) or not at all")
    int8 = gate_scale is not None
    rows = _rows(x)
    if (GEMV_ENABLED and _kernel(x) and 0 < rows <= (INT8_GEMV_MAX_ROWS if int8 else GEMV_MAX_ROWS)
            and x.dtype in (torch.float16, torch.bfloat16) and gate.shape == up.shape and gate.dtype == up.dtype
            and gate.dtype == (torch.int8 if int8 else x.dtype) and gate.is_contiguous() and up.is_contiguous()
            and not _needs_grad(x, gate, up, gate_bias, up_bias, gate_scale, up_scale)):
        y = torch.ops.eet_pipe.gemv_gated(x.reshape(rows, x.shape[-1]), gate, up, gate_scale, up_scale, gate_bias,
                                          up_bias, kind)
        return y.view(*x.shape[:-1], gate.shape[0])
    if int8:
        return gated_activation(int8_linear(x, gate, gate_scale, gate_bias), int8_linear(x, up, up_scale, up_bias),
                                kind)
    return gated_activation(linear(x, gate, gate_bias), linear(x, up, up_bias), kind)
