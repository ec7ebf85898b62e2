"""GEMM selection for decode-sized linears on CUDA: cuBLASLt's candidates, timed per shape, cached per device.

A decode step multiplies a batch of rows (1..256) by every weight once, so each GEMM is a stream of its
weight. cuBLAS's own heuristic is tuned for compute-bound shapes: for these it often picks a split-K tile
and a reduce kernel, and ``F.linear`` then adds the activation and the residual as two more kernels. For
rows that are a decode batch bucket (`SELECT_ROWS`, the batch sizes CUDA graphs are captured for), `linear`
runs ``torch.ops.eet_pipe.gemm_lt`` (csrc/gemm_lt.cpp) instead: the bias, the activation (tanh GELU or
ReLU) and the residual are in cuBLASLt's epilogue, and the algorithm is chosen here, once per
(device, dtype, M, N, K, epilogue):

* cuBLASLt's heuristic proposes up to `CANDIDATES` algorithms;
* each, and the plain path (``F.linear`` plus separate epilogue ops), is timed on copies of the weight that
  together exceed twice the L2 cache (in the model every layer's weight is read cold; at most 24 copies, so a
  weight under about 4 MB on an H100 is timed partly from L2), launches queued behind a GPU sleep so the
  host's launch rate does not limit them, best of `ROUNDS`;
* the fastest wins; if that is the plain path, `run` returns None and the caller takes it.

The search takes some 100 ms per shape and happens on the first eager call of the shape (CUDA graph
warm-up runs eagerly before capture, so graphs replay the chosen algorithm). A call during graph capture
or under torch.compile that finds no choice runs cuBLASLt's first heuristic choice untimed. Choices are
kept in memory; `set_cache_dir` (what ``tune_gemm=True`` / `eet_pipe.ops.gemm_tuning.enable_gemm_tuning` does
on CUDA) also reads them from and writes them to
``<dir>/gemm_select_<device>_torch<v>_cuda<v>_cublaslt<v>.json`` (an algorithm is valid for one cuBLASLt
version only; one that fails anyway is dropped, that call runs the plain path and the shape is measured
again).
``EET_PIPE_GEMM_SELECT=0`` turns the path off (every such linear is ``F.linear`` again).
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from eet_pipe.ops._ext import env_on

__all__ = ["ENABLED", "SELECT_ROWS", "EPILOGUE_ACTIVATIONS", "CANDIDATES", "Choice", "fits", "run", "choice_for",
           "set_cache_dir", "cache_path", "device_slug", "save", "choices", "clear"]

log = logging.getLogger(__name__)

ENABLED: bool = env_on("EET_PIPE_GEMM_SELECT")
"""`linear` runs decode-bucket shapes through cuBLASLt with a selected algorithm (EET_PIPE_GEMM_SELECT=0: off)."""
SELECT_ROWS = frozenset(2 ** i for i in range(9))
"""Row counts that take this path: the decode batch buckets 1..256 (eet_pipe.ops.cuda_graphs.DEFAULT_BUCKETS), so a
bounded set of shapes is ever measured (a prefill of exactly that many tokens takes it too). Other row counts are
prefill GEMMs, compute-bound, where cuBLAS's own heuristic is right, and each would cost a search."""
EPILOGUE_ACTIVATIONS = ("gelu_new", "relu")
"""Activations cuBLASLt applies in its epilogue (its GELU is the tanh form, gelu_new); others run after it."""
CANDIDATES = 12
"""Heuristic candidates timed per shape."""
ROUNDS = 3
"""Timed passes per candidate; the fastest counts."""
_L2_FACTOR = 2
"""Weight copies cycled while timing hold this many times the L2 cache (at most `_MAX_COPIES`)."""
_MAX_COPIES = 24
_COPY_BUDGET = 1 << 30
"""Bytes of weight copies at most."""
_SLEEP_CYCLES = 3_000_000
"""GPU cycles slept before each timed pass (about 1.7 ms) while the host queues the pass's launches."""


@dataclass(frozen=True)
class Choice:
    """The selected way to run one shape."""

    source: str
    """"lt" (cuBLASLt with `algo`) or "torch" (F.linear plus separate epilogue ops)."""
    algo: torch.Tensor | None
    """uint8 [64] cuBLASLt algorithm (a row of gemm_lt_algos), for source "lt"."""
    workspace: int
    """Workspace bytes the algorithm needs."""
    us: float
    """Measured microseconds per call of the winner."""
    plain_us: float
    """Measured microseconds per call of the plain path (the speed-up is plain_us / us)."""
    candidates: int
    """cuBLASLt candidates timed."""

    def to_json(self) -> dict:
        algo = None if self.algo is None else bytes(self.algo.tolist()).hex()
        return {"source": self.source, "algo": algo, "workspace": self.workspace, "us": round(self.us, 3),
                "plain_us": round(self.plain_us, 3), "candidates": self.candidates}

    @staticmethod
    def from_json(data: dict) -> Choice:
        source = data["source"]
        if source not in ("lt", "torch"):
            raise ValueError(f"source {source!r} is not lt or torch")
        algo = None
        if source == "lt":
            raw = bytes.fromhex(data["algo"])
            if len(raw) != 64:
                raise ValueError(f"algo has {len(raw)} bytes, a cuBLASLt algorithm has 64")
            algo = torch.tensor(list(raw), dtype=torch.uint8)
        return Choice(source, algo, int(data["workspace"]), float(data["us"]), float(data["plain_us"]),
                      int(data["candidates"]))


