"""Int8 weight-only quantisation of a canonical model's transformer layers.

`Int8Linear` holds int8 codes ``qweight`` [N, K] and per-output-channel ``scale`` [N] (from
``ops.quantize_int8``) and runs ``ops.int8_linear``: the CUDA GEMV kernel for up to
``ops.INT8_GEMV_MAX_ROWS`` rows (small-batch decode), the dequantisation kernel + a GEMM above, dequantise +
matmul on CPU.
`quantize_model` swaps ``attn.qkv``, ``attn.out``, ``mlp.up``, ``mlp.gate`` and ``mlp.down`` of
every layer in place, keeping the canonical names (``layers.3.attn.qkv.qweight``,
``layers.3.attn.qkv.scale``, ``layers.3.attn.qkv.bias``). Embeddings and the LM head stay in the
activation dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from eet_pipe import ops
from eet_pipe.models.model import CanonicalModel

__all__ = ["QUANTIZE_MODES", "QUANTIZED_LINEARS", "Int8Linear", "quantize_model", "check_quantize",
           "resolve_precision"]

QUANTIZE_MODES = ("int8-weight",)
"""Values accepted by ``quantize=``."""
QUANTIZED_LINEARS = ("attn.qkv", "attn.out", "mlp.up", "mlp.gate", "mlp.down")
"""Module paths inside each ``layers.{i}`` that `quantize_model` replaces (``mlp.gate`` when present)."""


class Int8Linear(nn.Module):
    """Weight-only int8 linear layer: ``y = x @ (qweight * scale[:, None]).T + bias``."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise ValueError(f"Int8Linear: qweight must be an int8 [N, K] tensor, got {qweight.dtype} "
                             f"{tuple(qweight.shape)}")
        if scale.shape != (qweight.shape[0],):
            raise ValueError(f"Int8Linear: scale shape {tuple(scale.shape)} != [N] = [{qweight.shape[0]}]")
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)  # [N, K] int8
        self.register_buffer("scale", scale)  # [N], activation dtype
        self.register_buffer("bias", bias)  # [N] or None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantise an ``nn.Linear`` (symmetric, one scale per output channel in the weight's dtype)."""
        qweight, scale = ops.quantize_int8(linear.weight.detach())
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(qweight, scale, bias)

    def forward(self, x: torch.Tensor, activation: str | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:  # [..., K] -> [..., N]
        """act(x W^T + bias) + residual, the epilogue optional (see `eet_pipe.models.layers.project`)."""
        return ops.int8_linear(x, self.qweight, self.scale, self.bias, activation, residual)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _replace(parent: nn.Module, path: str) -> bool:
    """Swap the nn.Linear at dotted `path` under `parent` for an Int8Linear; False if absent."""
    owner_path, _, name = path.rpartition(".")
    owner = parent.get_submodule(owner_path)
    linear = getattr(owner, name, None)
    if linear is None or isinstance(linear, Int8Linear):
        return False
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"quantize_model: {path} is a {type(linear).__name__}, expected nn.Linear")
    setattr(owner, name, Int8Linear.from_linear(linear))
    return True


def quantize_model(model: CanonicalModel) -> CanonicalModel:
    """Quantise every layer's projections to int8 weight-only, in place.

    Args:
        model: a loaded canonical model (or slice); already quantised modules are left alone.
    Returns:
        the same model, with `QUANTIZED_LINEARS` of each ``layers.{i}`` as `Int8Linear`.
    """
    with torch.no_grad():
        for layer in model.layers.values():
            for path in QUANTIZED_LINEARS:
                _replace(layer, path)
    return model


def check_quantize(quantize: str | None) -> str | None:
    """Validate a ``quantize=`` value (None = no quantisation)."""
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize={quantize!r} is not supported; allowed: {', '.join(QUANTIZE_MODES)}")
    return quantize


def resolve_precision(dtype: str | torch.dtype | None, quantize: str | None,
                      device: torch.device) -> tuple[str | torch.dtype | None, str | None]:
    """Split ``dtype="int8"`` into (activation dtype, "int8-weight").

    ``dtype="int8"`` means int8 weights with fp16 activations on CUDA and fp32 on CPU; any other
    dtype passes through unchanged with the validated `quantize`.
    """
    quantize = check_quantize(quantize)
    if not (isinstance(dtype, str) and dtype.lower() == "int8"):
        return dtype, quantize
    return ("fp16" if device.type == "cuda" else "fp32"), "int8-weight"
