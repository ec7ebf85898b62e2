"""The messages between the HTTP process and the engine process, over ZeroMQ PUSH/PULL sockets.

Each side binds one PULL socket (``ipc://`` in a private temporary folder) and every thread that sends
connects a PUSH socket of its own (ZeroMQ sockets are not thread-safe). Messages are pickled tuples;
both ends are processes of one server, started together.

With ``api_servers`` > 1 there are several HTTP processes, numbered from 0; each binds its own PULL
socket (`IpcPaths.frontend(index)`) and names itself in what it sends, and the engine sends each one only
the events of its own requests (request ids are per process). Status and stop go to every one.

HTTP process -> engine:
    ("submit", index, rid, prompts, params, n, logprobs)  a request; answered by ("accepted", rid, status, message)
    ("cancel", index, rid)                           its client went away
    ("response", status)                             a POST /v1/* response began with this HTTP status
    ("metrics", index, token)                        answered by ("metrics", token, text)
Engine -> HTTP process:
    ("events", [event, ...])                         every request's events of one step, in one message
    ("status", status, message, info)                loading / ready / stopping / failed (info: max_len, vocab)
    ("stop",)                                        stop accepting connections, exit once responses are sent
    ("accepted", rid, status, message)               200, or 429 / 503 with the reason
    ("metrics", token, text)

An event is (rid, kind, index, token_ids, logprobs, finish_reason, text, status, message). A 'finish'
event's text is the stage's final text of the choice, or None when the stage sent none (the HTTP side
then decodes the tokens itself).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

__all__ = ["IpcPaths", "push_socket", "pull_socket", "dumps", "loads", "NO_TEXT"]

NO_TEXT = "\x00eet_pipe:no-text\x00"
"""What the engine side's decode of a whole output returns: the stage sent no final text."""


@dataclass(frozen=True)
class IpcPaths:
    """The endpoints: `engine` (bound by the engine process) and `frontend(i)` (by HTTP process i)."""

    folder: str

    @property
    def engine(self) -> str:
        return f"ipc://{Path(self.folder) / 'engine'}"

    def frontend(self, index: int = 0) -> str:
        return f"ipc://{Path(self.folder) / f'frontend-{index}'}"


def push_socket(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    """A PUSH socket connected to `endpoint` (connecting before the other side binds is fine)."""
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.SNDHWM, 0)  # never drop or block on a burst: the reader keeps up per step
    sock.connect(endpoint)
    return sock


def pull_socket(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.bind(endpoint)
    return sock


def dumps(message: tuple) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> Any:
    return pickle.loads(data)  # noqa: S301 - both ends are this server's own processes
