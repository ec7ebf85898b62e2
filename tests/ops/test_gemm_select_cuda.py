"""The cuBLASLt GEMM op with fused epilogues, its candidates, and `linear`'s per-shape selection (GPU only).

Every candidate cuBLASLt proposes for a problem must compute the same thing: the op is compared with an
fp64 reference rounded once (cuBLASLt accumulates in fp32 and applies bias, activation and residual before
its single rounding), under the 0xFF-poisoned allocator of test_ops_cuda, for each candidate and for the
untimed first choice.
"""

from __future__ import annotations

import json

import pytest
import torch

from eet_pipe import ops
from eet_pipe.ops import gemm_select, reference
from tests.ops.test_ops_cuda import BF16, F16, TOL, poisoned, rand

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not ops.HAVE_EXT, reason=f"CUDA extension missing: {ops.EXT_REASON}"),
]

SHAPES = [(1, 4800, 1600), (8, 1600, 1600), (64, 6400, 1600), (64, 1600, 6400), (256, 264, 72), (2, 8, 8)]
EPILOGUES = [  # (activation, bias, residual)
    ("none", False, False), ("none", True, False), ("none", True, True), ("none", False, True),
    ("gelu_new", True, False), ("gelu_new", False, False), ("relu", True, False), ("relu", False, False),
]


@pytest.fixture
def selection(tmp_path):
    """An empty selection whose choices are filed under tmp_path; restored afterwards."""
    gemm_select.clear()
    gemm_select.set_cache_dir(tmp_path)
    yield tmp_path
    gemm_select.set_cache_dir(None)
    gemm_select.clear()


def want(x, w, b, act: str | None, res) -> torch.Tensor:
    """fp64 reference, one rounding: act(x @ w.T + b) + res."""
    y = x.double() @ w.double().T
    if b is not None:
        y = y + b.double()
    if act not in (None, "none"):
        y = reference.activation(y, act)
    if res is not None:
        y = y + res.double()
    return y.to(x.dtype)


def close(got: torch.Tensor, expected: torch.Tensor, k: int) -> None:
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert not got.isnan().any(), "output has NaN: an element was not written"
    atol, rtol = TOL["gemv"][got.dtype]
    torch.testing.assert_close(got, expected, atol=atol * max(1.0, (k / 1600) ** 0.5), rtol=rtol)


def problem(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, residual: bool, seed: object):
    x = rand(m, k, dtype=dtype, seed=(seed, "x"))
    w = rand(n, k, dtype=dtype, seed=(seed, "w"), scale=k ** -0.5)
    b = rand(n, dtype=dtype, seed=(seed, "b")) if bias else None
    r = rand(m, n, dtype=dtype, seed=(seed, "r")) if residual else None
    return x, w, b, r


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize(("act", "bias", "residual"), EPILOGUES)
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_every_candidate_computes_the_fused_linear(m: int, n: int, k: int, act: str, bias: bool, residual: bool,
                                                  dtype: torch.dtype) -> None:
    x, w, b, r = problem(m, n, k, dtype, bias, residual, (m, n, k, act, bias, residual))
    expected = want(x, w, b, act, r)
    algos, workspaces = torch.ops.eet_pipe.gemm_lt_algos(x, w, b, r, act, gemm_select.CANDIDATES)  # all it times
    assert algos.dtype == torch.uint8 and algos.device.type == "cpu" and algos.shape[1] == 64
    assert 1 <= algos.shape[0] <= gemm_select.CANDIDATES and workspaces.shape == (algos.shape[0],)
    assert (workspaces >= 0).all()
    with poisoned():
        close(torch.ops.eet_pipe.gemm_lt(x, w, b, r, act, None, 0), expected, k)  # cuBLASLt's first choice, untimed
        for algo, workspace in zip(algos, workspaces.tolist(), strict=True):
            close(torch.ops.eet_pipe.gemm_lt(x, w, b, r, act, algo, workspace), expected, k)


