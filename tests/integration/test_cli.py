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


@pytest.mark.timeout(180)
def test_generate_old_seed_is_the_weights_seed_with_a_warning():
    """`seed=` still seeds the weights (warned about, naming weights_seed=); `sample_seed=` is the sampling seed."""
    expected = eet_pipe.from_pretrained("tiny", "random", weights_seed=3).generate("Hello", max_new_tokens=6)[0].text
    other = eet_pipe.from_pretrained("tiny", "random", weights_seed=4).generate("Hello", max_new_tokens=6)[0].text
    assert expected != other  # the weights' seed shows in the (greedy) text
    for spelling in ("seed=3", "weights_seed=3"):
        cmd = [sys.executable, "-m", "eet_pipe.cli", "generate", "model=tiny", "weights=random", spelling,
               "prompt=Hello", "max_new_tokens=6", "sample_seed=11"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.splitlines()[0] == "Hello" + expected.splitlines()[0]
        warned = "seed= is the weights' seed here for one more release; use weights_seed=" in proc.stderr
        assert warned == (spelling == "seed=3"), proc.stderr
