"""Per-shape GEMM algorithm selection, cached in a file per device and software version.

`enable_gemm_tuning` turns it on for this process and names the file:

* CUDA builds: `eet_pipe.ops.gemm_select` -- cuBLASLt's candidate algorithms for each decode-sized GEMM
  (rows a decode batch bucket), timed here with the epilogue fused; the choices live in
  ``<cache_dir>/gemm_select_<device>_torch<version>_cuda<version>_cublaslt<version>.json``. The selection
  itself runs in every process (in memory); tuning adds the file, so a second run starts with every shape
  chosen. PyTorch's TunableOp is not used there: on CUDA it offers only cuBLAS's default.
* ROCm builds: PyTorch TunableOp (rocBLAS and hipBLASLt algorithms) for every GEMM, results in
  ``<cache_dir>/tunableop_<device name>_torch<version>_rocm<version>.csv``.

Run a warm-up pass over the shapes you serve (`warm_up`) at start-up so no request pays for tuning. On CPU
it does nothing (one log line). Both selections are process-wide; this module only configures them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from eet_pipe import ops

__all__ = ["GemmTuning", "enable_gemm_tuning", "disable_gemm_tuning", "tuning_filename", "default_cache_dir",
           "save_tuning", "warm_up"]

log = logging.getLogger(__name__)

MAX_TUNING_ITERATIONS = 20
"""Timed runs per candidate algorithm (TunableOp's default is 100)."""
MAX_TUNING_MS = 20
"""Time budget per candidate algorithm in milliseconds."""


@dataclass
class GemmTuning:
    """Where the tuning results of one device live, and whether tuning is on."""

    device: torch.device
    path: Path | None
    """The results file, or None when tuning is off (CPU)."""
    loaded: bool = False
    """True if earlier results were read from `path`."""
    why_off: str = ""
    """Why tuning is off (empty when it is on)."""
    before: tuple[bool, bool] = (False, False)
    """TunableOp's (enabled, tuning enabled) before `enable_gemm_tuning`, which `disable_gemm_tuning` restores."""
    backend: str = ""
    """"cublaslt" (`eet_pipe.ops.gemm_select`, CUDA) or "tunableop" (ROCm); empty when off."""

    @property
    def enabled(self) -> bool:
        return self.path is not None


def default_cache_dir() -> Path:
    """``~/.cache/eet_pipe/gemm_tuning``."""
    return Path.home() / ".cache" / "eet_pipe" / "gemm_tuning"


def tuning_filename(device_name: str) -> str:
    """File name keyed by device name and the torch / ROCm or CUDA versions (TunableOp rejects other versions)."""
    slug = ops.gemm_select.device_slug(device_name)
    torch_version = torch.__version__.split("+")[0]
    platform = f"rocm{torch.version.hip}" if torch.version.hip else f"cuda{torch.version.cuda}"
    return f"tunableop_{slug}_torch{torch_version}_{platform}.csv"


def enable_gemm_tuning(device: torch.device | str, cache_dir: str | Path | None = None,
                       max_iterations: int = MAX_TUNING_ITERATIONS) -> GemmTuning:
    """Turn on per-shape GEMM selection for `device` (see the module), reading and writing its results file.

    Args:
        device: the device the model runs on; a CPU device makes this a no-op.
        cache_dir: folder of the results file (default `default_cache_dir()`).
        max_iterations: timed runs per candidate algorithm (>= 1).
    Returns:
        a `GemmTuning` naming the results file (path None on CPU).
    """
    device = torch.device(device)
    if max_iterations < 1:
        raise ValueError(f"max_iterations={max_iterations} is invalid: must be >= 1")
    if device.type != "cuda":
        why = f"{device} is not a CUDA device (GEMM selection is for CUDA and ROCm GEMMs)"
        log.info("GEMM tuning skipped: %s", why)
        return GemmTuning(device, None, why_off=why)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if torch.version.hip is None:
        return _enable_cublaslt(device, folder)
    from torch.cuda import tunable

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / tuning_filename(torch.cuda.get_device_name(device))
    before = (tunable.is_enabled(), tunable.tuning_is_enabled())
    tunable.set_filename(str(path), False)  # before the first tunable GEMM, which loads the file
    tunable.set_max_tuning_iterations(max_iterations)
    tunable.set_max_tuning_duration(MAX_TUNING_MS)
    tunable.enable(True)
    tunable.tuning_enable(True)
    loaded = path.exists() and bool(tunable.read_file(str(path)))
    log.info("GEMM tuning on for %s: results %s %s", device, "read from" if loaded else "will be written to", path)
    return GemmTuning(device, path, loaded, before=before, backend="tunableop")


def _enable_cublaslt(device: torch.device, folder: Path) -> GemmTuning:
    """CUDA builds: `eet_pipe.ops.gemm_select`'s choices, read from and written to a file in `folder`."""
    why = ""
    if not ops.HAVE_EXT:
        why = f"GEMM selection runs eet_pipe's cuBLASLt op, and the CUDA extension is unavailable ({ops.EXT_REASON})"
    elif not ops.gemm_select.ENABLED:
        why = "GEMM selection is turned off (EET_PIPE_GEMM_SELECT=0)"
    if why:
        log.warning("GEMM tuning skipped for %s: %s", device, why)
        return GemmTuning(device, None, why_off=why)
    ops.gemm_select.set_cache_dir(folder)
    index = device.index if device.index is not None else torch.cuda.current_device()
    path = ops.gemm_select.cache_path(index)
    loaded = path is not None and path.exists()
    log.info("GEMM selection for %s: choices %s %s", device, "read from" if loaded else "will be written to", path)
    return GemmTuning(device, path, loaded, backend="cublaslt")


def save_tuning(tuning: GemmTuning) -> None:
    """Write the results now where this torch can (it also writes them when the process exits)."""
    if not tuning.enabled:
        return
    if tuning.backend == "cublaslt":
        ops.gemm_select.save()
        return
    from torch.cuda import tunable

    writer = getattr(tunable, "write_file", None)
    if writer is not None:
        writer(str(tuning.path))


def disable_gemm_tuning(tuning: GemmTuning) -> None:
    """Save `tuning`'s results and stop using its file. ROCm: TunableOp goes back to how it was before
    `enable_gemm_tuning` (normally off), so GEMMs from now on use the BLAS library's own heuristics. CUDA: the
    in-memory selection of `eet_pipe.ops.gemm_select` stays (it is on in every process unless
    EET_PIPE_GEMM_SELECT=0); only the file is no longer read or written. Does nothing for a `GemmTuning` that is
    off."""
    if not tuning.enabled:
        return
    save_tuning(tuning)
    if tuning.backend == "cublaslt":  # the selection itself stays on (in memory); only the file goes
        ops.gemm_select.set_cache_dir(None)
        log.info("GEMM selection: choices saved to %s; no file from now on", tuning.path)
        return
    from torch.cuda import tunable

    tunable.tuning_enable(tuning.before[1])
    tunable.enable(tuning.before[0])
    log.info("GEMM tuning back to %s (results in %s)", "on" if tuning.before[0] else "off", tuning.path)


@torch.inference_mode()
def warm_up(model: torch.nn.Module, device: torch.device, batch_sizes: Sequence[int] = (1,),
            prompt_len: int = 32, tuning: GemmTuning | None = None) -> None:
    """Run cache-free forwards at the given shapes so every GEMM they use is tuned before serving.

    Args:
        model: a whole canonical model (embed .. head) on `device`.
        batch_sizes: batches to run; each runs a `prompt_len`-token and a 1-token forward.
        prompt_len: prefill length of the warm-up pass.
        tuning: results to save afterwards (where this torch can write them explicitly).
    """
    from eet_pipe.models.meta import prefill_meta

    vocab = model.cfg.vocab_size
    for batch in batch_sizes:
        for length in (prompt_len, 1):
            ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
            meta = prefill_meta(torch.ones(batch, length, dtype=torch.bool)).to(device)
            model(ids.to(device), meta)
    if tuning is not None:
        save_tuning(tuning)
