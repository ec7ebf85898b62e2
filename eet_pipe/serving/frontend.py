"""The HTTP process: uvicorn and the FastAPI app, tokenisation, detokenisation and SSE, apart from the
process that runs the scheduler and the step loop (`eet_pipe.serving.engine_core`).

`Frontend` is the runtime the app sees (`status`, `setup`, `submit`, `cancel`, metrics). A reader task
takes the engine's messages: each step's events of every request arrive in one message and are
turned into text here, with the same `Sequence` / `TextStream` code the engine once ran itself. The
process ignores SIGINT/SIGTERM (the engine process tells it to stop after draining) and dies with the
engine process.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import itertools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from eet_pipe.serving.ipc import IpcPaths, dumps, loads, pull_socket, push_socket
from eet_pipe.serving.scheduler import QueueFullError, ServiceUnavailableError
from eet_pipe.serving.sequences import Event, GenRequest
from eet_pipe.serving.serve_options import ServeOptions

__all__ = ["Frontend", "frontend_main"]

log = logging.getLogger("eet_pipe.serve")

ENGINE_REPLY_TIMEOUT = 10.0
"""Seconds to wait for the engine process to answer a submit or a metrics request."""


@dataclass
class _Cfg:
    vocab_size: int


@dataclass
class FrontendSetup:
    """What the app needs of the pipeline's setup (the engine process sends it when ready)."""

    tokenizer: Any
    max_len: int
    cfg: _Cfg


