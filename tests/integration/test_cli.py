"""The README's main job: `eet-pipe generate --stages 2 model=tiny prompt="Hello"`."""

from __future__ import annotations

import subprocess
import sys

import pytest

import eet_pipe


@pytest.mark.timeout(180)
@pytest.mark.parametrize("where", [["--stages", "2"], ["devices=cpu,cpu"]])
def test_generate_runs_two_worker_processes(where):
    cmd = [sys.executable, "-m", "eet_pipe.cli", "generate", *where, "model=tiny", "prompt=Hello",
           "max_new_tokens=12"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = eet_pipe.from_pretrained("tiny").generate("Hello", max_new_tokens=12)[0].text
    assert proc.stdout.splitlines()[0] == "Hello" + expected.splitlines()[0]
    stages = [ln for ln in proc.stderr.splitlines() if ln.strip().startswith("stage on cpu")]
    assert len(stages) == 2, proc.stderr
    assert "2 stage(s)" in proc.stderr


def test_bad_option_is_a_clear_error():
    proc = subprocess.run([sys.executable, "-m", "eet_pipe.cli", "generate", "model=tiny", "temperature=-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "temperature=-1.0 is invalid" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "eet_pipe.cli", "generate", "colour=blue"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown option 'colour'" in proc.stderr


def test_models_lists_presets():
    proc = subprocess.run([sys.executable, "-m", "eet_pipe.cli", "models"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "gpt2-xl" in proc.stdout and "tiny" in proc.stdout
