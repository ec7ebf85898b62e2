"""Error bodies: a message and the request id, never a traceback or a file path."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.testclient import TestClient

from eet_pipe.serving.errors import APIError, install_errors, public_message
from eet_pipe.serving.guard import Guard

WORKER_TEXT = ('the pipeline failed: stage 1 (device cpu, pid 42) failed while serving:\nTraceback (most recent call '
               'last):\n  File "/srv/app/eet_pipe/runtime/step.py", line 9, in run\nRuntimeError: bad')


def _app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(Guard, max_bytes=2048, count=lambda status: None, api_key="k")
    install_errors(app)

    @app.post("/v1/boom")
    async def boom() -> dict:
        raise RuntimeError("failed reading /srv/app/secret/config.json")

    @app.post("/v1/worker")
    async def worker() -> dict:
        raise APIError(503, WORKER_TEXT, "service_unavailable")

    return app


def test_public_message_keeps_the_first_line_without_paths():
    assert public_message(WORKER_TEXT) == "the pipeline failed: stage 1 (device cpu, pid 42) failed while serving"
    assert public_message("open C:\\data\\models\\x.bin: denied") == "open <path>: denied"
    assert public_message("") == "internal error"


def test_500_and_503_bodies_carry_the_request_id_and_the_log_has_the_details(caplog):
    client = TestClient(_app())  # nothing escapes to the test client
    with caplog.at_level(logging.ERROR, logger="eet_pipe.serve"):
        for path, status in (("/v1/boom", 500), ("/v1/worker", 503)):
            r = client.post(path, headers={"Authorization": "Bearer k"})
            err = r.json()["error"]
            assert r.status_code == status and err["request_id"] in err["message"], r.text
            assert "Traceback" not in r.text and "/srv/app" not in r.text and 'File "' not in r.text, r.text
            assert any(err["request_id"] in rec.getMessage() for rec in caplog.records)
            assert r.headers["x-request-id"] == err["request_id"]  # the 500 too: answered inside Guard
    assert "Traceback" in caplog.text or "RuntimeError" in caplog.text


def test_missing_key_is_401_before_the_route():
    r = TestClient(_app()).post("/v1/worker", content=b"x" * 100)
    assert r.status_code == 401 and r.json()["error"]["request_id"].startswith("req-")


def test_a_compressed_body_is_415_before_it_is_read():
    counted = []
    app = FastAPI()
    app.add_middleware(Guard, max_bytes=2048, count=counted.append)

    @app.post("/v1/echo")
    async def echo() -> dict:
        return {"ok": True}

    client = TestClient(app)
    r = client.post("/v1/echo", content=b"\x1f\x8b\x08\x00", headers={"content-encoding": "gzip"})
    assert r.status_code == 415 and "Content-Encoding 'gzip' is not supported" in r.json()["error"]["message"]
    assert r.headers["x-request-id"] == r.json()["error"]["request_id"] and counted == [415]
    assert client.post("/v1/echo", content=b"{}", headers={"content-encoding": "identity"}).status_code == 200