class Frontend:
    """The runtime of the HTTP app in this process; see the module docstring."""

    def __init__(self, opts: ServeOptions, paths: IpcPaths, tokenizer: Any, engine_pid: int, index: int = 0) -> None:
        self.opts, self.paths, self.tokenizer = opts, paths, tokenizer
        self.engine_pid = engine_pid
        """The server's main process (the one to signal); /health shows it as `pid`."""
        self.index = index
        """This HTTP process's number (0 .. api_servers - 1)."""
        self.status, self.message = "loading", "the server is loading the model"
        self.setup: FrontendSetup | None = None
        self.created = int(time.time())
        self.server: Any = None
        self.requests: dict[int, GenRequest] = {}
        self.waiting: dict[Any, asyncio.Future] = {}
        self._tokens = itertools.count()
        self._push = push_socket(zmq.Context.instance(), paths.engine)

    @property
    def model_name(self) -> str:
        return self.opts.served_model_name or self.opts.model

    # ---- what the app calls ----

    async def submit(self, req: GenRequest, prompts: list[list[int]], n: int) -> None:
        """Hand `req` (`prompts` x `n` choices) to the engine; QueueFullError (429) or
        ServiceUnavailableError (503) if refused."""
        self.requests[req.id] = req
        params = [s.params for s in req.sequences]
        try:
            status, message = await self._ask(req.id, ("submit", self.index, req.id, prompts, params, n, req.logprobs))
        except BaseException:  # no answer, or the client went away meanwhile: the engine may still take it
            self.cancel(req)
            raise
        if status != 200:
            self.requests.pop(req.id, None)
            raise (QueueFullError if status == 429 else ServiceUnavailableError)(message)

    def cancel(self, req: GenRequest) -> None:
        req.closed = True
        if self.requests.pop(req.id, None) is not None:
            self._push.send(dumps(("cancel", self.index, req.id)))

    def count_response(self, status: int) -> None:
        """A POST /v1/* response began with `status`: counted by the engine, for every HTTP process."""
        self._push.send(dumps(("response", status)))

    async def render_metrics(self) -> str:
        """The engine's metrics (request counts of every HTTP process included)."""
        token = ("metrics", next(self._tokens))
        return await self._ask(token, ("metrics", self.index, token))

    async def _ask(self, key: Any, message: tuple) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.waiting[key] = future
        self._push.send(dumps(message))
        try:
            return await asyncio.wait_for(future, ENGINE_REPLY_TIMEOUT)
        except asyncio.TimeoutError:
            raise ServiceUnavailableError("the engine process did not answer") from None
        finally:
            self.waiting.pop(key, None)

    # ---- the engine's messages ----

    async def read(self) -> None:
        ctx = zmq.asyncio.Context()
        sock = pull_socket(ctx, self.paths.frontend(self.index))
        try:
            while True:
                self._handle_safely(loads(await sock.recv()))
                # whatever else has arrived too, before the streams run: their writes then carry several steps
                while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    self._handle_safely(loads(await sock.recv()))
        finally:
            sock.close()
            ctx.term()

    def _handle_safely(self, msg: tuple) -> None:
        try:
            self.handle(msg)
        except Exception:  # noqa: BLE001 - one bad message must not stop every other request's events
            log.exception("handling the engine's %r message failed", msg[0])

    def handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "events":
            self._events(msg[1])
        elif kind in ("accepted", "metrics"):
            key = msg[1]
            future = self.waiting.get(key)
            if future is not None and not future.done():
                future.set_result(tuple(msg[2:]) if kind == "accepted" else msg[2])
        elif kind == "status":
            self._status(*msg[1:])
        elif kind == "stop" and self.server is not None:
            self.server.should_exit = True  # stop accepting; running responses finish (the engine drains)

    def _status(self, status: str, message: str, info: dict | None) -> None:
        if info is not None and self.setup is None:
            self.setup = FrontendSetup(self.tokenizer, info["max_len"], _Cfg(info["vocab_size"]))
        self.status, self.message = status, message

    def _events(self, events: list[tuple]) -> None:
        finishing = {(e[0], e[2]) for e in events if e[1] == "finish"}
        last_token = {(e[0], e[2]): i for i, e in enumerate(events) if e[1] == "token"}
        for i, (rid, kind, index, token_ids, logprobs, reason, text, status, message) in enumerate(events):
            req = self.requests.get(rid)
            if req is None:
                continue
            if kind == "token":
                seq = req.sequences[index]
                last = (rid, index) in finishing and last_token[(rid, index)] == i
                req.emit(seq.on_token(token_ids[0], tuple(logprobs[0][1:]) if logprobs else None, last))
            elif kind == "finish":
                req.emit(req.sequences[index].on_finish(reason, text))
            elif kind == "done":
                self.requests.pop(rid, None)
                req.emit(Event("done", usage=req.usage()))
            elif kind == "error":
                self.requests.pop(rid, None)
                req.emit(Event("error", status=status, message=message))

    @asynccontextmanager
    async def lifespan(self, _: Any) -> AsyncIterator[None]:
        reader = asyncio.create_task(self.read())
        yield
        reader.cancel()


def freeze_heap() -> None:
    """Move every object alive now (modules, the model's setup, the app) out of the garbage collector's
    sight. Called once a serving process is set up: a full collection walks every tracked object, 50-100 ms
    with torch and the app imported, and serving allocates enough to trigger one every so often, stalling
    the step loop or the event loop. Objects made later are collected as usual."""
    gc.collect()
    gc.freeze()


def _die_with_parent(parent: int) -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def frontend_main(opts: ServeOptions, paths: IpcPaths, parent: int, index: int = 0) -> None:
    """Entry of HTTP process `index` (spawned by the engine process; exits 0 after a graceful stop)."""
    _die_with_parent(parent)
    logging.basicConfig(level=opts.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from eet_pipe.loading.presets import resolve_model
    from eet_pipe.loading.units import tokenizer_for
    from eet_pipe.serving.api import create_app
    from eet_pipe.serving.listener import make_server, shared_port_socket

    sockets = [shared_port_socket(opts)] if opts.api_servers > 1 else None  # bound before the tokenizer loads
    tokenizer = tokenizer_for(resolve_model(opts.model, opts.weights, opts.weights_seed))
    frontend = Frontend(opts, paths, tokenizer, parent, index)
    frontend.server = make_server(opts, create_app(frontend))
    freeze_heap()
    frontend.server.run(sockets=sockets)
    sys.exit(0)
