"""The server against hostile and careless clients: a real 2-stage CPU server, fuzzed request bodies,
values that once crashed a stage, disconnects, slow clients, leaked internals and signals."""

from __future__ import annotations

import json
import math
import re
import signal
import socket
import threading
import time

import httpx
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eet_pipe.runtime.worker import FAULT_ENV
from eet_pipe.serving.process import ServerProcess

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ARGS = ["--stages", "2", "--api-key", KEY, "model=tiny", "plan=even", "max_slots=8", "max_queue=16", "timeout=30",
        "header_timeout=2", "body_timeout=2", "log_level=warning"]
ALLOWED = {200, 400, 404, 413, 429}
LEAKS = re.compile(r'Traceback|File "|(?:/[\w.\-]+){2,}\.py')


def _children(pid: int) -> list[psutil.Process]:
    kids = psutil.Process(pid).children(recursive=True)
    return [p for p in kids if "resource_tracker" not in " ".join(p.cmdline())]


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def _wait_metric(url: str, name: str, ok, within: float) -> float:
    deadline = time.monotonic() + within
    while not ok(value := _metric(url, name)):
        assert time.monotonic() < deadline, f"{name} = {value} after {within} s"
        time.sleep(0.02)
    return value


@pytest.fixture(scope="module")
def server():
    with ServerProcess(ARGS) as proc:
        yield proc
        assert proc.proc.poll() is None, proc.log()


# ---- fuzzing ----

ODD_NUMBERS = st.one_of(
    st.sampled_from([0, 1, -1, 2, 0.5, 1e-39, 5e-324, 1e308, -0.0, 2**31, 2**63, 2**64, 2**64 + 1, -2**63 - 1,
                     10**30, math.inf, -math.inf, math.nan, True, False]),
    st.integers(-3, 40), st.floats(allow_nan=True, allow_infinity=True))
ODD_VALUES = st.one_of(ODD_NUMBERS, st.none(), st.text(max_size=12), st.lists(st.integers(-5, 300), max_size=4),
                       st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
SMALL_TOKENS = st.one_of(st.integers(1, 6), st.sampled_from([0, -1, 10**9, 2**64, 1.5, "3", None, math.nan]))
STOPS = st.one_of(st.none(), st.text(max_size=300), st.lists(st.text(max_size=8), max_size=24), ODD_VALUES)
PROMPTS = st.one_of(st.text(max_size=40), st.lists(st.integers(-3, 300), max_size=8),
                    st.lists(st.text(max_size=10), max_size=3), st.lists(st.lists(st.integers(0, 300), max_size=4),
                                                                          max_size=3), ODD_VALUES)
MESSAGES = st.one_of(
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "robot", 3]),
                                    "content": st.one_of(st.text(max_size=30), st.none(), ODD_VALUES)}), max_size=3),
    ODD_VALUES)


def _fields(strategy, odd=ODD_VALUES):
    return st.one_of(strategy, odd)


COMMON = {
    "temperature": _fields(st.sampled_from([0, 0.7, 1.0, 1e-39, 1e-6, 2.0]), ODD_NUMBERS),
    "top_p": _fields(st.sampled_from([1.0, 0.9, 1e-300]), ODD_NUMBERS),
    "top_k": _fields(st.sampled_from([0, -1, 1, 5, 10**9]), ODD_NUMBERS),
    "n": st.sampled_from([1, 2, 3, 0, -1, 10**6, 1.0, True, None, "2"]),
    "seed": _fields(st.sampled_from([None, 0, 7, 2**64 - 1, 2**64, -2**63, 18446744073709551616]), ODD_NUMBERS),
    "stop": STOPS,
    "stream": st.sampled_from([True, False, None, 1, "yes"]),
    "stream_options": st.one_of(st.none(), st.fixed_dictionaries({"include_usage": st.sampled_from([True, 1])}),
                                ODD_VALUES),
    "ignore_eos": st.sampled_from([True, False, None, 0]),
    "return_token_ids": st.sampled_from([True, False, "true"]),
    "model": st.sampled_from(["tiny", "gpt-4", None, 3, ""]),
    "user": ODD_VALUES,
}
COMPLETION = st.fixed_dictionaries({"prompt": PROMPTS, "max_tokens": SMALL_TOKENS},
                                   optional={**COMMON, "logprobs": _fields(st.integers(-2, 25), ODD_NUMBERS),
                                             "echo": st.sampled_from([False, True, None])})
