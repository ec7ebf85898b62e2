"""The server's two processes (engine: scheduler and step loop; HTTP: uvicorn, tokens to text) live and
die together, and the engine sends the events of a step in one message, not one per token."""

from __future__ import annotations

import signal
import time

import httpx
import psutil
import pytest

from eet_pipe.serving.ipc import dumps, loads
from eet_pipe.serving.process import ServerProcess

ARGS = ["--stages", "2", "model=tiny", "plan=even", "timeout=30", "log_level=warning"]


def _gone(pids: list[int], within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]:
            return True
        time.sleep(0.1)
    return False


def _family(server: ServerProcess) -> tuple[int, list[int]]:
    """(the HTTP process, every child of the server)."""
    health = server.health()[1]
    assert health["pid"] == server.proc.pid and health["http_pid"] != server.proc.pid
    kids = [p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)
            if "resource_tracker" not in " ".join(p.cmdline())]
    assert health["http_pid"] in kids and len(kids) >= 3  # HTTP + 2 stages
    return health["http_pid"], kids


@pytest.mark.timeout(120)
def test_killing_the_engine_process_takes_the_http_process_and_workers_with_it():
    with ServerProcess(ARGS) as server:
        _, kids = _family(server)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        assert _gone(kids), "processes outlived the engine process"


@pytest.mark.timeout(120)
def test_killing_the_http_process_stops_the_engine_with_status_1():
    with ServerProcess(ARGS) as server:
        http, kids = _family(server)
        psutil.Process(http).kill()
        assert server.proc.wait(30) == 1, server.log()
        assert _gone(kids)


@pytest.mark.timeout(120)
def test_sigterm_is_for_the_engine_process_only_and_drains():
    with ServerProcess(ARGS) as server:
        http, kids = _family(server)
        psutil.Process(http).send_signal(signal.SIGTERM)  # ignored: the engine process decides
        time.sleep(0.5)
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert server.stop(signal.SIGTERM) == 0, server.log()
        assert _gone(kids)


def test_messages_round_trip():
    events = [(1, "token", 0, [5], [], None, "", 200, ""), (1, "finish", 0, [], [], "stop", None, 200, "")]
    assert loads(dumps(("events", events))) == ("events", events)
