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