CHAT = st.fixed_dictionaries({"messages": MESSAGES, "max_completion_tokens": SMALL_TOKENS},
                             optional={**COMMON, "max_tokens": SMALL_TOKENS, "logprobs": st.sampled_from([True, False, 1]),
                                       "top_logprobs": _fields(st.integers(-2, 25), ODD_NUMBERS)})


def _check_answer(url: str, path: str, body: dict) -> None:
    content = json.dumps(body).encode()  # NaN and Infinity go out as JSON's non-standard tokens
    headers = {**AUTH, "Content-Type": "application/json"}
    with httpx.stream("POST", url + path, content=content, headers=headers, timeout=60) as r:
        text = r.read().decode()
    assert r.status_code in ALLOWED, (r.status_code, str(body)[:300], text[:300])
    assert not LEAKS.search(text), text[:500]
    if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
        assert text.rstrip().endswith("data: [DONE]") and '"error"' not in text, text[-500:]


FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


@pytest.mark.timeout(240)
@FUZZ
@given(body=COMPLETION)
def test_fuzzed_completions_get_allowed_answers(server, body):
    _check_answer(server.url, "/v1/completions", body)


@pytest.mark.timeout(240)
@FUZZ
@given(body=CHAT)
def test_fuzzed_chat_completions_get_allowed_answers(server, body):
    _check_answer(server.url, "/v1/chat/completions", body)


