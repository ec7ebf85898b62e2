"""Torchrun serving: two torchrun agents on localhost (c10d rendezvous, gloo) form one 2-stage pipeline
whose rank 0 answers HTTP; SIGTERM to rank 0 drains and stops every rank and both agents."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

import eet_pipe
from eet_pipe.runtime.supervisor import free_port
from eet_pipe.serving.process import ServerProcess

REPO = Path(__file__).absolute().parents[2]


def _agent(node: int, port: int, rdzv: int) -> ServerProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
           "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{rdzv}",
           "--rdzv-id", "eet-serve-test", "--max-restarts", "0", "-m", "eet_pipe.serve", "--port", str(port)]
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return ServerProcess(["--stages", "2", "model=tiny", "plan=even", "threads=1", "log_level=warning"], port=port,
                         command=cmd, env={"PYTHONPATH": path})


def _quiet_port() -> int:
    """A free port below the kernel's ephemeral range. The agents' and workers' own connections take their local
    ports from that range, and one of them once took the HTTP port picked there before rank 0 bound it ("address
    already in use")."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return free_port()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    return free_port()


def _descendants(procs: list[ServerProcess]) -> list[int]:
    return [c.pid for a in procs for c in psutil.Process(a.proc.pid).children(recursive=True)]


@pytest.mark.timeout(150)
def test_two_torchrun_agents_serve_one_pipeline():
    port = _quiet_port()
    rdzv = _quiet_port()
    while rdzv == port:
        rdzv = _quiet_port()
    agents = [_agent(0, port, rdzv).start(), _agent(1, port, rdzv).start()]
    try:
        health = agents[0].wait_ready(120)
        ref = eet_pipe.from_pretrained("tiny").generate(["Hello"], max_new_tokens=16)[0]
        body = {"prompt": "Hello", "max_tokens": 16, "temperature": 0, "return_token_ids": True}
        r = httpx.post(agents[0].url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == ref.token_ids
        with httpx.stream("POST", agents[0].url + "/v1/completions", json={**body, "stream": True}, timeout=60) as s:
            lines = [x[6:] for x in s.iter_lines() if x.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        assert "".join(json.loads(x)["choices"][0]["text"] for x in lines[:-1]) == ref.text
        pids = _descendants(agents)
        os.kill(health["pid"], signal.SIGTERM)  # rank 0: drain, then Shutdown to every rank
        codes = [a.proc.wait(60) for a in agents]
        assert codes == [0, 0], agents[0].log() + agents[1].log()
        deadline = time.monotonic() + 10
        while (alive := [p for p in pids if psutil.pid_exists(p)
                         and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive, f"processes left behind: {alive}"
    finally:
        for a in agents:
            a.stop(signal.SIGKILL)
