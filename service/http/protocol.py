"""uvicorn's HTTP/1.1 protocols with a deadline for a request's headers (a slow client cannot hold a
connection).

uvicorn times out an idle keep-alive connection only after a response, and never a client that opens a
connection and sends its request line and headers a byte at a time. Here every connection, and every
next request on a kept-alive connection, has ``request_header_timeout_s`` to deliver its complete headers;
otherwise it is closed. The body is then subject to the routes' own idle timeout
(``request_idle_timeout_s``, :mod:`.body`).

:func:`protocol_class` takes uvicorn's httptools protocol (llhttp, in C) when ``httptools`` is installed, and
its pure-Python h11 protocol otherwise. Measured with a 133 kB ``POST`` and a small JSON answer on a 2-vCPU
Xeon (server process CPU, 4 clients, 2000 requests, under foreign load): 0.20 ms a request with httptools,
0.32-0.34 with h11.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


class _HeaderDeadline:
    """The deadline's timer, for a protocol class that has ``loop`` and ``transport``."""

    header_timeout_s: float = 10.0
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    _header_deadline: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _expire(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            log.info("closed a connection: no complete request headers within %.3g s", self.header_timeout_s)
            self.transport.close()


class HeaderDeadlineProtocol(_HeaderDeadline, H11Protocol):
    """:class:`H11Protocol` that closes a connection whose request headers are not complete in time."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers were parsed: a new request cycle began
            self._disarm()

    def on_response_complete(self) -> None:
        cycle = self.cycle
        super().on_response_complete()  # may start a pipelined request whose headers are already here
        if self.cycle is cycle and not self.transport.is_closing():
            self._arm()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def _httptools_class() -> type[Any] | None:
    """:class:`HttpToolsProtocol` with the header deadline, or None without ``httptools``."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class HttpToolsHeaderDeadline(_HeaderDeadline, HttpToolsProtocol):
        """:class:`HttpToolsProtocol` that closes a connection whose request headers are not complete in
        time: armed on connecting and after each response unless a request has begun meanwhile (a pipelined
        one), disarmed when a request's headers are complete."""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # may start a pipelined request whose headers are already here
            cycle = self.cycle
            if (cycle is None or cycle.response_complete) and not self.transport.is_closing():
                self._arm()  # the next request on this connection gets its own deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HttpToolsHeaderDeadline


def protocol_class(header_timeout_s: float, *, prefer_httptools: bool = True) -> type[Any]:
    """The protocol class for ``uvicorn.run(http=...)`` with this header deadline: httptools' when it is
    installed (and preferred), else h11's."""
    base = _httptools_class() if prefer_httptools else None
    return type(
        "HeaderDeadlineProtocol", (base or HeaderDeadlineProtocol,), {"header_timeout_s": header_timeout_s}
    )
