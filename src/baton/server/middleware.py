"""ASGI middleware of the server, outermost first: the access log, the bearer-token
check, and the request body's size limit and deadline."""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Callable, Optional

from fastapi.responses import JSONResponse

from .protocol import error_body

access_log = logging.getLogger("baton.access")

DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20
DEFAULT_BODY_TIMEOUT = 30.0


def _error(status: int, message: str, code: str, type: str = "invalid_request_error",
           headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, None, code), status_code=status, headers=headers)


class BodyLimits:
    """Reads a request's whole body before the app sees it, within `max_bytes`
    (413 at once when Content-Length says more, or as soon as more has arrived)
    and within `timeout` seconds in all (408: a body trickled byte by byte cannot
    hold a request open). The app then reads the buffered body; later receive()
    calls go to the client, so disconnects are still seen."""

    def __init__(self, app, max_bytes: int, timeout: float, on_reject: Callable[[str], None]):
        if max_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1; got {max_bytes}")
        if not timeout > 0:
            raise ValueError(f"body_timeout must be > 0 seconds; got {timeout}")
        self.app, self.max_bytes, self.timeout, self.on_reject = app, max_bytes, timeout, on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(413, scope, receive, send)
        chunks, size = [], 0
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return await self._reject(408, scope, receive, send)
            if message["type"] == "http.disconnect":
                return  # the client left before sending its request: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._reject(413, scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _reject(self, status: int, scope, receive, send):
        if status == 413:
            self.on_reject("request_too_large")
            resp = _error(413, f"the request body exceeds the server's limit of {self.max_bytes} bytes "
                               f"(--max-request-bytes)", "request_too_large", headers={"Connection": "close"})
        else:
            self.on_reject("body_timeout")
            resp = _error(408, f"the request body did not arrive within {self.timeout:g} s (--body-timeout)",
                          "request_timeout", headers={"Connection": "close"})
        await resp(scope, receive, send)


class BearerAuth:
    """`Authorization: Bearer <key>` on every route but /health (load balancers and
    orchestrators probe it without credentials, and it tells only ok or draining).
    /metrics takes its own key where one is given, so a scraper need not hold the
    key that can generate. The scheme is case-insensitive (RFC 7235); a request
    with more than one Authorization header is refused rather than guessed at."""

    OPEN = frozenset({"/health"})

    def __init__(self, app, api_key: Optional[str], metrics_api_key: Optional[str],
                 on_reject: Callable[[str], None]):
        self.app, self.on_reject = app, on_reject
        self.api_key = api_key.encode() if api_key else None
        self.metrics_key = metrics_api_key.encode() if metrics_api_key else self.api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.OPEN:
            key = self.metrics_key if scope["path"] == "/metrics" else self.api_key
            problem = key is not None and self._problem(scope, key)
            if problem:
                self.on_reject("unauthorized")
                resp = _error(401, f"{problem}: send `Authorization: Bearer <key>`", "invalid_api_key",
                              headers={"WWW-Authenticate": "Bearer"})
                return await resp(scope, receive, send)
        await self.app(scope, receive, send)

    @staticmethod
    def _problem(scope, key: bytes) -> Optional[str]:
        values = [v for k, v in scope["headers"] if k == b"authorization"]
        if not values:
            return "missing bearer token"
        if len(values) > 1:
            return f"{len(values)} Authorization headers; send exactly one"
        scheme, _, token = values[0].strip().partition(b" ")
        if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), key):
            return "invalid API key"
        return None


class AccessLog:
    """One line per request once its response has ended (a stream at its last
    event): client, method, path, status, duration, and for generation requests
    the id, prompt and output tokens, finish reason and time to first token, which
    the handlers put in `request.state.access`."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.monotonic()
        info: dict = {}
        scope.setdefault("state", {})["access"] = info
        status = [None]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except BaseException:
            status[0] = status[0] or 500  # answered by the outermost error handler
            raise
        finally:
            if access_log.isEnabledFor(logging.INFO):
                access_log.info("%s", _access_line(scope, status[0], time.monotonic() - t0, info))


def _access_line(scope, status, seconds: float, info: dict) -> str:
    client = scope.get("client")
    parts = [f"{client[0]}:{client[1]}" if client else "-", f'"{scope["method"]} {scope["path"]}"',
             str(status or "-")]
    if "id" in info:
        parts.append(f"id={info['id']}")
        for key in ("prompt_tokens", "output_tokens", "finish_reason"):
            if info.get(key) is not None:
                parts.append(f"{key}={info[key]}")
        if info.get("ttft") is not None:
            parts.append(f"ttft={info['ttft']:.3f}s")
    parts.append(f"duration={seconds:.3f}s")
    return " ".join(parts)