_choices: dict[int, dict[str, Choice]] = {}
"""Per CUDA device index: shape key -> choice."""
_loaded: set[int] = set()
_dirty: set[int] = set()
_cache_dir: Path | None = None


def _key(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
         activation: str) -> str:
    dtype = str(x.dtype).removeprefix("torch.")
    return (f"{dtype} m={x.shape[0]} n={weight.shape[0]} k={x.shape[1]} bias={int(bias is not None)} "
            f"residual={int(residual is not None)} act={activation}")


def _aligned(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.data_ptr() % 16 == 0


def fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None) -> bool:
    """Whether `run` takes this problem: x [M, K] with M in SELECT_ROWS, fp16/bf16 CUDA tensors of one dtype, K and
    N multiples of 8, everything contiguous and 16-byte aligned (what the cuBLASLt candidates may assume); never
    while torch.compile traces (it makes its own GEMM choices)."""
    if not ENABLED or not x.is_cuda or torch.compiler.is_compiling():
        return False
    if x.dim() != 2 or x.shape[0] not in SELECT_ROWS or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    if weight.dtype != x.dtype or weight.dim() != 2 or weight.shape[1] != x.shape[1] or x.shape[1] % 8 \
            or weight.shape[0] % 8:
        return False
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        return False
    tensors = [x, weight] + [t for t in (bias, residual) if t is not None]
    if any(t.dtype != x.dtype or t.device != x.device for t in tensors):
        return False
    if residual is not None and tuple(residual.shape) != (x.shape[0], weight.shape[0]):
        return False
    return all(_aligned(t) for t in tensors)


def run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
        activation: str, plain: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
    """``act(x @ weight.T + bias) + residual`` through cuBLASLt with this shape's selected algorithm, or None when
    the plain path won the selection (the caller runs it). `plain(w)` is that path for weight `w`, timed against
    the candidates on the shape's first eager call. Precondition: `fits`; `activation` in EPILOGUE_ACTIVATIONS or
    "none", and "none" when there is a residual."""
    choice = choice_for(x, weight, bias, residual, activation, plain)
    if choice is not None and choice.source == "torch":
        return None
    algo, workspace = (None, 0) if choice is None else (choice.algo, choice.workspace)
    try:
        return torch.ops.eet_pipe.gemm_lt(x, weight, bias, residual, activation, algo, workspace)
    except RuntimeError as err:  # e.g. an algorithm from a file another cuBLASLt wrote: forget it, run plain
        device = _index(x)
        _choices.get(device, {}).pop(_key(x, weight, bias, residual, activation), None)
        log.warning("GEMM selection: cuBLASLt failed on cuda:%d (%s); this call runs F.linear, the shape is "
                    "measured again on its next eager call", device, err)
        return None


def choice_for(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
               activation: str, plain: Callable[[torch.Tensor], torch.Tensor]) -> Choice | None:
    """The shape's choice: from memory or the cache file, else measured now; None where it cannot be measured
    (during CUDA graph capture or under torch.compile) -- cuBLASLt's first heuristic choice then runs."""
    device = _index(x)
    known = _device_choices(device)
    key = _key(x, weight, bias, residual, activation)
    found = known.get(key)
    if found is not None:
        return found
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return None
    with torch.inference_mode():
        found = _search(x, weight, bias, residual, activation, plain)
    known[key] = found
    _dirty.add(device)
    log.info("GEMM selection on cuda:%d, %s: %s %.2f us (plain %.2f us, %d candidates)", device, key, found.source,
             found.us, found.plain_us, found.candidates)
    return found


def _index(x: torch.Tensor) -> int:
    return x.device.index if x.device.index is not None else torch.cuda.current_device()


