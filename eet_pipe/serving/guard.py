"""ASGI middleware in front of the app: request body size limit (413) and per-status request counts."""

from __future__ import annotations

import json
from typing import Any

from eet_pipe.serving.metrics import Metrics

__all__ = ["Guard"]

_BODY_METHODS = ("POST", "PUT", "PATCH")


class Guard:
    """Reads the whole body first (up to `max_bytes`, else 413) and counts /v1 responses by status."""

    def __init__(self, app: Any, max_bytes: int, metrics: Metrics) -> None:
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        counted = scope["path"].startswith("/v1/") and scope["method"] == "POST"

        async def send_counted(message: dict) -> None:
            if counted and message["type"] == "http.response.start":
                self.metrics.requests.inc(status=str(message["status"]))
            await send(message)

        if scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send_counted)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send_counted, int(declared))
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._too_large(send_counted, len(body))
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send_counted)

    async def _too_large(self, send: Any, size: int) -> None:
        text = (f"request body of {size} bytes or more exceeds the limit of {self.max_bytes} bytes "
                "(max_body_bytes)")
        payload = json.dumps({"error": {"message": text, "type": "invalid_request_error", "param": None,
                                        "code": 413}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
