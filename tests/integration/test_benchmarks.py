"""Every benchmark script runs with --quick on CPU and writes complete JSON and its plots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CASES = {  # script -> fields every result row (or the results dict) must have
    "pipeline_prefill.py": ["system", "microbatches", "seconds", "tokens_per_s", "speedup_vs_single", "gpipe_bound"],
    "pipeline_decode.py": ["single_b1_ms_per_token", "pipeline_b1_ms_per_token", "throughput_ratio"],
    "schedules.py": ["system", "schedule", "microbatches", "tokens_per_s", "bubble_measured", "bubble_simulated"],
    "partitions.py": ["method", "stage_ms_measured"],
    "serve_load.py": ["concurrency"],
    "single_gpu.py": ["system"],
}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("script", sorted(CASES))
def test_quick_run_writes_json_and_plot(script, tmp_path):
    out = tmp_path / "result"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", f"out={out}"],
                          capture_output=True, text=True, timeout=230, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(Path(f"{out}.json").read_text())
    assert {"env", "config", "results"} <= set(data)
    assert data["env"]["date"] and data["env"]["torch"]
    assert Path(f"{out}.png").stat().st_size > 1000
    results = data["results"]
    rows = results if isinstance(results, list) else [results]
    assert rows
    for field in CASES[script]:
        assert any(field in r and r[field] is not None for r in rows), field
