"""Errors as clients see them: OpenAI's error body with a message and the request id, never internals.

A 5xx answer carries one line that says what happened and the request id; the full text (a worker's
traceback, an exception with its frames) goes to the server log under the same id.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["APIError", "install_errors", "public_message", "request_id", "error_body", "internal_error_message"]

log = logging.getLogger("eet_pipe.serve")

_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][\w.\-]+){2,}[\\/]?")
_MAX_MESSAGE = 300


class APIError(Exception):
    """An error answered with OpenAI's error body and `status`."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_body(message: str, kind: str, code: int, param: str | None = None, rid: str | None = None) -> dict:
    """OpenAI's error object, plus the request id (`request_id`) the server log names."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code, "request_id": rid}}


def internal_error_message(rid: str | None) -> str:
    """The whole message of a 500 for an unexpected exception: the request id its traceback is logged under."""
    return f"internal server error (request id {rid}; details in the server log)"


def request_id(request: Request) -> str | None:
    """The id `Guard` gave this request."""
    return request.scope.get("state", {}).get("request_id")


def public_message(text: str) -> str:
    """What a client may see of an internal error text: its first line, no file paths, bounded length."""
    line = text.strip().splitlines()[0] if text.strip() else "internal error"
    line = _PATH.sub("<path>", line.split("Traceback")[0]).rstrip(" :") or "internal error"
    return line[:_MAX_MESSAGE]


def server_error(status: int, text: str, rid: str | None, kind: str = "service_unavailable") -> dict:
    """The body of a 5xx answer; the whole `text` goes to the log under `rid`."""
    log.error("request %s: %s", rid, text)
    return error_body(f"{public_message(text)} (request id {rid}; details in the server log)", kind, status, rid=rid)


_SEND_JSON = "send a JSON object with the header 'Content-Type: application/json'"
_UNPARSED = "There was an error parsing the body"  # FastAPI's text when json.loads itself raised


def _body_message(err: dict) -> str | None:
    """The message of an error about the body as a whole (not JSON, not an object, absent), else None."""
    loc = tuple(err.get("loc", ()))
    if err.get("type") == "json_invalid":
        reason = (err.get("ctx") or {}).get("error", "JSON decode error")
        return f"the body is not valid JSON: {reason} at character {loc[-1] if len(loc) > 1 else 0}; {_SEND_JSON}"
    if loc != ("body",):
        return None
    if err.get("type") == "missing":
        return f"the request has no body; {_SEND_JSON}"
    if isinstance(err.get("input"), bytes | str):  # not parsed: the content type was not JSON
        return f"the body was not read as JSON (its Content-Type is not application/json); {_SEND_JSON}"
    return None


def _validation_message(exc: RequestValidationError) -> str:
    whole = next((m for m in map(_body_message, exc.errors()) if m is not None), None)
    if whole is not None:
        return "invalid request: " + whole
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        got = f" (got {str(err['input'])[:80]!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        parts.append(f"{loc}: {err.get('msg', 'invalid')}{got}")
    return "invalid request: " + "; ".join(parts)


def install_errors(app: FastAPI) -> None:
    """Every error becomes an OpenAI error body with the request id; 5xx bodies hold no internals."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        rid = request_id(request)
        if exc.status >= 500:
            return JSONResponse(server_error(exc.status, exc.message, rid, exc.kind), status_code=exc.status)
        return JSONResponse(error_body(exc.message, exc.kind, exc.status, exc.param, rid), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        body = error_body(_validation_message(exc), "invalid_request_error", 400, rid=request_id(request))
        return JSONResponse(body, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 400 and message == _UNPARSED:
            message = ("invalid request: the body could not be parsed as JSON (bytes that are not UTF-8, nesting too "
                       f"deep, or a number too long); {_SEND_JSON}")
        body = error_body(message, "invalid_request_error", exc.status_code, rid=request_id(request))
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id(request)
        log.error("request %s failed", rid, exc_info=exc)
        body = error_body(internal_error_message(rid), "internal_error", 500, rid=rid)
        return JSONResponse(body, status_code=500)
