"""The gated GEMV kernel (gate and up projections and the gated activation of a SwiGLU / GeGLU MLP in one
kernel) against an fp64 reference, its argument checks, and `ops.gated_linear`'s dispatch (GPU only).

Outputs are poisoned as in test_ops_cuda.py, so an element the kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

from eet_pipe import ops
from eet_pipe.ops import reference
from tests.hf_models import mistral_dir  # noqa: F401  (fixture)
from tests.ops.test_ops_cuda import BF16, F16, F32, _kernel_names, close, poisoned, rand

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not ops.HAVE_EXT, reason=f"CUDA extension missing: {ops.EXT_REASON}"),
]

# (N, K): LLaMA-like and odd sizes; K = 13 and 1000 + 4 leave a tail after the 16-byte chunks (int8: 16 per
# chunk), K = 5000 at one row is read in slices by several warps per weight
SHAPES = [(300, 256), (1601, 4000), (2816, 1024), (33, 72), (7, 13), (130, 1004), (96, 5000)]


def _want(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, kind: str, gate_bias: torch.Tensor | None = None,
          up_bias: torch.Tensor | None = None, gate_scale: torch.Tensor | None = None,
          up_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The op in fp64, rounded once to x's dtype (what the kernel computes)."""
    def project(w: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        wd = w.double() if scale is None else w.double() * scale.double()[:, None]
        y = x.double() @ wd.T
        return y if bias is None else y + bias.double()

    g, u = project(gate, gate_scale, gate_bias), project(up, up_scale, up_bias)
    return reference.gated_activation(g, u, kind).to(x.dtype)


def _operands(n: int, k: int, rows: int, int8: bool, dtype: torch.dtype, case: object) -> dict:
    gate = rand(n, k, dtype=dtype, seed=(case, "g"), scale=0.02)
    up = rand(n, k, dtype=dtype, seed=(case, "u"), scale=0.02)
    scales = (None, None)
    if int8:
        (gate, gs), (up, us) = ops.quantize_int8(gate), ops.quantize_int8(up)
        scales = (gs, us)
    return {"x": rand(rows, k, dtype=dtype, seed=(case, "x")), "gate": gate, "up": up, "gate_scale": scales[0],
            "up_scale": scales[1], "gate_bias": rand(n, dtype=dtype, seed=(case, "gb")),
            "up_bias": rand(n, dtype=dtype, seed=(case, "ub"))}


def _call(o: dict, kind: str, bias: bool = True) -> torch.Tensor:
    return torch.ops.eet_pipe.gemv_gated(o["x"], o["gate"], o["up"], o["gate_scale"], o["up_scale"],
                                         o["gate_bias"] if bias else None, o["up_bias"] if bias else None, kind)


def _want_of(o: dict, kind: str, bias: bool = True) -> torch.Tensor:
    return _want(o["x"], o["gate"], o["up"], kind, o["gate_bias"] if bias else None, o["up_bias"] if bias else None,
                 o["gate_scale"], o["up_scale"])


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("kind", ["silu_gated", "gelu_gated"])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_gemv_gated(n: int, k: int, rows: int, int8: bool, kind: str, dtype: torch.dtype) -> None:
    o = _operands(n, k, rows, int8, dtype, (n, k, rows, int8, kind, dtype))
    with poisoned() as _pool:
        got = [_call(o, kind), _call(o, kind, bias=False)]
    for g, bias in zip(got, (True, False), strict=True):
        close(g, _want_of(o, kind, bias), "int8" if int8 else "gemv")


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize(("rows", "k"), [(1, 256), (3, 256), (1, 5000)])
def test_gemv_gated_unaligned_inputs(rows: int, k: int, dtype: torch.dtype) -> None:
    n = 200
    flat = {name: rand(count + 1, dtype=dtype, seed=(name, dtype), scale=0.02 if name != "x" else 1.0)
            for name, count in (("x", rows * k), ("gate", n * k), ("up", n * k))}
    aligned = {name: t[:-1].view(-1, k) for name, t in flat.items()}
    shifted = {name: t[1:].view(-1, k) for name, t in flat.items()}  # contiguous, not 16-byte aligned
    for pick in ("x", "gate", "up"):
        o = {**aligned, pick: shifted[pick], "gate_scale": None, "up_scale": None, "gate_bias": None, "up_bias": None}
        close(_call(o, "silu_gated"), _want_of(o, "silu_gated"), "gemv")


def test_gated_linear_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """One GEMV kernel (no GEMM, no element-wise product) where `linear` / `int8_linear` would take the GEMV;
    the two projections and `gated_activation` elsewhere, with the same values."""
    monkeypatch.setattr(ops, "GEMV_ENABLED", True)
    n, k = 384, 256
    dense = _operands(n, k, 1, False, F16, "dispatch")
    q = _operands(n, k, 1, True, F16, "dispatch8")
    for o, rows_list in ((dense, [(1, 1, k), (3, k), (2, 4, k)]), (q, [(1, k), (1, 4, k), (5, k)])):
        args = (o["gate"], o["up"], "silu_gated", o["gate_bias"], o["up_bias"], o["gate_scale"], o["up_scale"])
        limit = ops.INT8_GEMV_MAX_ROWS if o["gate_scale"] is not None else ops.GEMV_MAX_ROWS
        for shape in rows_list:
            x = rand(*shape, dtype=F16, seed=shape)
            want = _want(x.reshape(-1, k), *args[:2], "silu_gated", *args[3:]).view(*shape[:-1], n)
            got = ops.gated_linear(x, *args)
            # the fused kernel rounds once; the separate ops round the two projections too (a looser bound)
            torch.testing.assert_close(got, want, atol=4e-3, rtol=4e-3)
            names = _kernel_names(lambda x=x: ops.gated_linear(x, *args))
            fused = x.numel() // k <= limit
            assert len([name for name in names if "gemv_kernel" in name]) == (1 if fused else 0), names
            assert any("eltwise_kernel" in name for name in names) != fused, names  # gated_activation's kernel
    monkeypatch.setattr(ops, "GEMV_ENABLED", False)
    args = (dense["gate"], dense["up"], "silu_gated")
    assert not any("gemv_kernel" in name for name in _kernel_names(lambda: ops.gated_linear(dense["x"], *args)))
    monkeypatch.setattr(ops, "GEMV_ENABLED", True)
    wg = dense["gate"].clone().requires_grad_()  # anything that needs gradients runs the projections on their own
    assert any("eltwise_kernel" in name
               for name in _kernel_names(lambda: ops.gated_linear(dense["x"], wg, dense["up"], "silu_gated")))


def test_gemv_gated_bad_arguments_raise_clear_errors() -> None:
    o = _operands(8, 64, 2, False, F16, "errors")
    q = _operands(8, 64, 2, True, F16, "errors8")
    gated = torch.ops.eet_pipe.gemv_gated
    with pytest.raises(RuntimeError, match="gemv_gated: the GEMV kernel handles at most 4 rows, got M=5"):
        gated(rand(5, 64, dtype=F16), o["gate"], o["up"], None, None, None, None, "silu_gated")
    with pytest.raises(RuntimeError, match="must have the same shape and dtype"):
        gated(o["x"], o["gate"], rand(9, 64, dtype=F16), None, None, None, None, "silu_gated")
    with pytest.raises(RuntimeError, match="must have the same shape and dtype"):
        gated(o["x"], o["gate"], q["up"], None, q["up_scale"], None, None, "silu_gated")
    with pytest.raises(RuntimeError, match="an int8 gate needs its per-channel gate_scale"):
        gated(o["x"], q["gate"], q["up"], None, q["up_scale"], None, None, "silu_gated")
    with pytest.raises(RuntimeError, match="up_scale is only taken with an int8 up"):
        gated(o["x"], o["gate"], o["up"], None, q["up_scale"], None, None, "silu_gated")
    with pytest.raises(RuntimeError, match=r"up_bias must have shape \[N=8\]"):
        gated(o["x"], o["gate"], o["up"], None, None, None, rand(9, dtype=F16), "silu_gated")
    with pytest.raises(RuntimeError, match="gate must have shape"):
        gated(o["x"], rand(8, 63, dtype=F16), rand(8, 63, dtype=F16), None, None, None, None, "silu_gated")
    with pytest.raises(RuntimeError, match="gemv_gated: unknown gated activation 'swish'; allowed: silu_gated"):
        gated(o["x"], o["gate"], o["up"], None, None, None, None, "swish")
    with pytest.raises(ValueError, match="gate_scale and up_scale are given together"):
        ops.gated_linear(o["x"], q["gate"], q["up"], "silu_gated", gate_scale=q["gate_scale"])


def test_gated_mlp_runs_one_kernel_per_projection_at_one_row(mistral_dir, monkeypatch) -> None:  # noqa: F811
    """A SwiGLU MLP at one row: the fused gate/up GEMV and the down GEMV, nothing else; with a hook on a
    projection (the compare tool's captures) the projections run on their own, with the same values."""
    import eet_pipe

    monkeypatch.setattr(ops, "GEMV_ENABLED", True)  # whatever EET_PIPE_GEMV says
    lm = eet_pipe.from_pretrained(str(mistral_dir), dtype="fp16", device="cuda:0")
    mlp = dict(lm.model.named_modules())["layers.0.mlp"]
    x = rand(1, 1, mlp.up.in_features, dtype=F16, seed="mlp")
    with torch.inference_mode():
        fused = mlp(x)
        names = _kernel_names(lambda: mlp(x))
        assert [name for name in names if "gemv_kernel" in name] and not any("eltwise" in n for n in names), names
        assert len([name for name in names if "gemv_kernel" in name]) == 2, names  # gated and plain instantiations
        seen = []
        handle = mlp.gate.register_forward_hook(lambda _m, _i, out: seen.append(out))
        try:
            hooked = mlp(x)
        finally:
            handle.remove()
    assert len(seen) == 1 and seen[0].shape == (1, 1, mlp.gate.out_features)
    torch.testing.assert_close(hooked, fused, atol=4e-3, rtol=4e-3)
