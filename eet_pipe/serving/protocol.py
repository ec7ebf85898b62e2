"""uvicorn's h11 protocol with a deadline for request headers (uvicorn has none of its own).

A connection that opens and sends nothing, or sends its request line and headers a byte at a time
(slowloris), is closed `header_timeout` seconds after its first byte (or after it opened). Idle
keep-alive connections between requests are uvicorn's `timeout_keep_alive`; slow bodies are `Guard`'s.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["protocol_with_header_timeout"]


class _HeaderDeadline(H11Protocol):
    header_timeout = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers():
            self._arm()
        super().data_received(data)
        if not self._awaiting_headers():
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

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


def protocol_with_header_timeout(seconds: float) -> Any:
    """The protocol class to pass as uvicorn's `http=`."""
    return type("H11WithHeaderTimeout", (_HeaderDeadline,), {"header_timeout": seconds})
