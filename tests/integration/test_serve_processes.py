"""The server's two processes (engine: scheduler and step loop; HTTP: uvicorn, tokens to text) live and
die together, and the engine sends the events of a step in one message, not one per token."""

from __future__ import annotations

import json
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


@pytest.mark.timeout(180)
def test_several_http_processes_share_the_port_and_one_engine():
    """api_servers=2: both HTTP processes take connections on the one port, each request's stream comes
    back whole through whichever took it, /metrics counts the requests of both, and the death of either
    stops the server."""
    with ServerProcess([*ARGS, "api_servers=2"]) as server:
        engine = psutil.Process(server.proc.pid)
        listening = [p.pid for p in engine.children() if any(
            c.status == psutil.CONN_LISTEN and c.laddr.port == server.port for c in p.net_connections("tcp"))]
        assert len(listening) == 2, listening
        answered, texts = set(), []
        for _ in range(24):  # a new connection each time: the kernel spreads them over the two processes
            with httpx.Client(base_url=server.url, timeout=60) as client:
                answered.add(client.get("/health").json()["http_pid"])
                r = client.post("/v1/completions", json={"prompt": "a b c", "max_tokens": 5, "ignore_eos": True,
                                                         "return_token_ids": True, "temperature": 0})
                assert r.status_code == 200, r.text
                texts.append(r.json()["choices"][0]["token_ids"])
        assert answered == set(listening)
        assert all(t == texts[0] and len(t) == 5 for t in texts), texts  # greedy: the same tokens through either
        deadline = time.monotonic() + 10  # each process reports its responses to the engine on its own socket
        while 'eet_pipe_requests_total{status="200"} 24' not in (metrics := httpx.get(server.url + "/metrics").text):
            assert time.monotonic() < deadline, metrics
            time.sleep(0.1)
        kids = [p.pid for p in engine.children(recursive=True) if "resource_tracker" not in " ".join(p.cmdline())]
        psutil.Process(listening[1]).kill()
        assert server.proc.wait(30) == 1, server.log()
        assert _gone(kids)


def test_api_servers_is_checked_before_anything_starts(capsys):
    import socket

    from eet_pipe.serve import main
    from eet_pipe.serving.serve_options import ServeOptions

    with pytest.raises(ValueError, match=r"api_servers=65 is invalid: must be an integer 1..64, or 0 \(auto\)"):
        ServeOptions(api_servers=65)
    with pytest.raises(ValueError, match="cannot share an arbitrary free port"):
        ServeOptions(api_servers=2, port=0)
    with pytest.raises(ValueError, match="max_connections=2 is invalid: must be >= api_servers"):
        ServeOptions(api_servers=3, max_connections=2)
    with socket.socket() as other:  # another server on the port: SO_REUSEPORT must not join it
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        assert main(["--port", str(port), "model=tiny", "api_servers=2"]) == 2
    assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err


def test_max_connections_is_shared_out_over_the_http_processes():
    from eet_pipe.serving.listener import make_server
    from eet_pipe.serving.serve_options import ServeOptions

    limits = [make_server(ServeOptions(api_servers=n, max_connections=10), app=None).config.limit_concurrency
              for n in (1, 3)]
    assert limits == [10, 4]


def test_the_h11_parser_serves_streams_and_whole_responses_alike():
    """http_parser=h11 (pure Python, the fallback where httptools is missing): a streamed completion and a whole
    one give the same greedy tokens, the stream ending in [DONE]."""
    body = {"prompt": "a b c", "max_tokens": 5, "ignore_eos": True, "return_token_ids": True, "temperature": 0}
    with ServerProcess([*ARGS, "http_parser=h11"]) as server:
        server.wait_ready(120)
        whole = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert whole.status_code == 200, whole.text
        lines = []
        with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    streamed = [t for line in lines[:-1] for c in json.loads(line[6:])["choices"] for t in c.get("token_ids") or []]
    assert streamed == whole.json()["choices"][0]["token_ids"] and len(streamed) == 5
