"""The FastAPI app: OpenAI-compatible completions and chat completions, models, health and metrics."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from eet_pipe.generation.sequences import SamplingParams
from eet_pipe.serving.errors import APIError, install_errors, request_id, server_error
from eet_pipe.serving.guard import Guard
from eet_pipe.serving.metrics import CONTENT_TYPE
from eet_pipe.serving.responses import SSE_DONE, Choice, ResponseBuilder, sse
from eet_pipe.serving.scheduler import QueueFullError, ServiceUnavailableError
from eet_pipe.serving.schemas import ChatRequest, CompletionRequest, SamplingRequest
from eet_pipe.serving.sequences import Event, GenRequest

__all__ = ["create_app", "APIError"]

log = logging.getLogger("eet_pipe.serve")


def check_text(text: str, where: str) -> None:
    """APIError 400 when `text` is not valid Unicode: JSON's \\uXXXX escapes (and bytes that are not UTF-8) can carry
    a lone UTF-16 surrogate, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise APIError(400, f"{where} is not valid Unicode: an unpaired surrogate (U+{ord(text[err.start]):04X}) at "
                            f"character {err.start}; send UTF-8 text", param=where.split("[")[0]) from None


def _encode(tokenizer: Any, text: str, where: str) -> list[int]:
    check_text(text, where)
    return tokenizer.encode(text)


def encode_prompts(prompt: Any, tokenizer: Any, vocab: int) -> list[list[int]]:
    """The `prompt` field (text, texts, token ids or lists of ids) as token-id lists; APIError 400 if unusable."""
    if isinstance(prompt, str):
        prompts = [_encode(tokenizer, prompt, "prompt")]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = [_encode(tokenizer, p, f"prompt[{i}]") if isinstance(p, str) else list(p)
                   for i, p in enumerate(prompt)]
    if not prompts:
        raise APIError(400, "prompt is empty: give a string, a list of strings or token ids", param="prompt")
    for i, ids in enumerate(prompts):
        if not ids:
            raise APIError(400, f"prompt {i} is empty (0 tokens)", param="prompt")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt {i} has token id {bad[0]} outside the vocabulary 0..{vocab - 1}", param="prompt")
    return prompts