def test_bad_arguments_raise_clear_errors() -> None:
    x, w, b = rand(8, 64, dtype=F16, seed="ex"), rand(32, 64, dtype=F16, seed="ew"), rand(32, dtype=F16, seed="eb")
    lt = torch.ops.eet_pipe.gemm_lt
    with pytest.raises(RuntimeError, match="residual is added after the activation"):
        lt(x, w, b, rand(8, 32, dtype=F16), "gelu_new", None, 0)
    with pytest.raises(RuntimeError, match="activation must be none, gelu_new or relu"):
        lt(x, w, b, None, "gelu", None, 0)
    with pytest.raises(RuntimeError, match=r"K \(12\) and N \(32\) must be multiples of 8"):
        lt(rand(8, 12, dtype=F16), rand(32, 12, dtype=F16), None, None, "none", None, 0)
    with pytest.raises(RuntimeError, match="must be float16 or bfloat16"):
        lt(x.float(), w.float(), None, None, "none", None, 0)
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        lt(rand(8 * 64 + 1, dtype=F16)[1:].view(8, 64), w, None, None, "none", None, 0)
    with pytest.raises(RuntimeError, match="algo must be a contiguous CPU uint8 tensor of 64 bytes"):
        lt(x, w, b, None, "none", torch.zeros(63, dtype=torch.uint8), 0)
    with pytest.raises(RuntimeError, match="does not match x"):
        lt(x, rand(32, 72, dtype=F16), None, None, "none", None, 0)


def test_which_problems_take_the_selected_path() -> None:
    x, w = rand(16, 64, dtype=F16, seed="fx"), rand(32, 64, dtype=F16, seed="fw")
    assert gemm_select.fits(x, w, None, None)
    assert not gemm_select.fits(x[:12], w, None, None)  # 12 rows: not a decode bucket
    assert not gemm_select.fits(x, rand(36, 64, dtype=F16), None, None)  # N % 8
    assert not gemm_select.fits(x.float(), w.float(), None, None)  # fp32
    assert not gemm_select.fits(rand(16 * 64 + 1, dtype=F16)[1:].view(16, 64), w, None, None)  # misaligned
    assert not gemm_select.fits(x, w, None, rand(16, 8, dtype=F16))  # residual of another shape


@pytest.mark.parametrize(("act", "residual"), [(None, True), ("gelu_new", False), ("gelu_new", True), ("gelu", True)])
def test_linear_selects_once_per_shape_and_reuses_the_file(selection, monkeypatch, act, residual) -> None:
    x, w, b, r = problem(64, 1600, 1600, F16, True, residual, ("sel", act, residual))
    first = ops.linear(x, w, b, act, r)
    # the fused epilogue rounds once; an activation the epilogue lacks (erf gelu) or a residual after an
    # activation is added by a separate op: up to two roundings
    torch.testing.assert_close(first, want(x, w, b, act, r), atol=4e-3, rtol=4e-3)
    (key, choice), = gemm_select.choices().items()
    assert key.startswith("float16 m=64 n=1600 k=1600 bias=1")
    assert choice["source"] in ("lt", "torch") and choice["us"] > 0 and choice["plain_us"] >= choice["us"] * 0.999
    assert choice["candidates"] >= 1
    (path,) = gemm_select.save()
    assert key in json.loads(path.read_text())["choices"]
    gemm_select.clear()  # a new process: the file answers, nothing is measured again

    def no_search(*args):
        raise AssertionError("searched again although the file has the choice")

    monkeypatch.setattr(gemm_select, "_search", no_search)
    assert torch.equal(ops.linear(x, w, b, act, r), first)


def test_selected_gemms_replay_in_a_cuda_graph(selection) -> None:
    x, w, b, r = problem(16, 4800, 1600, F16, True, True, "graph")
    eager = ops.linear(x, w, b, None, r)  # the eager call selects (as a graph's warm-up does)
    assert len(gemm_select.choices()) == 1
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.linear(x, w, b, None, r)
    x2 = rand(16, 1600, dtype=F16, seed="graph2")
    x.copy_(x2)
    graph.replay()
    torch.testing.assert_close(out, ops.linear(x2, w, b, None, r), atol=0, rtol=0)
    torch.testing.assert_close(out, want(x2, w, b, None, r), atol=2e-3, rtol=2e-3)
    assert not torch.equal(out, eager)


