"""The HTTP server end to end: a real server subprocess (2 CPU stages, model=tiny) and real HTTP."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
import torch

import eet_pipe
from eet_pipe.runtime import PipelineEngine
from eet_pipe.runtime.step_parts import PAD_ENV
from eet_pipe.runtime.worker import FAULT_ENV
from eet_pipe.serving.process import ServerProcess

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["Hello", "The quick brown fox", "Once upon a time, in a land far away"]
SERVER_ARGS = ["--stages", "2", "--api-key", KEY, "model=tiny", "plan=even", "max_slots=16", "max_queue=128",
               "timeout=30", "log_level=warning"]


def _children(pid: int) -> list[psutil.Process]:
    kids = psutil.Process(pid).children(recursive=True)
    return [p for p in kids if "resource_tracker" not in " ".join(p.cmdline())]


def _workers(server: ServerProcess) -> list[psutil.Process]:
    """The stage workers of a server: its children except the HTTP process."""
    http = server.health()[1]["http_pid"]
    return [p for p in _children(server.proc.pid) if p.pid != http]


def _assert_gone(pids: list[int], within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.1)
    assert not alive, f"processes left behind: {alive}"


@pytest.fixture(scope="module")
def served():
    """(server, client, references): the server starts while the reference engine computes its answers."""
    # decode steps padded to batch buckets, as GPU stages run them for their CUDA graphs
    server = ServerProcess(SERVER_ARGS, env={PAD_ENV: "1"}).start()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the engine's workers take the caller's count; 2 cores host 4 workers here
    try:
        with PipelineEngine("tiny", devices=["cpu", "cpu"], plan="even") as engine:
            refs = {p: engine.generate([p], max_new_tokens=16)[0] for p in PROMPTS}
            refs["seeded"] = engine.generate([PROMPTS[1]], max_new_tokens=12, temperature=0.8, top_k=50, seed=7)[0]
            stop = refs[PROMPTS[0]].text[4:7]  # cut the greedy text in its middle
            refs["stop"] = engine.generate([PROMPTS[0]], max_new_tokens=16, stop=[stop])[0]
            refs["stop"].stop = stop
        server.wait_ready()
    except BaseException:
        server.stop(signal.SIGKILL)
        raise
    finally:
        torch.set_num_threads(threads)
    pids = [p.pid for p in _children(server.proc.pid)]
    try:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
            yield server, client, refs
            _interrupt_while_streaming(server, client)
    finally:
        code = server.stop(signal.SIGKILL)
    assert len(pids) >= 2 and code == 0, server.log()
    _assert_gone(pids)


def _interrupt_while_streaming(server: ServerProcess, client: httpx.Client) -> None:
    """SIGINT drains: a running stream still ends normally, then the server exits 0."""
    body = {"prompt": "a", "max_tokens": 150, "ignore_eos": True, "stream": True, "return_token_ids": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        first = next(lines)
        server.proc.send_signal(signal.SIGINT)
        rest = [first, *lines]
    data = [x[6:] for x in rest if x.startswith("data: ")]
    assert data[-1] == "[DONE]" and json.loads(data[-2])["choices"][0]["finish_reason"] == "length"
    assert sum(len(json.loads(x)["choices"][0]["token_ids"]) for x in data[:-1]) == 150
    assert server.proc.wait(30) == 0, server.log()


def _complete(client: httpx.Client, **body) -> dict:
    r = client.post("/v1/completions", json={"temperature": 0, "return_token_ids": True, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _stream(client: httpx.Client, path: str, **body) -> list:
    chunks = []
    with client.stream("POST", path, json={"stream": True, **body}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return chunks


@pytest.mark.timeout(120)
def test_completion_equals_pipeline_engine(served):
    _, client, refs = served
    for prompt in PROMPTS:
        out = _complete(client, prompt=prompt, max_tokens=16)
        choice, ref = out["choices"][0], refs[prompt]
        assert choice["token_ids"] == ref.token_ids and choice["text"] == ref.text
        assert choice["finish_reason"] == ref.finish_reason
        assert out["usage"] == {"prompt_tokens": len(ref.prompt_ids), "completion_tokens": len(ref.token_ids),
                                "total_tokens": len(ref.prompt_ids) + len(ref.token_ids)}
        assert out["object"] == "text_completion" and out["model"] == "tiny"


@pytest.mark.timeout(120)
def test_streaming_equals_pipeline_engine(served):
    _, client, refs = served
    chunks = _stream(client, "/v1/completions", prompt=PROMPTS[2], max_tokens=16, temperature=0,
                     return_token_ids=True, stream_options={"include_usage": True})
    assert chunks[-1] == "[DONE]"
    body = [c for c in chunks[:-1] if c["choices"]]
    assert "".join(c["choices"][0]["text"] for c in body) == refs[PROMPTS[2]].text
    assert [t for c in body for t in c["choices"][0]["token_ids"]] == refs[PROMPTS[2]].token_ids
    assert body[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-2]["usage"]["completion_tokens"] == 16


@pytest.mark.timeout(120)
def test_stop_string_cuts_text_like_the_engine(served):
    _, client, refs = served
    ref = refs["stop"]
    assert ref.finish_reason == "stop" and len(ref.text) < len(refs[PROMPTS[0]].text)
    whole = _complete(client, prompt=PROMPTS[0], max_tokens=16, stop=ref.stop)["choices"][0]
    assert (whole["text"], whole["finish_reason"]) == (ref.text, "stop")
    chunks = _stream(client, "/v1/completions", prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=[ref.stop])
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == ref.text  # no part of the stop string shown


@pytest.mark.timeout(120)
def test_seeded_sampling_is_repeatable_and_equals_engine(served):
    _, client, refs = served
    body = dict(prompt=PROMPTS[1], max_tokens=12, temperature=0.8, top_k=50, seed=7)
    first, second = _complete(client, **body), _complete(client, **body)
    assert first["choices"][0]["token_ids"] == second["choices"][0]["token_ids"] == refs["seeded"].token_ids
    two = _complete(client, **body, n=2)["choices"]
    assert two[0]["token_ids"] == refs["seeded"].token_ids and len(two) == 2


@pytest.mark.timeout(120)
def test_chat_uses_the_template_and_streams(served):
    _, client, _ = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0,
                                                  "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    chat = r.json()
    templated = "system: Be brief.\nuser: Hi\nassistant:"  # ByteTokenizer.apply_chat_template
    plain = _complete(client, prompt=templated, max_tokens=8)
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": plain["choices"][0]["text"]}
    assert len(chat["choices"][0]["logprobs"]["content"]) == 8
    assert len(chat["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2
    chunks = _stream(client, "/v1/chat/completions", messages=messages, max_tokens=8, temperature=0)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and chunks[-1] == "[DONE]"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == plain["choices"][0]["text"]


@pytest.mark.timeout(240)  # most of it is the 64 reference generations in this process, on a shared CPU
def test_64_concurrent_requests_each_equal_their_own_answer(served):
    _, client, _ = served
    lm = eet_pipe.from_pretrained("tiny")  # the pipeline equals the single-process model (transparency tests)
    jobs = []
    for i in range(64):
        sampled = i % 4 == 3
        body = {"prompt": f"Request {i}: " + "abcdefgh"[: i % 8] * (1 + i % 5), "max_tokens": 4 + i % 13,
                "temperature": 0.7 if sampled else 0, "seed": i if sampled else None, "stream": i % 2 == 1}
        ref = lm.generate([body["prompt"]], max_new_tokens=body["max_tokens"], temperature=body["temperature"],
                          seed=body["seed"])[0]
        jobs.append((body, ref))

    def run(job):
        body, _ = job
        if body["stream"]:
            chunks = _stream(client, "/v1/completions", **{**body, "stream": True}, return_token_ids=True)
            return [t for c in chunks[:-1] for t in c["choices"][0]["token_ids"]]
        return _complete(client, **body)["choices"][0]["token_ids"]

    with ThreadPoolExecutor(64) as pool:
        outputs = list(pool.map(run, jobs))
    for (body, ref), got in zip(jobs, outputs, strict=True):
        assert got == ref.token_ids, body


BAD = [  # (path, json body or raw bytes, headers, status, words in the message)
    ("/v1/completions", b'{"prompt": "hi", ', None, 400, "JSON"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, None, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -3}, None, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": -0.5}, None, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, None, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, None, 400, "stop"),
    ("/v1/completions", {"max_tokens": 3}, None, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, None, 400, "empty"),
    ("/v1/completions", {"prompt": [5, 999]}, None, 400, "999"),
    ("/v1/completions", {"prompt": "x" * 500, "max_tokens": 100}, None, 400, "500 tokens and max_tokens is 100"),
    ("/v1/completions", {"prompt": "hi", "n": 1000}, None, 400, "n=1000"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-5"}, None, 404, "gpt-5"),
    ("/v1/completions", {"prompt": "x" * 2_000_000}, None, 413, "exceeds the limit"),
    ("/v1/completions", {"prompt": "hi"}, {}, 401, "API key"),
    ("/v1/completions", {"prompt": "hi"}, {"Authorization": "Bearer wrong"}, 401, "API key"),
    ("/v1/chat/completions", {"messages": []}, None, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, None, 400, "role"),
    ("/v1/nothing", {}, None, 404, "Not Found"),
]


@pytest.mark.timeout(120)
def test_bad_inputs_get_4xx_and_the_server_keeps_serving(served):
    server, client, refs = served
    for path, body, headers, status, words in BAD:
        hdrs = AUTH if headers is None else headers
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(server.url + path, content=content, headers={**hdrs, "Content-Type": "application/json"})
        assert r.status_code == status, (path, body if isinstance(body, bytes) else str(body)[:80], r.text)
        assert words in r.json()["error"]["message"], r.text
    out = _complete(client, prompt=PROMPTS[0], max_tokens=16)
    assert out["choices"][0]["token_ids"] == refs[PROMPTS[0]].token_ids


@pytest.mark.timeout(120)
def test_idle_keep_alive_connection_outlives_client_expiry(served):
    """A connection left idle longer than clients' own keep-alive expiry (httpx: 5 s) still serves the
    next request: a server that closed it sooner would race with a client reusing it (reset, lost request)."""
    import http.client
    from urllib.parse import urlsplit

    server, _, _ = served
    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        conn.request("GET", "/health")
        first = conn.getresponse()
        assert first.status == 200 and first.read()
        sock = conn.sock
        time.sleep(6.0)
        conn.request("GET", "/health")  # raises RemoteDisconnected if the server closed the connection
        second = conn.getresponse()
        assert second.status == 200 and second.read()
        assert conn.sock is sock  # the same connection, not a new one
    finally:
        conn.close()


def test_models_health_metrics_and_disconnect(served):
    server, client, _ = served
    card = client.get("/v1/models").json()["data"][0]
    assert card["id"] == "tiny" and card["max_model_len"] == 512
    assert httpx.get(server.url + "/health").json()["status"] == "ready"  # no key needed
    with client.stream("POST", "/v1/completions", json={"prompt": "a", "max_tokens": 500, "ignore_eos": True,
                                                        "stream": True}) as r:
        next(r.iter_lines())  # the client goes away after the first chunk
    deadline = time.monotonic() + 10
    while "eet_pipe_running_sequences 0\n" not in (text := client.get("/metrics").text):
        assert time.monotonic() < deadline, "the disconnected stream still holds its slot"
        time.sleep(0.1)
    names = ("eet_pipe_requests_total{status=\"200\"}", "eet_pipe_time_to_first_token_seconds_bucket",
             "eet_pipe_time_per_output_token_seconds_count", "eet_pipe_queue_depth", "eet_pipe_generation_tokens_total",
             "eet_pipe_stage_busy_fraction{stage=\"0\"}", "eet_pipe_stage_busy_fraction{stage=\"1\"}")
    deadline = time.monotonic() + 10
    while missing := [name for name in names if name not in text]:
        # a stage reports its busy time along with a step, at most once per report interval: a server whose
        # first requests are these (the test alone) gets its first report from a later step
        assert time.monotonic() < deadline, f"missing from /metrics: {missing}"
        assert client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}).status_code == 200
        time.sleep(0.2)
        text = client.get("/metrics").text


def _stream_in_thread(url: str, body: dict, out: list) -> threading.Thread:
    def run() -> None:
        try:
            with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
                out.append(r.status_code)
                out.extend(r.iter_lines())
        except httpx.HTTPError as err:
            out.append(err)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


@pytest.mark.timeout(120)
def test_queue_limit_then_killed_worker_gives_503_and_clean_exit():
    # stage 1 hangs at its 60th action, so the two sequences of the first request keep both slots
    args = ["--stages", "2", "model=tiny", "plan=even", "max_slots=2", "max_queue=1", "timeout=60", "log_level=warning"]
    with ServerProcess(args, env={FAULT_ENV: "1:hang:60"}) as server:
        everyone, workers = _children(server.proc.pid), _workers(server)
        body = {"prompt": "a", "max_tokens": 400, "ignore_eos": True}
        stream: list = []
        threads = [_stream_in_thread(server.url, {**body, "n": 2}, stream)]
        queued: list = []
        threads.append(threading.Thread(target=lambda: queued.append(
            httpx.post(server.url + "/v1/completions", json=body, timeout=60)), daemon=True))
        deadline = time.monotonic() + 60
        while _metric(server.url, "eet_pipe_running_sequences") < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        threads[-1].start()
        while _metric(server.url, "eet_pipe_queue_depth") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.post(server.url + "/v1/completions", json=body)
        assert r.status_code == 429 and "max_queue=1" in r.json()["error"]["message"], r.text
        victim = next(p for p in workers if p.is_running())
        start = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        for t in threads:
            t.join(30)
        assert queued[0].status_code == 503 and "died" in queued[0].json()["error"]["message"]
        assert stream[0] == 200 and any('"code":503' in line for line in stream[1:] if isinstance(line, str)), stream[-3:]
        code = server.proc.wait(30)
        assert code == 1 and time.monotonic() - start < 30, server.log()
    _assert_gone([p.pid for p in everyone])


@pytest.mark.timeout(120)
def test_worker_dying_while_idle_keeps_503_without_exit_on_failure():
    args = ["--stages", "2", "model=tiny", "plan=even", "exit_on_failure=false", "log_level=warning"]
    with ServerProcess(args) as server:
        everyone, workers = _children(server.proc.pid), _workers(server)
        workers[-1].send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 15
        while (health := server.health())[0] != 503:
            assert time.monotonic() < deadline, health
            time.sleep(0.05)
        assert health[1]["status"] == "failed" and "killed by signal 9" in health[1]["message"]
        for _ in range(2):  # later requests: 503 naming the cause, and the server stays up
            r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi"})
            assert r.status_code == 503 and "died" in r.json()["error"]["message"], r.text
        assert server.proc.poll() is None
        assert server.stop(signal.SIGTERM) == 1
    _assert_gone([p.pid for p in everyone])
