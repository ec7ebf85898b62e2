"""Helpers shared by the benchmark scripts: arguments, environment record, timing, output files."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

for _k, _v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ.setdefault(_k, _v)



def parse_args(defaults: dict[str, Any], quick: dict[str, Any], argv: list[str] | None = None) -> dict[str, Any]:
    """key=value arguments over `defaults`; --quick applies `quick` first (CPU smoke run)."""
    argv = sys.argv[1:] if argv is None else argv
    opts = dict(defaults)
    if "--quick" in argv:
        opts.update(quick)
        opts["quick"] = True
    for arg in argv:
        if arg.startswith("--"):
            continue
        key, sep, value = arg.partition("=")
        if not sep or key not in defaults:
            raise SystemExit(f"unknown argument {arg!r}; allowed: {', '.join(sorted(defaults))} and --quick")
        kind = type(defaults[key])
        # a list may be empty ("peers=" runs no peer)
        opts[key] = [v for v in value.split(",") if v] if kind is list else (value if kind is str else kind(value))
    return opts


def environment() -> dict[str, Any]:
    """Devices, versions, date and commit of this run ('<commit>-dirty' when the files differ from it)."""
    commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7", "--exclude=*"],
                            capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "git_commit": commit,
            "torch": torch.__version__, "cuda": torch.version.cuda, "gpus": gpus,
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version()}


def sync(devices: list[str]) -> None:
    for d in devices:
        if d.startswith("cuda"):
            torch.cuda.synchronize(d)


def time_it(fn: Callable[[], Any], devices: list[str], warmup: int, repeats: int) -> float:
    """Median wall time of `fn` in seconds (devices synchronised around each call)."""
    for _ in range(warmup):
        fn()
    sync(devices)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(devices)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))


def progress(total: int, desc: str):
    """A tqdm progress bar on stderr."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, disable=None)


def prefill_batch(opts: dict[str, Any]) -> tuple[list[int], torch.Tensor]:
    """The microbatch counts and a seeded random [batch, seq] id batch for the model in `opts`."""
    from eet_pipe.loading.presets import resolve_model

    cfg = resolve_model(opts["model"], opts["weights"] or None).cfg
    ids = torch.randint(0, cfg.vocab_size, (opts["batch"], opts["seq"]), generator=torch.Generator().manual_seed(0))
    return [int(m) for m in opts["microbatches"]], ids


def plotted_series(fig: Any) -> list[dict[str, Any]]:
    """Every data series drawn on `fig`: lines, bar groups and scatters, with their axes' y label, as
    {"axes", "label", "kind", "y"}. Written beside the PNG so tests can check the picture shows the JSON."""
    series: list[dict[str, Any]] = []
    for ax in fig.axes:
        where = ax.get_ylabel() or ax.get_title()
        for line in ax.get_lines():
            series.append({"axes": where, "label": line.get_label(), "kind": "line",
                           "y": [float(v) for v in line.get_ydata()]})
        for bars in ax.containers:
            series.append({"axes": where, "label": bars.get_label(), "kind": "bar",
                           "y": [float(b.get_height()) for b in bars]})
        for coll in ax.collections:
            offsets = coll.get_offsets()
            if len(offsets):
                series.append({"axes": where, "label": coll.get_label(), "kind": "scatter",
                               "y": [float(v) for v in offsets[:, 1]]})
    return series


def save_figure(fig: Any, path: str | Path) -> None:
    """Lay out, write as PNG (and the plotted series as `<name>.plot.json` beside it) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    Path(path).with_suffix(".plot.json").write_text(json.dumps(plotted_series(fig), indent=1))
    plt.close(fig)


@contextmanager
def kernel_setting(gemv: bool | None = None, pdl: bool | None = None, select: bool | None = None) -> Iterator[None]:
    """Inside the block, `eet_pipe.ops.GEMV_ENABLED` forced to `gemv`, programmatic dependent launch
    (`eet_pipe.ops.set_pdl`) to `pdl` and the per-shape cuBLASLt GEMM selection (`eet_pipe.ops.gemm_select.ENABLED`)
    to `select`; None leaves a setting as configured. All are restored after."""
    from eet_pipe import ops

    saved_gemv, saved_pdl, saved_select = ops.GEMV_ENABLED, ops.set_pdl(None), ops.gemm_select.ENABLED
    try:
        ops.GEMV_ENABLED = saved_gemv if gemv is None else gemv
        ops.gemm_select.ENABLED = saved_select if select is None else select
        ops.set_pdl(pdl)
        yield
    finally:
        ops.GEMV_ENABLED = saved_gemv
        ops.gemm_select.ENABLED = saved_select
        ops.set_pdl(saved_pdl)
