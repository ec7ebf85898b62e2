"""Profiler: what each partition unit (`embed`, `layers.{i}`, `head`) costs on one device.

`profile_units` builds `embed`, ONE layer (`layers.0`) and `head` with random weights (timing does not
depend on the values, and a checkpoint is never read), runs each on the workload of one microbatch and
records its forward time (median after warm-up: CUDA events on a GPU, `time.perf_counter` on CPU),
parameter bytes, the bytes of the activation it sends onward, KV-cache bytes per token and peak
temporary bytes. All layers of a model are identical, so `layers.0`'s cost is reused for every layer
(the JSON says so in `note`).

Profiles are cached as JSON under ``$EET_PIPE_CACHE/profiles`` (default ``~/.cache/eet_pipe/profiles``),
one file per `profile_key` (model name, ArchConfig hash, device name, dtype, workload shape): a second
call with the same key reads the file and measures nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from eet_pipe.loading.presets import ModelSpec
from eet_pipe.loading.units import load_units
from eet_pipe.models.config import ArchConfig
from eet_pipe.models.dtypes import dtype_name, parse_dtype
from eet_pipe.models.kv_cache import KVCache
from eet_pipe.models.meta import StepMeta, decode_meta, prefill_meta
from eet_pipe.models.model import CanonicalModel
from eet_pipe.ops.cuda_graphs import graphed
from eet_pipe.partition.costs import UnitCost
from eet_pipe.partition.sizes import tied_elements

__all__ = ["CACHE_ENV", "PROFILE_FORMAT", "WORKLOAD_KINDS", "Profile", "Workload", "cache_path",
           "default_cache_dir", "device_name", "estimate_temp", "profile_key", "profile_units"]

log = logging.getLogger(__name__)

PROFILE_FORMAT = 1
"""Version written into profile JSON files."""
CACHE_ENV = "EET_PIPE_CACHE"
"""Environment variable naming the cache root; profiles go to its `profiles/` folder."""
CPU_UNIT_SECONDS = 0.25
"""On CPU, repeats are cut so that timing one unit takes about this long (keeps `auto` plans fast)."""
WORKLOAD_KINDS = ("prefill", "decode")


@dataclass(frozen=True)
class Workload:
    """What one microbatch is: a prefill of `batch` x `seq` tokens, or one decode step of `batch`
    sequences that already hold `context` cached tokens each."""

    kind: str = "prefill"
    """'prefill' (batch x seq new tokens, no cache) or 'decode' (batch x 1 new token over a KV cache)."""
    batch: int = 1
    """Sequences per microbatch."""
    seq: int = 512
    """Prefill: tokens per sequence. Decode: ignored (always 1 new token)."""
    context: int = 0
    """Decode: tokens already in the KV cache per sequence. Prefill: ignored."""

    def __post_init__(self) -> None:
        if self.kind not in WORKLOAD_KINDS:
            raise ValueError(f"Workload.kind={self.kind!r} is invalid; allowed: {', '.join(WORKLOAD_KINDS)}")
        if self.batch < 1:
            raise ValueError(f"Workload.batch={self.batch!r} is invalid: must be >= 1")
        if self.kind == "prefill" and self.seq < 1:
            raise ValueError(f"Workload.seq={self.seq!r} is invalid for a prefill workload: must be >= 1")
        if self.context < 0:
            raise ValueError(f"Workload.context={self.context!r} is invalid: must be >= 0")

    @property
    def new_tokens(self) -> int:
        """Tokens each sequence adds per microbatch: `seq` for prefill, 1 for decode."""
        return self.seq if self.kind == "prefill" else 1

    @property
    def shape(self) -> str:
        """Short label used in profile keys, e.g. 'prefill-1x512' or 'decode-8x1@1024'."""
        if self.kind == "prefill":
            return f"prefill-{self.batch}x{self.seq}"
        return f"decode-{self.batch}x1@{self.context}"

    def check(self, cfg: ArchConfig) -> None:
        """Raise ValueError when the workload does not fit the model's max positions."""
        need = self.seq if self.kind == "prefill" else self.context + 1
        if need > cfg.max_positions:
            what = f"seq={self.seq}" if self.kind == "prefill" else f"context={self.context} (+1 new token)"
            raise ValueError(f"workload {self.shape}: {what} exceeds the model's max positions {cfg.max_positions}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return dataclasses.asdict(self)


@dataclass
class Profile:
    """Costs of every unit of one model on one kind of device for one workload."""

    key: str
    """`profile_key` of what was measured: model, ArchConfig hash, device name, dtype, workload shape."""
    units: list[UnitCost]
    """Every unit in model order (embed, layers.0..N-1, head); layers reuse `layers.0`'s measurement."""
    device_name: str
    """torch.cuda.get_device_name, or 'cpu'."""
    dtype: str
    """'fp32', 'fp16' or 'bf16'."""
    workload: Workload
    """The microbatch the times are for."""
    info: dict[str, Any] = field(default_factory=dict)
    """How it was measured (measured units, warm-up, repeats, torch version, date, note)."""
    measured: bool = False
    """True when measured in this call, False when read from a file (not serialised)."""

    @property
    def total_time_s(self) -> float:
        """Forward time of the whole model for one microbatch, seconds."""
        return sum(u.time_s for u in self.units)

    def check_key(self, expected: str, source: str = "profile") -> None:
        """Raise ValueError naming both keys unless this profile was made for `expected`."""
        if self.key != expected:
            raise ValueError(f"{source} has key {self.key!r} but this plan needs {expected!r} (model@arch-hash/"
                             f"device/dtype/workload); pass a profile measured for this model, device, dtype and "
                             f"workload, or re-profile (refresh=true)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict with a 'format' version."""
        return {"format": PROFILE_FORMAT, "key": self.key, "device_name": self.device_name, "dtype": self.dtype,
                "workload": self.workload.to_dict(), "info": self.info,
                "units": [dataclasses.asdict(u) for u in self.units]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        """Inverse of `to_dict`; raises ValueError on another format or missing keys."""
        if data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"profile format {data.get('format')!r} is not supported; this version reads "
                             f"format {PROFILE_FORMAT}")
        missing = sorted({"key", "units", "device_name", "dtype", "workload"} - set(data))
        if missing:
            raise ValueError(f"profile dict lacks keys {missing}")
        return cls(key=data["key"], units=[UnitCost(**u) for u in data["units"]], device_name=data["device_name"],
                   dtype=data["dtype"], workload=Workload(**data["workload"]), info=dict(data.get("info", {})))

    def to_json(self, path: str | Path) -> None:
        """Write the profile as indented JSON (atomically: a temporary file, then a rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)

    @classmethod
    def from_json(cls, path: str | Path, expected_key: str | None = None) -> Profile:
        """Read a profile; with `expected_key`, raise ValueError naming both keys when they differ."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"profile file {path}: not valid JSON ({err})") from err
        prof = cls.from_dict(data)
        if expected_key is not None:
            prof.check_key(expected_key, source=f"profile file {path}")
        return prof


def device_name(device: str | torch.device) -> str:
    """Hardware name of a device: torch.cuda.get_device_name for CUDA, 'cpu' for CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev.index or 0)
    if dev.type == "cpu":
        return "cpu"
    raise ValueError(f"device {str(device)!r} has type {dev.type!r}; the profiler supports 'cuda' and 'cpu'")


def profile_key(spec: ModelSpec, hardware: str, dtype: torch.dtype | str, workload: Workload) -> str:
    """'model@archhash/device name/dtype/workload shape', e.g. 'tiny@3f2a9c1b04de/cpu/fp32/prefill-1x512'."""
    arch = json.dumps(spec.cfg.to_dict(), sort_keys=True, default=str)
    digest = hashlib.sha256(arch.encode()).hexdigest()[:12]
    return f"{spec.name}@{digest}/{hardware}/{dtype_name(parse_dtype(dtype))}/{workload.shape}"


def default_cache_dir() -> Path:
    """$EET_PIPE_CACHE/profiles, else ~/.cache/eet_pipe/profiles."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "eet_pipe") / "profiles"


TIMING = "graph-replay"
"""How GPU unit times are measured; part of the cache file name, so profiles timed otherwise are not reused."""


def cache_path(key: str, cache_dir: str | Path | None = None) -> Path:
    """Where the profile of `key` is cached: `cache_dir` (default `default_cache_dir()`) / a file name
    made from the key plus a short hash of it."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_")[:120]
    return folder / f"{slug}-{hashlib.sha256((TIMING + key).encode()).hexdigest()[:8]}.json"


# ---- measurement ----

@dataclass
class _Measure:
    """One measured unit."""

    time_s: float
    param_bytes: int
    out_bytes: int
    temp_bytes: int
    repeats: int


def _inputs(model: CanonicalModel, workload: Workload, device: torch.device,
            dtype: torch.dtype) -> tuple[torch.Tensor, StepMeta, KVCache | None]:
    """Input, metadata and (decode, layers only) KV cache of one microbatch for `model`."""
    cfg, b, t = model.cfg, workload.batch, workload.new_tokens
    gen = torch.Generator(device=device).manual_seed(0)
    if model.has_embed:
        x = torch.randint(0, cfg.vocab_size, (b, t), generator=gen, device=device)
    else:
        x = torch.randn(b, t, cfg.hidden_size, generator=gen, device=device).to(dtype)  # [B, T, H]
    if workload.kind == "prefill":
        return x, prefill_meta(torch.ones(b, t, dtype=torch.bool)).to(device), None
    ctx = torch.full((b,), workload.context, dtype=torch.long)
    meta = decode_meta(torch.arange(b), ctx, ctx).to(device)
    cache = None
    if model.layer_ids:
        cache = model.new_cache(b, workload.context + 1)
        cache.valid[:, : workload.context] = True  # attend over a full context, as a real decode step does
    return x, meta, cache


def _time_cpu(fn: Callable[[], object], warmup: int, repeats: int) -> tuple[float, int]:
    """(median seconds, repeats used); the fastest warm-up run sizes the timed runs to ~CPU_UNIT_SECONDS."""
    spent = []
    for _ in range(max(warmup, 1)):
        start = time.perf_counter()
        fn()
        spent.append(time.perf_counter() - start)
    repeats = max(3, min(repeats, int(CPU_UNIT_SECONDS / max(min(spent), 1e-9))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), repeats


def _time_cuda(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> tuple[float, int]:
    """(median seconds by CUDA events, repeats) on the current stream of `device`, replaying `fn` from a
    CUDA graph as the runtime does (so host launch time, which the runtime does not pay, is not counted)."""
    with torch.cuda.device(device):
        for _ in range(max(warmup, 1)):
            fn()
        fn = graphed(fn, device)
        torch.cuda.synchronize(device)
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for begin, end in pairs:
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(b.elapsed_time(e) / 1e3 for b, e in pairs), repeats


def _cuda_temp(fn: Callable[[], torch.Tensor], device: torch.device) -> int:
    """Peak bytes allocated while `fn` runs beyond what existed before, minus its output."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return max(peak - base - out.numel() * out.element_size(), 0)


def estimate_temp(cfg: ArchConfig, unit: str, workload: Workload, elem: int) -> int:
    """CPU estimate of a unit's temporaries from activation sizes (no allocator statistics on CPU)."""
    rows = workload.batch * workload.new_tokens
    if unit == "embed":
        return 2 * rows * cfg.hidden_size * elem  # token + position embeddings before the sum
    if unit == "head":
        return rows * cfg.hidden_size * elem  # the final norm's output
    keys = workload.new_tokens if workload.kind == "prefill" else workload.context + 1
    scores = workload.batch * cfg.num_heads * workload.new_tokens * keys  # [B, heads, T, K]
    mlp = rows * cfg.intermediate_size * (2 if cfg.gated else 1)  # [B, T, I] (+ gate)
    return (rows * (cfg.qkv_size + 2 * cfg.hidden_size) + scores + mlp) * elem


def _measure_unit(spec: ModelSpec, unit: str, device: torch.device, dtype: torch.dtype, workload: Workload,
                  warmup: int, repeats: int) -> _Measure:
    """Build `unit` alone on `device` and time its forward on one microbatch."""
    model = load_units(spec, [unit], dtype, device)
    x, meta, cache = _inputs(model, workload, device, dtype)
    params = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model(x, meta, cache)

    if device.type == "cuda":
        seconds, used = _time_cuda(run, device, warmup, repeats)
        temp = _cuda_temp(run, device)
    else:
        seconds, used = _time_cpu(run, warmup, repeats)
        temp = estimate_temp(spec.cfg, unit, workload, torch.empty((), dtype=dtype).element_size())
    out = run()
    return _Measure(seconds, params, out.numel() * out.element_size(), temp, used)


def _unit_costs(cfg: ArchConfig, measured: dict[str, _Measure], elem: int) -> list[UnitCost]:
    """Every unit of the model from the three measurements; each layer reuses `layers.0`."""
    kv_per_token = 2 * cfg.num_kv_heads * cfg.head_dim * elem  # keys + values, one layer
    out = []
    for name in cfg.unit_names():
        m = measured["layers.0" if name.startswith("layers.") else name]
        kv = kv_per_token if name.startswith("layers.") else 0
        out.append(UnitCost(name, m.time_s, m.param_bytes, m.out_bytes, kv, m.temp_bytes, tied_elements(cfg, name) * elem))
    return out


def _measure(spec: ModelSpec, device: torch.device, dtype: torch.dtype, workload: Workload, key: str,
             warmup: int, repeats: int) -> Profile:
    """Measure embed, layers.0 and head and expand to a full Profile."""
    timed = dataclasses.replace(spec, source="random", state=None)  # values do not change the timing
    measured = {u: _measure_unit(timed, u, device, dtype, workload, warmup, repeats)
                for u in ("embed", "layers.0", "head")}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elem = torch.empty((), dtype=dtype).element_size()
    info = {"measured_units": list(measured), "warmup": warmup,
            "repeats": {u: m.repeats for u, m in measured.items()},
            "timer": "cuda events" if device.type == "cuda" else "perf_counter",
            "temp_bytes": "max_memory_allocated delta" if device.type == "cuda" else "estimate from activation sizes",
            "note": f"layers.1..layers.{spec.cfg.num_layers - 1} reuse the measurement of layers.0 "
                    "(all layers are identical)",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    units = _unit_costs(spec.cfg, measured, elem)
    return Profile(key, units, device_name(device), dtype_name(dtype), workload, info, measured=True)


def profile_units(spec: ModelSpec, device: str | torch.device, dtype: torch.dtype | str, workload: Workload, *,
                  warmup: int = 3, repeats: int = 10, cache_dir: str | Path | None = None,
                  refresh: bool = False) -> Profile:
    """Profile of every unit of `spec` on `device` for one microbatch of `workload` (cached).

    Args:
        spec: the model (weights are never read: random weights of the same shapes are timed).
        device: where to measure, e.g. 'cuda:0' or 'cpu'.
        dtype: weights and activations, e.g. torch.float16 or 'fp16'.
        workload: one microbatch (prefill batch x seq, or a decode step over `context` cached tokens).
        warmup / repeats: untimed and timed runs per unit (CPU cuts repeats to ~0.25 s per unit).
        cache_dir: folder of cached profiles (default $EET_PIPE_CACHE/profiles or ~/.cache/eet_pipe/profiles).
        refresh: measure even when a cached profile exists, and overwrite it.
    Returns:
        The Profile; `measured` is False when it was read from the cache.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"profile_units: warmup={warmup}, repeats={repeats}; need warmup >= 0 and repeats >= 1")
    dtype, dev = parse_dtype(dtype), torch.device(device)
    workload.check(spec.cfg)
    key = profile_key(spec, device_name(dev), dtype, workload)
    path = cache_path(key, cache_dir)
    if path.exists() and not refresh:
        log.info("profile %s: read from %s", key, path)
        prof = Profile.from_json(path, expected_key=key)
        # what a tied head shares with the embedding follows from the config (profiles cached before it was
        # recorded have none)
        elem = torch.empty((), dtype=dtype).element_size()
        prof.units = [dataclasses.replace(u, shared_bytes=tied_elements(spec.cfg, u.name) * elem) for u in prof.units]
        return prof
    start = time.perf_counter()
    prof = _measure(spec, dev, dtype, workload, key, warmup, repeats)
    prof.to_json(path)
    log.info("profile %s: measured on %s in %.2f s, written to %s", key, dev, time.perf_counter() - start, path)
    return prof
