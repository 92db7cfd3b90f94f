"""Connection-level guards, under uvicorn's HTTP/1.1 protocol (h11), against
clients that hold connections without sending a request:

- a deadline for the request line and headers: a connection that has not sent a
  whole request head within `header_timeout` seconds of opening (or of starting
  the next request on a kept-alive connection) gets a 408 and is closed, so
  slowloris clients cannot hold sockets (uvicorn has no such timeout of its own);
- a bound on open connections: beyond `max_connections`, a connection's request
  is answered 503 (OpenAI-style JSON, `Connection: close`) without reaching the app.

The request body has its own deadline and size limit (middleware.BodyLimits).
"""
from __future__ import annotations

import json
import logging
from typing import Callable, Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import error_body

log = logging.getLogger("baton.server")

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 1024


def _timeout_response(seconds: float) -> bytes:
    body = json.dumps(error_body(f"the request line and headers did not arrive within {seconds:g} s",
                                 "invalid_request_error", None, "request_timeout")).encode()
    head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n")
    return head.encode() + body


async def _over_capacity(scope, receive, send) -> None:
    body = json.dumps(error_body("the server has too many open connections; retry later", "server_error", None,
                                 "too_many_connections")).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), (b"retry-after", b"1")]})
    await send({"type": "http.response.body", "body": body})


def _not_counted(reason: str) -> None:
    pass


class GuardedH11Protocol(H11Protocol):
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    max_connections: Optional[int] = DEFAULT_MAX_CONNECTIONS
    on_reject: Callable[[str], None] = staticmethod(_not_counted)  # metrics: why a connection was answered here

    def connection_made(self, transport) -> None:
        self._header_timer = None
        super().connection_made(transport)
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            log.warning("over %d open connections: answering 503", self.max_connections)
            self.on_reject("too_many_connections")
            self.app = _over_capacity  # this connection's request only
        self._watch_request_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_request_head()

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _watch_request_head(self) -> None:
        """Run the deadline while the client owes a request head (h11's IDLE), stop it once it came."""
        if self.conn.their_state is h11.IDLE:
            if self._header_timer is None and not self.transport.is_closing():
                self._header_timer = self.loop.call_later(self.header_timeout, self._header_deadline)
        else:
            self._cancel_header_timer()

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.on_reject("header_timeout")
            self.transport.write(_timeout_response(self.header_timeout))
            self.transport.close()


def guarded_protocol(header_timeout: float = DEFAULT_HEADER_TIMEOUT,
                     max_connections: Optional[int] = DEFAULT_MAX_CONNECTIONS,
                     on_reject: Callable[[str], None] = _not_counted) -> type:
    """The protocol class to pass as uvicorn's `http`, with these limits;
    `on_reject(reason)` is called for each connection answered 408 or 503 here."""
    if not header_timeout > 0:
        raise ValueError(f"header_timeout must be > 0 seconds; got {header_timeout}")
    if max_connections is not None and max_connections < 1:
        raise ValueError(f"max_connections must be >= 1; got {max_connections}")
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"header_timeout": float(header_timeout), "max_connections": max_connections,
                 "on_reject": staticmethod(on_reject)})
