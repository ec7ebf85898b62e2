"""The uvicorn server of the HTTP process, with the limits of `ServeOptions`."""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from eet_pipe.serving.protocol import protocol_with_header_timeout
from eet_pipe.serving.serve_options import ServeOptions

__all__ = ["check_port_free", "make_server", "shared_port_socket"]


class _Server(uvicorn.Server):
    """uvicorn that leaves SIGINT/SIGTERM alone: the engine process decides when this one stops."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
        yield


def make_server(opts: ServeOptions, app: Any) -> uvicorn.Server:
    """uvicorn for one HTTP process; `max_connections` is shared out over the `api_servers` processes."""
    share = -(-opts.max_connections // opts.api_servers)
    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level=opts.log_level.lower(),
                            timeout_graceful_shutdown=max(opts.drain_timeout, 0.1) + 5.0, lifespan="on",
                            timeout_keep_alive=opts.keep_alive, limit_concurrency=share,
                            http=protocol_with_header_timeout(opts.header_timeout, opts.http_parser),
                            access_log=opts.log_level.lower() == "debug")
    return _Server(config)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def shared_port_socket(opts: ServeOptions) -> socket.socket:
    """A listening socket on `opts.host`:`opts.port` that the other HTTP processes bind too
    (SO_REUSEPORT: the kernel spreads new connections over them)."""
    sock = socket.socket(_family(opts.host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((opts.host, opts.port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def check_port_free(opts: ServeOptions) -> None:
    """Raise ValueError if something already listens on `opts.host`:`opts.port`. SO_REUSEPORT would let the
    HTTP processes join another listener of this user on that port and silently take part of its
    connections; a bind without it fails instead."""
    with socket.socket(_family(opts.host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((opts.host, opts.port))
        except OSError as err:
            raise ValueError(f"port {opts.port} on {opts.host} is in use ({err.strerror}); api_servers="
                             f"{opts.api_servers} would share it with that listener: stop it or pick another port") from None
