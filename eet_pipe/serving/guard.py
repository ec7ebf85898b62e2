"""ASGI middleware in front of the app, in the order a request meets it:

1. a request id (``scope["state"]["request_id"]``, also sent back as the ``x-request-id`` header), which
   error bodies carry and the server log names;
2. the API key of /v1/* (401), checked before a byte of the body is read;
3. the body: uncompressed (a Content-Encoding other than identity is 415, before it is read), read whole within
   `body_timeout` seconds (else 408) and up to `max_bytes` (else 413);
4. per-status counts of POST /v1/* responses (`count(status)` at each response's start);
5. an exception the app raises: logged under the request id and answered with a 500 error body (when no response
   has started), like every other answer with the id header and counted. Starlette's own last-resort handler sits
   outside this middleware and would answer without either.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import Callable
from typing import Any

from eet_pipe.serving.errors import error_body, internal_error_message, log

__all__ = ["Guard", "new_request_id"]

_BODY_METHODS = ("POST", "PUT", "PATCH")


def new_request_id() -> str:
    return "req-" + uuid.uuid4().hex[:20]


class Guard:
    """See the module docstring; `api_key` None means /v1/* is open."""

    def __init__(self, app: Any, max_bytes: int, count: Callable[[int], None], api_key: str | None = None,
                 body_timeout: float = 30.0) -> None:
        self.app, self.max_bytes, self.count = app, max_bytes, count
        self.api_key, self.body_timeout = api_key, body_timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        counted = scope["path"].startswith("/v1/") and scope["method"] == "POST"

        async def send_counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
                if counted:
                    self.count(message["status"])
            await send(message)

        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"].startswith("/v1/") and not secrets.compare_digest(
                headers.get(b"authorization", b""), f"Bearer {self.api_key}".encode()):
            await _reply(send_counted, 401, rid, "missing or wrong API key: send the header "
                         "'Authorization: Bearer <key>'", "authentication_error", close=scope["method"] in _BODY_METHODS)
            return
        if scope["method"] not in _BODY_METHODS:
            await self._app(scope, receive, send_counted, rid)
            return
        encoding = headers.get(b"content-encoding", b"identity").decode("latin-1").strip().lower()
        if encoding not in ("", "identity"):
            await _reply(send_counted, 415, rid, f"Content-Encoding {encoding!r} is not supported: send the body "
                         "uncompressed", "invalid_request_error", close=True)
            return
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send_counted, rid, int(declared))
            return
        try:
            body = await asyncio.wait_for(self._read(receive), self.body_timeout)
        except asyncio.TimeoutError:
            await _reply(send_counted, 408, rid, f"the request body did not arrive within {self.body_timeout:g} s "
                         "(body_timeout)", "invalid_request_error", close=True)
            return
        if body is None:  # the client went away
            return
        if len(body) > self.max_bytes:
            await self._too_large(send_counted, rid, len(body))
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self._app(scope, replay, send_counted, rid)

    async def _app(self, scope: dict, receive: Any, send: Any, rid: str) -> None:
        """The app; an exception it raises is logged with its traceback under `rid` and, if no response has
        started, answered with a 500 that names only the request id."""
        started = False

        async def tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.error("request %s failed", rid, exc_info=True)
            if not started:
                await _reply(send, 500, rid, internal_error_message(rid), "internal_error")

    async def _read(self, receive: Any) -> bytearray | None:
        """The whole body (stops early once over the limit); None if the client disconnected."""
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_bytes or not message.get("more_body", False):
                return body

    async def _too_large(self, send: Any, rid: str, size: int) -> None:
        await _reply(send, 413, rid, f"request body of {size} bytes or more exceeds the limit of {self.max_bytes} "
                     "bytes (max_body_bytes)", "invalid_request_error", close=True)


async def _reply(send: Any, status: int, rid: str, message: str, kind: str, close: bool = False) -> None:
    """An OpenAI error body (`close`: the unread rest of the body makes the connection unusable)."""
    payload = json.dumps(error_body(message, kind, status, rid=rid)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
