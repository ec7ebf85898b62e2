"""Torchrun launch mode: every rank is a stage, rank 0 drives; same results as the spawned pipeline."""

from __future__ import annotations

import subprocess
import sys

import pytest

import eet_pipe


@pytest.mark.timeout(180)
def test_torchrun_two_ranks_generate_like_single_process():
    expected = eet_pipe.from_pretrained("tiny").generate("Hello", max_new_tokens=8)[0].text
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "eet_pipe.cli", "generate", "--stages", "2", "model=tiny", "prompt=Hello", "max_new_tokens=8",
           "plan=even"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("Hello")]
    assert len(lines) == 1, proc.stdout  # only rank 0 prints
    assert lines[0] == "Hello" + expected
