"""The FastAPI app: OpenAI-compatible completions and chat completions, models, health and metrics."""

from __future__ import annotations

import asyncio
import os
import secrets
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from eet_pipe.generation import SamplingParams
from eet_pipe.serving.guard import Guard
from eet_pipe.serving.metrics import CONTENT_TYPE
from eet_pipe.serving.responses import SSE_DONE, Choice, ResponseBuilder, error_body, sse
from eet_pipe.serving.scheduler import QueueFullError, ServiceUnavailableError
from eet_pipe.serving.schemas import ChatRequest, CompletionRequest, SamplingRequest
from eet_pipe.serving.sequences import Event, GenRequest

__all__ = ["create_app", "APIError"]

DISCONNECT_POLL_S = 1.0


class APIError(Exception):
    """An error answered with OpenAI's error body and `status`."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        got = f" (got {str(err['input'])[:80]!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        parts.append(f"{loc}: {err.get('msg', 'invalid')}{got}")
    return "invalid request: " + "; ".join(parts)


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.kind, exc.status, exc.param), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(_validation_message(exc), "invalid_request_error", 400), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", exc.status_code),
                            status_code=exc.status_code)


def encode_prompts(prompt: Any, tokenizer: Any, vocab: int) -> list[list[int]]:
    """The `prompt` field (text, texts, token ids or lists of ids) as token-id lists; APIError 400 if unusable."""
    if isinstance(prompt, str):
        prompts = [tokenizer.encode(prompt)]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
    if not prompts:
        raise APIError(400, "prompt is empty: give a string, a list of strings or token ids", param="prompt")
    for i, ids in enumerate(prompts):
        if not ids:
            raise APIError(400, f"prompt {i} is empty (0 tokens)", param="prompt")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt {i} has token id {bad[0]} outside the vocabulary 0..{vocab - 1}", param="prompt")
    return prompts


def sampling_params(body: SamplingRequest, count: int, max_tokens: int) -> list[SamplingParams]:
    """One `SamplingParams` per choice; choice k gets seed + k (like `PipelineEngine.generate`)."""
    try:
        return [SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                               top_k=max(body.top_k, 0), seed=None if body.seed is None else body.seed + k,
                               stop=body.stops, ignore_eos=body.ignore_eos) for k in range(count)]
    except ValueError as err:
        raise APIError(400, str(err)) from err


class Handler:
    """Runs one generation request against the runtime's scheduler."""

    def __init__(self, rt: Any) -> None:
        self.rt = rt

    def check_ready(self, body: SamplingRequest) -> None:
        if self.rt.status != "ready":
            raise APIError(503, self.rt.message or f"the server is {self.rt.status}", "service_unavailable")
        if body.model is not None and body.model != self.rt.model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {self.rt.model_name!r}",
                           "model_not_found", "model")

    def check_lengths(self, prompts: list[list[int]], max_tokens: int, n: int) -> None:
        context = self.rt.setup.max_len
        for i, ids in enumerate(prompts):
            if len(ids) + max_tokens > context:
                raise APIError(400, f"prompt {i} has {len(ids)} tokens and max_tokens is {max_tokens}: "
                                    f"{len(ids) + max_tokens} > the context length {context}; shorten the prompt "
                                    "or lower max_tokens", param="max_tokens")
        choices, limit = len(prompts) * n, self.rt.opts.max_queue + self.rt.opts.max_slots
        if n > self.rt.opts.max_n or choices > limit:
            raise APIError(400, f"{len(prompts)} prompt(s) x n={n} = {choices} choices; this server allows at "
                                f"most n={self.rt.opts.max_n} and {limit} choices (max_queue + max_slots) per request",
                           param="n")

    async def run(self, request: Request, body: SamplingRequest, prompts: list[list[int]], max_tokens: int,
                  chat: bool, logprobs: int | None) -> Any:
        self.check_lengths(prompts, max_tokens, body.n)
        rt, loop, events = self.rt, asyncio.get_running_loop(), asyncio.Queue()
        tok = rt.setup.tokenizer
        req = GenRequest(prompts, sampling_params(body, len(prompts) * body.n, max_tokens), body.n, tok.decode,
                         lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev), logprobs)
        try:
            rt.scheduler.submit(req)
        except QueueFullError as err:
            raise APIError(429, str(err), "rate_limit_exceeded") from err
        except ServiceUnavailableError as err:
            raise APIError(503, str(err), "service_unavailable") from err
        builder = ResponseBuilder(chat, rt.model_name, lambda t: tok.decode([t]), logprobs is not None,
                                  body.return_token_ids)
        if body.stream:
            return StreamingResponse(self.stream(req, events, builder, body.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self.whole(request, req, events, builder)

    async def whole(self, request: Request, req: GenRequest, events: asyncio.Queue, builder: ResponseBuilder) -> dict:
        choices = [Choice() for _ in req.sequences]
        while True:
            try:
                ev: Event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.rt.scheduler.cancel(req)
                    raise APIError(499, "client closed the request", "cancelled") from None
                continue
            if ev.kind == "error":
                raise APIError(ev.status, ev.message, "service_unavailable")
            if ev.kind == "done":
                return builder.response(choices, ev.usage or req.usage())
            choice = choices[ev.index]
            choice.text += ev.text
            choice.logprobs += ev.logprobs
            choice.token_ids += ev.token_ids
            choice.finish_reason = ev.finish_reason or choice.finish_reason

    async def stream(self, req: GenRequest, events: asyncio.Queue, builder: ResponseBuilder, usage: bool) -> Any:
        """SSE chunks of a request. Events that queued up while earlier ones were being written go out in
        one write (each still its own SSE event): a loaded server then spends its per-write cost on
        several tokens instead of falling further behind."""
        try:
            if builder.chat:
                yield "".join(builder.role_chunk(seq.index) for seq in req.sequences)
            ended = False
            while not ended:
                pending: list[Event] = [await events.get()]
                while not events.empty():
                    pending.append(events.get_nowait())
                out: list[str] = []
                for ev in pending:
                    if ev.kind in ("error", "done"):
                        if ev.kind == "error":
                            out.append(sse(error_body(ev.message, "service_unavailable", ev.status)))
                        elif usage:
                            out.append(builder.usage_chunk(ev.usage or req.usage()))
                        out.append(SSE_DONE)
                        ended = True
                        break
                    chunk = builder.event_chunk(ev)
                    if chunk is not None:
                        out.append(chunk)
                if out:
                    yield "".join(out)
        finally:
            if not req.closed:
                self.rt.scheduler.cancel(req)


def _generation_routes(app: FastAPI, rt: Any, auth: Any) -> None:
    """POST /v1/completions and /v1/chat/completions."""
    handler = Handler(rt)

    @app.post("/v1/completions", dependencies=[auth])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        handler.check_ready(body)
        prompts = encode_prompts(body.prompt, rt.setup.tokenizer, rt.setup.cfg.vocab_size)
        return await handler.run(request, body, prompts, body.max_tokens or 16, False, body.logprobs)

    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat(body: ChatRequest, request: Request) -> Any:
        handler.check_ready(body)
        tok = rt.setup.tokenizer
        text = tok.apply_chat_template([{"role": m.role, "content": m.text()} for m in body.messages])
        prompts = encode_prompts(text, tok, rt.setup.cfg.vocab_size)
        limit = body.token_limit or max(rt.setup.max_len - len(prompts[0]), 1)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await handler.run(request, body, prompts, limit, True, logprobs)


def create_app(rt: Any) -> FastAPI:
    """The app over a runtime `rt` (status, message, opts, setup, scheduler, metrics, model_name)."""
    app = FastAPI(title="eet_pipe", version="0.1.0", lifespan=rt.lifespan)
    app.add_middleware(Guard, max_bytes=rt.opts.max_body_bytes, metrics=rt.metrics)
    _install_errors(app)

    def auth(request: Request) -> None:
        key = rt.opts.api_key
        if key and not secrets.compare_digest(request.headers.get("authorization", ""), f"Bearer {key}"):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           "authentication_error")

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {"status": rt.status, "pid": os.getpid(), "message": rt.message}
        return JSONResponse(body, status_code=200 if rt.status == "ready" else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(rt.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models() -> dict:
        card = {"id": rt.model_name, "object": "model", "created": rt.created, "owned_by": "eet_pipe",
                "max_model_len": rt.setup.max_len if rt.setup is not None else None}
        return {"object": "list", "data": [card]}

    _generation_routes(app, rt, Depends(auth))
    return app
