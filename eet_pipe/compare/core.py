"""Precision comparison by canonical name: two sides, the same inputs, every point in tree order.

``python -m eet_pipe.compare model=<dir|preset> a=hf b=eet:dtype=fp16 prompt="text"`` prints one row
per point (embed, each layer's attention and MLP internals, layer outputs, final_norm, head / pooler)
with max-abs, mean-abs, max-rel and cosine errors and PASS/FAIL, marks the first failing point ``>>``
and exits 0 (all pass), 1 (some fail) or 2 (usage or input error). See docs/COMPARE.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from eet_pipe.compare.points import (
    CaptureHooks,
    HFCapture,
    capture_keys,
    derive_points,
    reference_ops,
    select_points,
    valid_elements,
)
from eet_pipe.generation.lm import LanguageModel, check_forward_inputs, from_pretrained
from eet_pipe.loading.presets import resolve_model
from eet_pipe.models.config import ArchConfig
from eet_pipe.models.dtypes import dtype_name, parse_dtype
from eet_pipe.models.model import CanonicalModel

__all__ = ["Side", "Row", "Report", "compare", "tolerance", "reference_ops"]

SIDE_KINDS = ("eet", "hf")
OPS_MODES = ("auto", "reference")
SIDE_OPTIONS = ("dtype", "device", "stages", "ops", "model")


@dataclass
class Side:
    """One side of a comparison.

    Spec strings (`Side.parse`): ``hf``, ``eet``, ``eet:dtype=fp16``, ``eet:stages=2``,
    ``eet:ops=reference``, ``hf:dtype=bf16,device=cuda:0``, ``eet:model=/other/ckpt`` (options joined
    by commas; ``model=`` gives this side its own checkpoint of the same architecture).
    """

    kind: str = "eet"
    """'eet' (our model) or 'hf' (HF transformers reference)."""
    model: Any = None
    """Checkpoint dir / HF-cache name / preset, or an in-memory model (LanguageModel or CanonicalModel for
    eet, an HF PreTrainedModel for hf), which runs in its own dtype and device."""
    dtype: torch.dtype = torch.float32
    """Weights and activations dtype."""
    device: str = "cpu"
    """Device of the model (of every stage when stages > 1)."""
    stages: int = 1
    """eet only: > 1 runs a PipelineEngine (gpipe, 1 microbatch, even plan) with `forward_capture`."""
    ops: str = "auto"
    """eet only: 'auto' (kernels where available) or 'reference' (pure-PyTorch ops, see `reference_ops`)."""
    weights: str | None = None
    """'random' builds seeded random weights (presets); None reads the checkpoint."""
    weights_seed: int = 0
    """Seed of random weights (the same on both sides)."""

    def __post_init__(self) -> None:
        self.dtype = parse_dtype(self.dtype)
        if self.kind not in SIDE_KINDS:
            raise ValueError(f"side kind {self.kind!r} is invalid; allowed: {', '.join(SIDE_KINDS)}")
        if self.ops not in OPS_MODES:
            raise ValueError(f"side option ops={self.ops!r} is invalid; allowed: {', '.join(OPS_MODES)}")
        if self.stages < 1:
            raise ValueError(f"side option stages={self.stages} is invalid: must be >= 1")
        if self.kind == "hf" and (self.stages != 1 or self.ops != "auto"):
            raise ValueError("side hf takes dtype= and device= only (stages= and ops= are eet options)")
        if self.stages > 1 and self.ops == "reference":
            raise ValueError("ops=reference cannot be combined with stages>1: the switch is patched in this "
                             "process only, not in the pipeline's worker processes")

    @classmethod
    def parse(cls, spec: str, model: Any, weights: str | None = None, weights_seed: int = 0) -> Side:
        """``kind[:key=value,...]`` -> Side; keys: dtype, device, stages, ops, model (this side's own model)."""
        kind, _, rest = spec.partition(":")
        opts: dict[str, Any] = {"model": model}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq or key not in SIDE_OPTIONS:
                raise ValueError(f"side spec {spec!r}: {item!r} is not key=value with key {', '.join(SIDE_OPTIONS)}")
            opts[key] = value
        if not str(opts.get("stages", "1")).isdigit():
            raise ValueError(f"side spec {spec!r}: stages={opts['stages']!r} is not an integer")
        opts["stages"] = int(opts.get("stages", 1))
        return cls(kind=kind, weights=weights, weights_seed=weights_seed, **opts)

    @property
    def label(self) -> str:
        """Short description, e.g. 'eet fp16 cpu stages=2'."""
        extra = (f" stages={self.stages}" if self.stages > 1 else "") + (" ops=reference" if self.ops == "reference" else "")
        return f"{self.kind} {dtype_name(self.dtype)} {self.device}{extra}"


class _EetRunner:
    """Our model on one device; points recorded with `CaptureHooks`."""

    def __init__(self, side: Side, which: str) -> None:
        if isinstance(side.model, LanguageModel):
            self.lm = side.model
        elif isinstance(side.model, CanonicalModel):
            self.lm = LanguageModel(side.model)
        else:
            self.lm = from_pretrained(str(side.model), side.weights, side.dtype, side.device, side.weights_seed)
        self.cfg, self.dtype, self.ops = self.lm.cfg, self.lm.dtype, side.ops
        self.desc = Side(side.kind, dtype=self.dtype, device=str(self.lm.device), ops=side.ops).label  # as loaded
        self.label = f"{which} ({self.desc})"

    def capture(self, points: Sequence[str], ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        keys = sorted({k for p in points for k in capture_keys(p, self.cfg)})
        mode = reference_ops() if self.ops == "reference" else nullcontext()
        with mode, CaptureHooks([self.lm.model], keys) as hooks:
            self.lm.forward(ids, mask)
        return derive_points(points, hooks.tensors(), self.cfg, mask, self.label)

    def close(self) -> None:
        """Nothing to release."""


class _PipelineRunner:
    """Our model as a PipelineEngine; points recorded in every stage (`PipelineEngine.forward_capture`)."""

    def __init__(self, side: Side, which: str) -> None:
        from eet_pipe.runtime.engine import PipelineEngine

        model = side.model if isinstance(side.model, (LanguageModel, CanonicalModel)) else str(side.model)
        cpu = torch.device(side.device).type == "cpu"
        self.engine = PipelineEngine(model, devices=["cpu"] * side.stages if cpu else None, stages=side.stages,
                                     schedule="gpipe", microbatches=1, plan="even", dtype=side.dtype,
                                     weights=side.weights, weights_seed=side.weights_seed, timeout=120)
        self.cfg, self.dtype, self.desc = self.engine.cfg, side.dtype, side.label
        self.label = f"{which} ({self.desc})"

    def capture(self, points: Sequence[str], ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        keys = sorted({k for p in points for k in capture_keys(p, self.cfg)})
        _, raw = self.engine.forward_capture(ids, mask, keys, microbatches=1)
        return derive_points(points, raw, self.cfg, mask, self.label)

    def close(self) -> None:
        self.engine.close()


class _HFRunner:
    """The HF transformers reference, loaded from the same checkpoint directory with eager attention."""

    def __init__(self, side: Side, which: str) -> None:
        if isinstance(side.model, nn.Module):
            self.recorder = HFCapture(side.model)
        else:
            spec = resolve_model(str(side.model), side.weights, side.weights_seed)
            if spec.source != "dir":
                raise ValueError(f"side {which} (hf) needs an HF checkpoint directory; model={side.model!r} "
                                 f"(weights={side.weights}) has {spec.source} weights")
            self.recorder = HFCapture.load(spec.path, spec.cfg.is_decoder, side.dtype, side.device)
        param = next(self.recorder.model.parameters())
        self.cfg, self.dtype = self.recorder.cfg, param.dtype
        self.desc = Side("hf", dtype=param.dtype, device=str(param.device)).label
        self.label = f"{which} ({self.desc})"

    def capture(self, points: Sequence[str], ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.recorder.capture(points, ids, mask, self.label)

    def close(self) -> None:
        """Nothing to release."""


def _runner(side: Side, which: str) -> _EetRunner | _PipelineRunner | _HFRunner:
    if side.kind == "hf":
        return _HFRunner(side, which)
    return _PipelineRunner(side, which) if side.stages > 1 else _EetRunner(side, which)


def tolerance(dtype_a: torch.dtype, dtype_b: torch.dtype, scale: float) -> float:
    """Max-abs bound for a point: fp32 vs fp32 1e-4 (absolute); fp16 involved 2e-2 * scale; bf16 involved
    5e-2 * scale, where scale = max(1, max |side a| over the compared elements)."""
    dtypes = {dtype_a, dtype_b}
    if torch.bfloat16 in dtypes:
        return 5e-2 * scale
    if torch.float16 in dtypes:
        return 2e-2 * scale
    return 1e-4


@dataclass
class Row:
    """The comparison of one point (errors over the elements of real tokens)."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    mean_abs: float
    max_rel: float
    """max |a - b| / max(|a|, 1e-3 * max|a|): relative to each element, near-zeros floored."""
    cosine: float
    tol: float
    passed: bool
    worst: list[dict[str, Any]] = field(default_factory=list)
    """The largest errors: {"index": [...], "a": ..., "b": ..., "abs": ...}."""


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = a.norm().item(), b.norm().item()
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return (a @ b).item() / (na * nb)


def _worst(diff: torch.Tensor, a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor, k: int) -> list[dict]:
    flat = diff.masked_fill(~valid, -1.0).flatten().nan_to_num(nan=math.inf)
    top = flat.topk(min(k, int(valid.sum()))).indices
    return [{"index": [int(i) for i in torch.unravel_index(j, diff.shape)], "a": a.flatten()[j].item(),
             "b": b.flatten()[j].item(), "abs": diff.flatten()[j].item()} for j in top]


def _compare_point(name: str, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor,
                   tol_of: Callable[[float], float], topk: int) -> Row:
    if a.shape != b.shape:
        raise ValueError(f"point {name}: shapes differ: side a {tuple(a.shape)} vs side b {tuple(b.shape)}")
    a, b = a.double().cpu(), b.double().cpu()
    valid = valid_elements(name, a.shape, mask)
    diff = (a - b).abs()
    av, bv, dv = a[valid], b[valid], diff[valid]
    top = av.abs().max().item() if av.numel() else 0.0
    max_abs = dv.max().item() if dv.numel() else 0.0
    rel = dv / av.abs().clamp_min(max(1e-3 * top, 1e-30))
    tol = tol_of(max(1.0, top))
    passed = bool(max_abs <= tol)  # NaN fails
    return Row(name=name, shape=tuple(a.shape), max_abs=max_abs, mean_abs=dv.mean().item() if dv.numel() else 0.0,
               max_rel=rel.max().item() if rel.numel() else 0.0, cosine=_cosine(av, bv), tol=tol, passed=passed,
               worst=[] if passed or topk <= 0 else _worst(diff, a, b, valid, topk))


@dataclass
class Report:
    """Rows in tree order plus the descriptions of both sides."""

    a: str
    b: str
    rows: list[Row]

    @property
    def first_failure(self) -> Row | None:
        """The first failing point in tree order (the first divergence), or None."""
        return next((r for r in self.rows if not r.passed), None)

    @property
    def passed(self) -> bool:
        return self.first_failure is None

    def row(self, name: str) -> Row:
        """The row of one point."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no point {name!r} in this report; points: {', '.join(r.name for r in self.rows)}")

    def summary(self) -> str:
        """'first divergence: <point> (max-abs …)' or 'all N points pass'."""
        first = self.first_failure
        if first is None:
            return f"all {len(self.rows)} points pass"
        failing = sum(not r.passed for r in self.rows)
        return f"first divergence: {first.name} (max-abs {first.max_abs:.1e}); {failing} of {len(self.rows)} points fail"

    def table(self) -> str:
        """The text table; ``>>`` marks the first failing point; worst elements under failing rows."""
        first = self.first_failure
        width = max([len(r.name) for r in self.rows] + [5])
        lines = [f"side a: {self.a}", f"side b: {self.b}",
                 f"   {'point':<{width}}  {'shape':<14} {'max-abs':>9} {'mean-abs':>9} {'max-rel':>9} "
                 f"{'cosine':>10} {'tol':>9}  result"]
        for r in self.rows:
            mark = ">> " if r is first else "   "
            shape = "x".join(map(str, r.shape))
            lines.append(f"{mark}{r.name:<{width}}  {shape:<14} {r.max_abs:9.2e} {r.mean_abs:9.2e} {r.max_rel:9.2e} "
                         f"{r.cosine:10.7f} {r.tol:9.1e}  {'PASS' if r.passed else 'FAIL'}")
            lines += [f"{'':{width + 5}}{w['index']}  a={w['a']:.6g}  b={w['b']:.6g}  |a-b|={w['abs']:.3g}"
                      for w in r.worst]
        return "\n".join([*lines, self.summary()])

    def to_dict(self) -> dict[str, Any]:
        """Machine-readable form (what ``--json`` prints)."""
        first = self.first_failure
        return {"a": self.a, "b": self.b, "passed": self.passed, "first_failure": first.name if first else None,
                "summary": self.summary(), "rows": [asdict(r) for r in self.rows]}


def _check_configs(a: ArchConfig, b: ArchConfig) -> None:
    da, db = a.to_dict(), b.to_dict()
    diff = [f"{k}: a={da[k]!r} b={db[k]!r}" for k in da if k != "extra" and da[k] != db.get(k)]
    if diff:
        raise ValueError("the two sides are different models (architecture/config differs): " + "; ".join(diff))


def compare(a: Side, b: Side, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            points: Sequence[str] | None = None, tol: float | None = None, topk: int = 0) -> Report:
    """Run both sides on the same inputs and compare every point in tree order.

    Args:
        a, b: the sides; `a` is the reference (its magnitudes scale the tolerance).
        input_ids: [B, T] int64; attention_mask: [B, T] (1 = real token), default all ones.
        points: point names or prefixes (``layers.3``) to restrict the comparison; default all.
        tol: a max-abs bound for every point instead of the dtype-based `tolerance`.
        topk: keep the `topk` largest errors (with indices) of each failing point.
    Raises:
        ValueError: different architectures/configs, a point one side lacks, shapes that differ.
    """
    ids = input_ids.long().cpu() if input_ids.dim() == 2 else input_ids.long().cpu().view(1, -1)
    with ExitStack() as running:
        ra = _runner(a, "a")
        running.callback(ra.close)
        rb = _runner(b, "b")
        running.callback(rb.close)
        _check_configs(ra.cfg, rb.cfg)
        mask = check_forward_inputs(ra.cfg, ids, attention_mask)
        names = select_points(ra.cfg, points)
        ta, tb = ra.capture(names, ids, mask), rb.capture(names, ids, mask)
    tol_of = (lambda scale: tol) if tol is not None else (lambda scale: tolerance(ra.dtype, rb.dtype, scale))
    rows = [_compare_point(n, ta[n], tb[n], mask, tol_of, topk) for n in names]
    return Report(a=f"{ra.desc} ({_source(a)})", b=f"{rb.desc} ({_source(b)})", rows=rows)


def _source(side: Side) -> str:
    if isinstance(side.model, (str, bytes)) or hasattr(side.model, "__fspath__"):
        seeded = f", weights={side.weights} weights_seed={side.weights_seed}" if side.weights == "random" else ""
        return str(side.model) + seeded
    return f"in-memory {type(side.model).__name__}"