def test_after_fuzzing_no_slot_is_leaked_and_the_server_serves(server):
    _wait_metric(server.url, "eet_pipe_running_sequences", lambda v: v == 0, 5)
    _wait_metric(server.url, "eet_pipe_queue_depth", lambda v: v == 0, 5)
    r = httpx.post(server.url + "/v1/completions", headers=AUTH, json={"prompt": "Hello", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


# ---- the requests that once crashed a stage ----

def test_tiny_temperature_is_greedy_and_huge_seed_is_a_400(server):
    greedy = {"prompt": "hi", "max_tokens": 8, "return_token_ids": True, "ignore_eos": True, "temperature": 0}
    want = httpx.post(server.url + "/v1/completions", headers=AUTH, json=greedy).json()["choices"][0]["token_ids"]
    r = httpx.post(server.url + "/v1/completions", headers=AUTH, json={**greedy, "temperature": 1e-39})
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == want, r.text
    r = httpx.post(server.url + "/v1/completions", headers=AUTH,
                   json={"prompt": "hi", "temperature": 0.8, "seed": 18446744073709551616})
    assert r.status_code == 400 and "seed" in r.json()["error"]["message"], r.text
    r = httpx.post(server.url + "/v1/completions", headers=AUTH,
                   json={"prompt": "hi", "temperature": 0.8, "seed": 18446744073709551615, "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert server.health()[0] == 200


def test_stop_limits_are_400s_naming_the_option(server):
    r = httpx.post(server.url + "/v1/completions", headers=AUTH, json={"prompt": "hi", "stop": ["a"] * 17})
    assert r.status_code == 400 and "max_stops" in r.json()["error"]["message"], r.text
    r = httpx.post(server.url + "/v1/completions", headers=AUTH, json={"prompt": "hi", "stop": "x" * 129})
    assert r.status_code == 400 and "max_stop_chars" in r.json()["error"]["message"], r.text


# ---- disconnects and slow clients ----

def _read_all(sock: socket.socket) -> str:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data.decode()


def _raw_request(url: str, body: dict, headers: dict | None = None) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    payload = json.dumps(body).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in {**AUTH, **(headers or {})}.items())
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{head}"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


@pytest.mark.timeout(120)
def test_disconnected_whole_response_client_frees_its_slots_within_a_second(server):
    chunks: list[str] = []

    def stream() -> None:
        body = {"prompt": "a", "max_tokens": 300, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
            for line in r.iter_lines():
                chunks.append(line)

    other = threading.Thread(target=stream, daemon=True)
    other.start()
    _wait_metric(server.url, "eet_pipe_running_sequences", lambda v: v == 1, 30)
    made = _metric(server.url, "eet_pipe_generation_tokens_total")
    sock = _raw_request(server.url, {"prompt": "b", "max_tokens": 400, "ignore_eos": True, "n": 2})
    _wait_metric(server.url, "eet_pipe_running_sequences", lambda v: v == 3, 30)
    _wait_metric(server.url, "eet_pipe_generation_tokens_total", lambda v: v >= made + 8, 30)  # tokens flowed
    sock.close()
    closed = time.monotonic()
    _wait_metric(server.url, "eet_pipe_running_sequences", lambda v: v == 1, 1.0)
    assert time.monotonic() - closed < 1.0
    seen = len(chunks)
    deadline = time.monotonic() + 10
    while len(chunks) <= seen + 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(chunks) > seen + 5, "the other stream stopped"
    other.join(60)
    assert [c for c in chunks if c][-1] == "data: [DONE]"


def test_api_key_is_checked_before_the_body_is_read(server):
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 500000\r\n\r\n{\"prompt\": ")  # wrong key, body never finished
        reply = _read_all(sock)
    assert reply.startswith("HTTP/1.1 401") and "API key" in reply and "request_id" in reply, reply


def test_slow_body_gets_408_and_slow_headers_are_cut(server):
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                     + b"\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
        began = time.monotonic()
        reply = _read_all(sock)
    assert reply.startswith("HTTP/1.1 408") and "body_timeout" in reply and time.monotonic() - began < 6, reply
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        began = time.monotonic()
        assert sock.recv(4096) == b"" and time.monotonic() - began < 6  # closed by the server
    assert server.health()[0] == 200


# ---- internals never leak ----

@pytest.mark.timeout(180)
def test_worker_error_answers_without_internals_and_logs_them_under_the_request_id():
    args = ["--stages", "2", "model=tiny", "plan=even", "exit_on_failure=false", "timeout=30", "log_level=warning"]
    with ServerProcess(args, env={FAULT_ENV: "1:raise:40"}) as proc:
        r = httpx.post(proc.url + "/v1/completions", json={"prompt": "a", "max_tokens": 200, "ignore_eos": True},
                       timeout=60)
        err = r.json()["error"]
        assert r.status_code == 503 and err["request_id"] and err["request_id"] in err["message"], r.text
        assert not LEAKS.search(r.text) and "injected fault" not in r.text, r.text
        stream = httpx.post(proc.url + "/v1/completions", json={"prompt": "a", "stream": True})
        health = httpx.get(proc.url + "/health")
        for answer in (stream, health):
            assert not LEAKS.search(answer.text), answer.text
        assert stream.status_code == 503 and health.status_code == 503
        log = proc.log()
    assert "Traceback" in log and "injected fault" in log and err["request_id"] in log, log[-2000:]


# ---- signals ----

@pytest.mark.timeout(180)
def test_sigterm_to_every_process_while_streaming_drains_and_exits_0():
    """As a service manager stops a service: SIGTERM to the server and its workers at once, while a step
    is in flight; the running stream still finishes and the server exits 0 with nothing left."""
    args = ["--stages", "2", "model=tiny", "plan=even", "timeout=30", "log_level=warning"]
    with ServerProcess(args) as proc:
        workers = _children(proc.proc.pid)
        body = {"prompt": "a", "max_tokens": 120, "ignore_eos": True, "stream": True, "return_token_ids": True}
        with httpx.stream("POST", proc.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(lines)
            for p in [proc.proc, *workers]:
                p.send_signal(signal.SIGTERM)
            rest = [first, *lines]
        data = [x[6:] for x in rest if x.startswith("data: ")]
        assert data[-1] == "[DONE]" and sum(len(json.loads(x)["choices"][0]["token_ids"]) for x in data[:-1]) == 120
        assert proc.proc.wait(60) == 0, proc.log()
    deadline = time.monotonic() + 15
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers):
        assert time.monotonic() < deadline, "workers left behind"
        time.sleep(0.1)
