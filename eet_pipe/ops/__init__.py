"""Fused ops: one dispatch point between the CUDA kernels (``eet_pipe._C``) and the references."""

from eet_pipe.ops.reference import (
    activation,
    attention,
    gated_activation,
    layer_norm,
    residual_layer_norm,
    residual_rms_norm,
    rms_norm,
    rotary,
)

__all__ = [
    "activation",
    "attention",
    "gated_activation",
    "layer_norm",
    "residual_layer_norm",
    "residual_rms_norm",
    "rms_norm",
    "rotary",
]