def sampling_params(body: SamplingRequest, count: int, max_tokens: int, opts: Any) -> list[SamplingParams]:
    """One `SamplingParams` per choice; choice k gets seed + k (like `PipelineEngine.generate`)."""
    stops = body.stops
    if len(stops) > opts.max_stops:
        raise APIError(400, f"stop has {len(stops)} strings; this server allows at most {opts.max_stops} (max_stops)",
                       param="stop")
    long = next((s for s in stops if len(s) > opts.max_stop_chars), None)
    if long is not None:
        raise APIError(400, f"a stop string has {len(long)} characters; this server allows at most "
                            f"{opts.max_stop_chars} (max_stop_chars)", param="stop")
    try:
        return [SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                               top_k=max(body.top_k, 0), seed=None if body.seed is None else body.seed + k,
                               stop=stops, ignore_eos=body.ignore_eos) for k in range(count)]
    except ValueError as err:
        raise APIError(400, str(err), param=str(err).split("=", 1)[0]) from err


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
        params = sampling_params(body, len(prompts) * body.n, max_tokens, self.rt.opts)
        rt, events = self.rt, asyncio.Queue()
        tok = rt.setup.tokenizer
        req = GenRequest(prompts, params, body.n, tok.decode, events.put_nowait, logprobs)
        try:
            await rt.submit(req, prompts, body.n)
        except QueueFullError as err:
            raise APIError(429, str(err), "rate_limit_exceeded") from err
        except ServiceUnavailableError as err:
            raise APIError(503, str(err), "service_unavailable") from err
        builder = ResponseBuilder(chat, rt.model_name, lambda t: tok.decode([t]), logprobs is not None,
                                  body.return_token_ids)
        rid = request_id(request)
        if body.stream:
            return StreamingResponse(self.stream(req, events, builder, body.include_usage, rid),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        watcher = asyncio.create_task(_watch_disconnect(request, events))
        try:
            return await self.whole(req, events, builder)
        finally:
            watcher.cancel()
            if not req.closed:
                self.rt.cancel(req)

    async def whole(self, req: GenRequest, events: asyncio.Queue, builder: ResponseBuilder) -> dict:
        choices = [Choice() for _ in req.sequences]
        while True:
            ev: Event = await events.get()
            if ev.kind == "disconnect":  # `run` cancels the request
                raise APIError(499, "client closed the request", "cancelled")
            if ev.kind == "error":
                raise APIError(ev.status, ev.message, _error_kind(ev.status))
            if ev.kind == "done":
                return builder.response(choices, ev.usage or req.usage())
            choice = choices[ev.index]
            choice.text += ev.text
            choice.logprobs += ev.logprobs
            choice.token_ids += ev.token_ids
            choice.finish_reason = ev.finish_reason or choice.finish_reason

    async def stream(self, req: GenRequest, events: asyncio.Queue, builder: ResponseBuilder, usage: bool,
                     rid: str | None) -> Any:
        """SSE chunks of a request. Events that queued up while earlier ones were being written go out in
        one write (each still its own SSE event): a loaded server then spends its per-write cost on
        several tokens instead of falling further behind. An error ends the stream with an error event."""
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
                            out.append(sse(server_error(ev.status, ev.message, rid, _error_kind(ev.status))))
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
        except Exception as err:  # noqa: BLE001 - the status line is sent: the error goes in the stream
            log.error("request %s failed while streaming", rid, exc_info=err)
            yield sse(server_error(500, f"internal error while streaming: {type(err).__name__}", rid, "internal_error"))
            yield SSE_DONE
        finally:
            if not req.closed:
                self.rt.cancel(req)


def _error_kind(status: int) -> str:
    """The error type of a request the pipeline ended: 500 is our failure on that request alone, 503 the
    pipeline's or a stopping server's."""
    return "internal_error" if status == 500 else "service_unavailable"


async def _watch_disconnect(request: Request, events: asyncio.Queue) -> None:
    """Put a 'disconnect' event in `events` when the client closes the connection (the body is already
    read, so the next ASGI message is http.disconnect, or nothing until the response is sent)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    events.put_nowait(Event("disconnect"))


def _generation_routes(app: FastAPI, rt: Any) -> None:
    """POST /v1/completions and /v1/chat/completions."""
    handler = Handler(rt)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        handler.check_ready(body)
        prompts = encode_prompts(body.prompt, rt.setup.tokenizer, rt.setup.cfg.vocab_size)
        return await handler.run(request, body, prompts, body.max_tokens or 16, False, body.logprobs)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        handler.check_ready(body)
        tok = rt.setup.tokenizer
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        for i, m in enumerate(messages):
            check_text(m["content"], f"messages[{i}].content")
        text = tok.apply_chat_template(messages)
        prompts = encode_prompts(text, tok, rt.setup.cfg.vocab_size)
        limit = body.token_limit or max(rt.setup.max_len - len(prompts[0]), 1)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await handler.run(request, body, prompts, limit, True, logprobs)


def create_app(rt: Any) -> FastAPI:
    """The app over a runtime `rt` (status, message, opts, setup, model_name, submit, cancel, count_response,
    render_metrics, lifespan): `eet_pipe.serving.frontend.Frontend`."""
    app = FastAPI(title="eet_pipe", version="0.1.0", lifespan=rt.lifespan)
    app.add_middleware(Guard, max_bytes=rt.opts.max_body_bytes, count=rt.count_response, api_key=rt.opts.api_key,
                       body_timeout=rt.opts.body_timeout)
    install_errors(app)

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: load balancers' probes (status only)
    async def health() -> JSONResponse:
        body = {"status": rt.status, "pid": rt.engine_pid, "http_pid": os.getpid(), "message": rt.message}
        return JSONResponse(body, status_code=200 if rt.status == "ready" else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        try:
            text = await rt.render_metrics()
        except ServiceUnavailableError as err:
            raise APIError(503, str(err), "service_unavailable") from err
        return PlainTextResponse(text, media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": rt.model_name, "object": "model", "created": rt.created, "owned_by": "eet_pipe",
                "max_model_len": rt.setup.max_len if rt.setup is not None else None}
        return {"object": "list", "data": [card]}

    _generation_routes(app, rt)
    return app