def test_a_shape_first_seen_during_capture_runs_untimed(selection) -> None:
    x, w, b, _ = problem(32, 1600, 1600, F16, True, False, "capture")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.linear(x, w, b, "gelu_new")
    graph.replay()
    torch.testing.assert_close(out, want(x, w, b, "gelu_new", None), atol=2e-3, rtol=2e-3)
    assert gemm_select.choices() == {}  # nothing was timed inside the capture


# ---------------------------------------------------------------- int8 above the GEMV's rows


@pytest.mark.parametrize("dtype", [torch.float32, F16, BF16])
@pytest.mark.parametrize(("n", "k"), [(4800, 1600), (33, 40), (7, 16), (5, 3)])
def test_dequantize_int8_equals_the_reference_bit_for_bit(n: int, k: int, dtype: torch.dtype) -> None:
    qweight, scale = ops.quantize_int8(rand(n, k, dtype=dtype, seed=("dq", n, k), scale=0.02))
    want = ops.quant.dequantize_int8(qweight, scale)
    with poisoned():
        got = torch.ops.eet_pipe.dequantize_int8(qweight, scale)
        assert got.dtype == dtype and torch.equal(got, want)
        assert torch.equal(ops.dequantize_int8(qweight, scale, F16), ops.quant.dequantize_int8(qweight, scale, F16))
        t = qweight.t().contiguous().t()  # a strided view: the op copies it first
        assert torch.equal(torch.ops.eet_pipe.dequantize_int8(t, scale), want)
    with pytest.raises(RuntimeError, match="scale must have shape"):
        torch.ops.eet_pipe.dequantize_int8(qweight, scale[:-1])
    with pytest.raises(RuntimeError, match="qweight must be"):
        torch.ops.eet_pipe.dequantize_int8(qweight.float(), scale)


@pytest.mark.parametrize(("rows", "act", "residual"), [(8, None, True), (64, "gelu_new", False), (12, "gelu", True),
                                                       (256, None, False)])
def test_int8_linear_above_the_gemv_rows(selection, monkeypatch, rows: int, act: str | None, residual: bool) -> None:
    n, k = 1600, 6400
    qweight, scale = ops.quantize_int8(rand(n, k, dtype=F16, seed=("i8", rows), scale=k ** -0.5))
    x, b = rand(rows, k, dtype=F16, seed=("i8x", rows)), rand(n, dtype=F16, seed=("i8b", rows))
    r = rand(rows, n, dtype=F16, seed=("i8r", rows)) if residual else None
    assert rows > ops.INT8_GEMV_MAX_ROWS

    def no_reference(*args, **kwargs):
        raise AssertionError("int8_linear took the reference path on CUDA")

    monkeypatch.setattr(reference, "int8_linear", no_reference)
    got = ops.int8_linear(x, qweight, scale, b, act, r)
    expected = want(x, ops.quant.dequantize_int8(qweight, scale), b, act, r)
    torch.testing.assert_close(got, expected, atol=4e-3, rtol=4e-3)
    assert bool(gemm_select.choices()) == (rows in gemm_select.SELECT_ROWS)  # decode buckets were selected


@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_selection_runs_and_times_on_the_tensors_device(selection) -> None:
    """A model on cuda:1 while cuda:0 is current: the candidates run, and are timed, on cuda:1."""
    dev = torch.device("cuda", 1)
    x, w, b, r = (t.to(dev) for t in problem(64, 1600, 1600, F16, True, True, "dev1"))
    with torch.cuda.device(0):
        y = ops.linear(x, w, b, None, r)
    assert y.device == dev
    torch.testing.assert_close(y, want(x, w, b, None, r), atol=2e-3, rtol=2e-3)
    assert gemm_select.choices(0) == {}
    (choice,) = gemm_select.choices(1).values()
    # timed on cuda:0's stream, a cuda:1 GEMM would measure as almost nothing; a 5 MB weight takes microseconds
    assert choice["us"] > 1.0 and choice["plain_us"] > 1.0
