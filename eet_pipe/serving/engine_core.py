"""The engine side of the server: the scheduler and the step loop, in a process without HTTP.

`EngineCore` owns the `Runtime` (driver, scheduler, metrics) and talks to the HTTP process (or
processes, `api_servers`) over ZeroMQ (`eet_pipe.serving.ipc`). Requests arrive on a receiver thread;
the scheduler thread's events go into an outbox that is sent as one message per HTTP process and step:
the driver is wrapped so that every `collect` (the scheduler waiting for the next result, with the next
step already issued) first sends what the previous result produced. Tokens are not turned into text
here: the engine side decodes nothing, the HTTP process does (`NO_TEXT` marks a finish whose text the
stage did not send).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import zmq

from eet_pipe.serving.ipc import NO_TEXT, IpcPaths, dumps, loads, pull_socket, push_socket
from eet_pipe.serving.scheduler import QueueFullError, ServiceUnavailableError
from eet_pipe.serving.sequences import Event, GenRequest

__all__ = ["EngineCore"]

log = logging.getLogger("eet_pipe.serve")


class _Outbox:
    """Events of many requests, one message per HTTP process and step (mostly sent by the scheduler thread;
    the lock serialises the rest)."""

    def __init__(self, ctx: zmq.Context, endpoints: list[str]) -> None:
        self.socks = [push_socket(ctx, e) for e in endpoints]
        self.events: list[list[tuple]] = [[] for _ in endpoints]
        self.lock = threading.Lock()

    def sink(self, rid: int, index: int = 0) -> Callable[[Event], None]:
        """Where the events of request `rid` of HTTP process `index` go."""
        events = self.events

        def put(ev: Event) -> None:
            text = ev.text if ev.kind == "finish" else ""
            item = (rid, ev.kind, ev.index, ev.token_ids, ev.logprobs, ev.finish_reason,
                    None if text == NO_TEXT else text, ev.status, ev.message)
            with self.lock:
                events[index].append(item)
        return put

    def flush(self) -> None:
        with self.lock:  # held while sending: the sockets are used by one thread at a time
            for index, pending in enumerate(self.events):
                if pending:
                    self.socks[index].send(dumps(("events", pending)))
                    self.events[index] = []

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


class _FlushingDriver:
    """The runtime's driver, sending the outbox whenever the scheduler thread waits on the pipeline."""

    def __init__(self, driver: Any, outbox: _Outbox) -> None:
        self._driver, self._outbox = driver, outbox

    def __getattr__(self, name: str) -> Any:
        return getattr(self._driver, name)

    def collect(self) -> dict:
        self._outbox.flush()
        return self._driver.collect()

    def check_alive(self) -> None:
        self._outbox.flush()
        self._driver.check_alive()


def _no_text(_: list[int]) -> str:
    return ""


class EngineCore:
    """Receives requests from the HTTP process and sends back their events; see the module docstring."""

    def __init__(self, rt: Any, paths: IpcPaths, frontends: int = 1) -> None:
        self.rt, self.paths = rt, paths
        self.ctx = zmq.Context()
        self.endpoints = [paths.frontend(i) for i in range(frontends)]
        self.outbox = _Outbox(self.ctx, self.endpoints)
        self.requests: dict[tuple[int, int], GenRequest] = {}
        """Running requests by (HTTP process, its request id)."""
        self._stop = threading.Event()
        self._status_lock = threading.Lock()
        self._status_socks = [push_socket(self.ctx, e) for e in self.endpoints]
        self._receiver = threading.Thread(target=self._receive, name="eet_pipe-ipc", daemon=True)

    def wrap(self, driver: Any) -> _FlushingDriver:
        return _FlushingDriver(driver, self.outbox)

    def start(self) -> None:
        self._receiver.start()

    def publish_status(self) -> None:
        """Tell the HTTP process the runtime's status (any thread), after the events before it (a
        failure's error events)."""
        self.outbox.flush()
        rt = self.rt
        info = None
        if rt.setup is not None:
            info = {"max_len": rt.setup.max_len, "vocab_size": rt.setup.cfg.vocab_size}
        self._to_every_frontend(("status", rt.status, rt.message, info))

    def stop_frontend(self) -> None:
        """Tell the HTTP processes to stop accepting connections; each exits once its responses are sent."""
        self._to_every_frontend(("stop",))

    def _to_every_frontend(self, message: tuple) -> None:
        data = dumps(message)
        with self._status_lock:
            for sock in self._status_socks:
                sock.send(data)

    def cancel_frontend(self, index: int) -> None:
        """HTTP process `index` is gone: cancel its requests (nobody would read their events)."""
        scheduler = self.rt.scheduler
        for key in [k for k in list(self.requests) if k[0] == index]:
            req = self.requests.pop(key, None)
            if req is not None and scheduler is not None:
                scheduler.cancel(req)

    def flush(self) -> None:
        """Send what is left in the outbox (when the scheduler thread has ended)."""
        self.outbox.flush()

    def close(self) -> None:
        self._stop.set()
        self._receiver.join(5.0)
        self.outbox.close()
        for sock in self._status_socks:
            sock.close()
        self.ctx.term()

    # ---- the receiver thread ----

    def _receive(self) -> None:
        inbox = pull_socket(self.ctx, self.paths.engine)
        replies = [push_socket(self.ctx, e) for e in self.endpoints]
        try:
            while not self._stop.is_set():
                if not inbox.poll(100):
                    continue
                msg = loads(inbox.recv())
                if msg[0] == "submit":
                    index, rid = msg[1], msg[2]
                    replies[index].send(dumps(("accepted", rid, *self._submit(index, *msg[2:]))))
                elif msg[0] == "cancel":
                    req = self.requests.pop((msg[1], msg[2]), None)
                    if req is not None and self.rt.scheduler is not None:
                        self.rt.scheduler.cancel(req)
                elif msg[0] == "response":
                    self.rt.metrics.requests.inc(status=str(msg[1]))
                elif msg[0] == "metrics":
                    replies[msg[1]].send(dumps(("metrics", msg[2], self.rt.metrics.render())))
        finally:
            inbox.close()
            for sock in replies:
                sock.close()

    def _submit(self, index: int, rid: int, prompts: list[list[int]], params: list, n: int,
                logprobs: int | None) -> tuple:
        scheduler = self.rt.scheduler
        if self.rt.status != "ready" or scheduler is None:
            return 503, self.rt.message or f"the server is {self.rt.status}"
        key = (index, rid)
        req = GenRequest(prompts, params, n, _no_text, self._sink(key), logprobs)
        for seq in req.sequences:  # a finish without the stage's text: the HTTP side decodes the tokens
            seq.decode = lambda ids, tokens=seq.tokens: NO_TEXT if ids is tokens else ""
        self.requests[key] = req
        try:
            scheduler.submit(req)
        except QueueFullError as err:
            self.requests.pop(key, None)
            return 429, str(err)
        except ServiceUnavailableError as err:
            self.requests.pop(key, None)
            return 503, str(err)
        return 200, ""

    def _sink(self, key: tuple[int, int]) -> Callable[[Event], None]:
        put = self.outbox.sink(key[1], key[0])

        def sink(ev: Event) -> None:
            if ev.kind in ("done", "error"):
                self.requests.pop(key, None)
            put(ev)
        return sink
