"""Torchrun serving with three ranks: the middle rank's busy time reaches /metrics, answers equal the
single-process model's, and SIGTERM to rank 0 stops every rank with status 0."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import httpx
import pytest

import eet_pipe
from eet_pipe.runtime.supervisor import free_port
from eet_pipe.serving.process import ServerProcess

REPO = Path(__file__).absolute().parents[2]


@pytest.mark.timeout(300)
def test_three_ranks_report_every_stage_busy_fraction():
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3", "-m",
           "eet_pipe.serve", "--port", str(port)]
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    server = ServerProcess(["--stages", "3", "model=tiny", "plan=even", "threads=1", "log_level=warning"], port=port,
                           command=cmd, env={"PYTHONPATH": path}).start()
    try:
        health = server.wait_ready(240)
        ref = eet_pipe.from_pretrained("tiny").generate(["Hello"], max_new_tokens=48, ignore_eos=True)[0]
        body = {"prompt": "Hello", "max_tokens": 48, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        with httpx.Client(base_url=server.url, timeout=60) as client:
            busy: list[str] = []
            for _ in range(40):  # stages report every second
                r = client.post("/v1/completions", json=body)
                assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == ref.token_ids, r.text
                busy = [x for x in client.get("/metrics").text.splitlines() if x.startswith("eet_pipe_stage_busy")]
                if len(busy) == 3:
                    break
        assert [x.split("}")[0] + "}" for x in busy] == [f'eet_pipe_stage_busy_fraction{{stage="{r}"}}' for r in range(3)]
        os.kill(health["pid"], signal.SIGTERM)
        assert server.proc.wait(60) == 0, server.log()
    finally:
        server.stop(signal.SIGKILL)
