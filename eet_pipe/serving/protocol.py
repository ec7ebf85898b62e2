"""uvicorn's HTTP/1.1 protocol with a deadline for request headers (uvicorn has none of its own).

A connection that opens and sends nothing, or sends its request line and headers a byte at a time
(slowloris), is closed `header_timeout` seconds after its first byte (or after it opened). Idle
keep-alive connections between requests are uvicorn's `timeout_keep_alive`; slow bodies are `Guard`'s.

The parser is httptools (C, llhttp) where it is installed, as with uvicorn's own `http="auto"`, else h11
(pure Python): per request and per streamed chunk the HTTP process spends most of its time in the
protocol and the ASGI layers above it, and the server's throughput at hundreds of streaming clients is
bounded by that process (docs/SERVE.md).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from eet_pipe.serving.serve_options import HTTP_PARSERS

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is not installed
    HttpToolsProtocol = None

__all__ = ["protocol_with_header_timeout"]


class _HeaderDeadline:
    """Mixed in before uvicorn's H11Protocol or HttpToolsProtocol (both keep the request's `cycle`, `loop`,
    `transport` and `logger`)."""

    header_timeout = 30.0
    cycle: Any
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    logger: Any

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)  # type: ignore[misc]
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers():
            self._arm()
        super().data_received(data)  # type: ignore[misc]
        if not self._awaiting_headers():
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _awaiting_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expire(self) -> None:
        self._header_timer = None
        if self._awaiting_headers() and not self.transport.is_closing():
            self.logger.info("closing a connection whose request headers took over %g s (header_timeout)",
                             self.header_timeout)
            self.transport.close()


def protocol_with_header_timeout(seconds: float, parser: str = "auto") -> Any:
    """The protocol class to pass as uvicorn's `http=`: `parser` httptools, h11, or auto (httptools if
    installed, else h11). ValueError for an unknown parser or httptools asked for but not installed."""
    if parser not in HTTP_PARSERS:
        raise ValueError(f"http_parser={parser!r} is invalid: must be one of {', '.join(HTTP_PARSERS)}")
    if parser == "httptools" and HttpToolsProtocol is None:
        raise ValueError("http_parser=httptools but httptools is not installed: pip install httptools, "
                         "or use http_parser=h11")
    base = H11Protocol if parser == "h11" or HttpToolsProtocol is None else HttpToolsProtocol
    name = f"{base.__name__.removesuffix('Protocol')}WithHeaderTimeout"
    return type(name, (_HeaderDeadline, base), {"header_timeout": seconds})