def _copies(weight: torch.Tensor) -> list[torch.Tensor]:
    """The weight and enough copies that cycling through them reads from memory, not from L2."""
    props = torch.cuda.get_device_properties(weight.device)
    size = weight.numel() * weight.element_size()
    want = math.ceil(_L2_FACTOR * props.L2_cache_size / max(size, 1))
    count = max(1, min(want, _MAX_COPIES, _COPY_BUDGET // max(size, 1)))
    return [weight] + [weight.clone() for _ in range(count - 1)]


def _time_us(fn: Callable[[torch.Tensor], object], weights: list[torch.Tensor]) -> float:
    """Microseconds per call of fn over `weights`, best of ROUNDS passes (each queued behind a GPU sleep)."""
    for w in weights:
        fn(w)
    best = math.inf
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(ROUNDS):
        torch.cuda._sleep(_SLEEP_CYCLES)
        start.record()
        for w in weights:
            fn(w)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1000.0 / len(weights))
    return best


def _search(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
            activation: str, plain: Callable[[torch.Tensor], torch.Tensor]) -> Choice:
    algos, workspaces = torch.ops.eet_pipe.gemm_lt_algos(x, weight, bias, residual, activation, CANDIDATES)
    with torch.cuda.device(x.device):  # the events, the sleep and the synchronisation on x's device
        weights = _copies(weight)
        plain_us = _time_us(plain, weights)
        best = Choice("torch", None, 0, plain_us, plain_us, len(algos))
        for algo, workspace in zip(algos, workspaces.tolist(), strict=True):
            def lt(w: torch.Tensor, algo: torch.Tensor = algo, workspace: int = workspace) -> torch.Tensor:
                return torch.ops.eet_pipe.gemm_lt(x, w, bias, residual, activation, algo, workspace)

            try:
                us = _time_us(lt, weights)
            except RuntimeError as err:  # a candidate cuBLASLt proposed but cannot run: skip it
                log.debug("GEMM candidate skipped: %s", err)
                continue
            if us < best.us:
                best = Choice("lt", algo.clone(), int(workspace), us, plain_us, len(algos))
    return best


# ---------------------------------------------------------------- memory and files


def _device_choices(device: int) -> dict[str, Choice]:
    known = _choices.setdefault(device, {})
    if device not in _loaded:
        _loaded.add(device)
        path = cache_path(device)
        if path is not None and path.exists():
            for key, choice in _read(path).items():
                known.setdefault(key, choice)  # a shape measured in this process keeps its newer result
    return known


def cache_path(device: int) -> Path | None:
    """The choices file of CUDA device `device` (None without `set_cache_dir`)."""
    if _cache_dir is None:
        return None
    name = device_slug(torch.cuda.get_device_name(device))
    return _cache_dir / (f"gemm_select_{name}_torch{torch.__version__.split('+')[0]}_cuda{torch.version.cuda}"
                         f"_cublaslt{_cublaslt_version()}.json")


def device_slug(device_name: str) -> str:
    """A GPU's name as a file-name part: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower() or "device"


def _cublaslt_version() -> int:
    """The loaded cuBLASLt's version: a stored algorithm is valid for that version only (0 without the op)."""
    op = getattr(torch.ops.eet_pipe, "cublaslt_version", None)
    return int(op()) if op is not None else 0


def _read(path: Path) -> dict[str, Choice]:
    try:
        data = json.loads(path.read_text())
        return {key: Choice.from_json(value) for key, value in data["choices"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("GEMM selection: ignoring %s (%s); shapes will be measured again", path, err)
        return {}


def set_cache_dir(folder: str | Path | None) -> None:
    """Read choices from and write them to files in `folder` (created if missing); None: memory only. Files
    are written by `save` and when the process exits."""
    global _cache_dir
    _cache_dir = None if folder is None else Path(folder)
    if _cache_dir is not None:
        _cache_dir.mkdir(parents=True, exist_ok=True)
    _loaded.clear()  # devices read their file (this folder's) on next use; choices in memory stay


def save() -> list[Path]:
    """Write the choices of every device measured since the last save to its file (with a cache dir set)."""
    written = []
    for device in sorted(_dirty):
        path = cache_path(device)
        if path is None:
            continue
        merged = {**(_read(path) if path.exists() else {}), **_choices.get(device, {})}
        payload = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                   "cuda": torch.version.cuda, "cublaslt": _cublaslt_version(),
                   "choices": {k: c.to_json() for k, c in sorted(merged.items())}}
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # processes saving at once never share it
        try:
            tmp.write_text(json.dumps(payload, indent=1))
            tmp.replace(path)  # atomic: a reader sees the old file or the new one
        except OSError as err:
            log.warning("GEMM selection: could not write %s (%s); choices stay in memory", path, err)
            continue
        written.append(path)
    _dirty.clear()
    return written


def choices(device: int | None = None) -> dict[str, dict]:
    """The choices in memory for CUDA device `device` (default: current), as JSON-able dicts."""
    device = torch.cuda.current_device() if device is None else device
    return {key: c.to_json() for key, c in _choices.get(device, {}).items()}


def clear() -> None:
    """Forget every choice in memory (files stay)."""
    _choices.clear()
    _loaded.clear()
    _dirty.clear()


atexit.register(lambda: _cache_dir is not None and save())
