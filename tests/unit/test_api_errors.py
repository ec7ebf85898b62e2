"""How the app answers a request the pipeline ended with an error, streamed and not, over a runtime that
fails every request as a per-sequence failure (500) or a pipeline failure (503) would."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from eet_pipe.serving.api import create_app
from eet_pipe.serving.sequences import Event
from eet_pipe.serving.serve_options import ServeOptions


class _Tokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) % 90 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(65 + i % 26) for i in ids)


class _FailingRuntime:
    def __init__(self, status: int, message: str) -> None:
        self.opts = ServeOptions()
        self.status, self.message, self.engine_pid, self.created = "ready", "", 1, int(time.time())
        self.model_name = "fake"
        self.setup = SimpleNamespace(tokenizer=_Tokenizer(), max_len=64, cfg=SimpleNamespace(vocab_size=90))
        self.responses = []
        self.failure = (status, message)
        self.cancelled = []

    async def submit(self, req, prompts, n) -> None:
        status, message = self.failure
        loop = asyncio.get_running_loop()
        loop.call_soon(req.emit, Event("token", 0, "A", [1]))
        loop.call_soon(req.emit, Event("error", status=status, message=message))

    def cancel(self, req) -> None:
        self.cancelled.append(req)

    def count_response(self, status: int) -> None:
        self.responses.append(status)

    async def render_metrics(self) -> str:
        return ""

    @asynccontextmanager
    async def lifespan(self, _):
        yield


@pytest.mark.parametrize(("status", "kind"), [(500, "internal_error"), (503, "service_unavailable")])
def test_a_failed_request_is_answered_with_its_status_kind_and_no_internals(status, kind):
    message = ("internal error while generating (error id 0123456789ab)" if status == 500 else
               "the pipeline failed: stage 1 (device cpu, pid 42) failed while serving:\nTraceback\n  File \"/srv/x.py\"")
    rt = _FailingRuntime(status, message)
    client = TestClient(create_app(rt))
    body = {"prompt": "hello", "max_tokens": 4}
    r = client.post("/v1/completions", json=body)
    err = r.json()["error"]
    assert r.status_code == status and err["type"] == kind, r.text
    assert err["request_id"] in err["message"] and "Traceback" not in r.text and "/srv" not in r.text
    if status == 500:
        assert "0123456789ab" in err["message"]  # the id under which the server logged the failure

    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200  # the status line went out with the first token
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["type"] == kind and err["code"] == status and "Traceback" not in err["message"]
    assert rt.responses == [status, 200]  # each response counted once, by the status it began with


@pytest.mark.parametrize(("path", "body", "where"), [
    ("/v1/completions", {"prompt": "a\ud800b"}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", "\udc00\ud800"]}, "prompt[1]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "\ud800"}]},
     "messages[1].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc80"}]}]},
     "messages[0].content"),
])
def test_text_that_is_not_unicode_is_a_400_naming_the_field(path, body, where):
    """JSON's \\uXXXX escapes can carry a lone surrogate, which no tokenizer encodes: the field is named, and nothing
    reaches the pipeline."""
    rt = _FailingRuntime(500, "unused")
    r = TestClient(create_app(rt)).post(path, content=json.dumps(body).encode(),  # \uXXXX escapes
                                        headers={"content-type": "application/json"})
    err = r.json()["error"]
    assert r.status_code == 400 and err["message"].startswith(f"{where} is not valid Unicode"), r.text
    assert "unpaired surrogate" in err["message"] and err["param"] == where.split("[")[0]
    assert rt.responses == [400]


@pytest.mark.parametrize(("content", "headers", "says"), [
    (b'{"prompt": "a",}', {"content-type": "application/json"}, "the body is not valid JSON: Expecting property name"),
    (b'{"prompt": "a"}', {"content-type": "text/plain"}, "its Content-Type is not application/json"),
    (b"", {}, "the request has no body"),
    (b'{"prompt": "a\xff"}', {"content-type": "application/json"}, "could not be parsed as JSON"),
    (b'{"prompt": "a", "max_tokens": ' + b"1" * 5000 + b"}", {"content-type": "application/json"},
     "could not be parsed as JSON"),
])
def test_a_body_that_is_not_a_json_object_says_why_and_what_to_send(content, headers, says):
    rt = _FailingRuntime(500, "unused")
    r = TestClient(create_app(rt)).post("/v1/completions", content=content, headers=headers)
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and says in message and "Content-Type: application/json" in message, r.text
    assert "b'" not in message  # the raw body is not echoed


def test_an_unexpected_exception_is_a_500_with_the_request_id_header_and_counted(monkeypatch, caplog):
    """An exception escaping a route is answered inside the middleware: the id header, the count and one log record
    with the traceback under the id."""
    import logging

    import eet_pipe.serving.api as api

    def broken(*args, **kwargs):
        raise RuntimeError("failed reading /srv/app/secret.json")

    monkeypatch.setattr(api, "encode_prompts", broken)
    rt = _FailingRuntime(500, "unused")
    with caplog.at_level(logging.ERROR, logger="eet_pipe.serve"):
        r = TestClient(create_app(rt)).post("/v1/completions", json={"prompt": "a"})
    err = r.json()["error"]
    assert r.status_code == 500 and r.headers["x-request-id"] == err["request_id"] and "/srv" not in r.text, r.text
    assert rt.responses == [500]
    logged = [rec for rec in caplog.records if err["request_id"] in rec.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None


def test_surrogate_bytes_in_a_raw_body_are_a_400_too():
    """Bytes that encode a surrogate (not UTF-8) are decoded by the JSON parser into one: the same clear 400."""
    rt = _FailingRuntime(500, "unused")
    r = TestClient(create_app(rt)).post("/v1/completions", content=b'{"prompt": "a\xed\xa0\x80"}',
                                        headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid Unicode" in r.json()["error"]["message"], r.text


def test_health_answers_head_probes_with_the_status_alone():
    rt = _FailingRuntime(500, "unused")
    client = TestClient(create_app(rt))
    r = client.head("/health")
    assert r.status_code == 200 and r.content == b""
    rt.status = "starting"
    assert client.head("/health").status_code == 503 and client.get("/health").json()["status"] == "starting"
