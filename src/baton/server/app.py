"""The OpenAI-compatible HTTP server: FastAPI app, uvicorn runner, test helper.

    app = create_app(engine, served_model_name="smollm2", api_key=None, max_waiting=256)
    with ServerThread(app) as srv:          # uvicorn on 127.0.0.1, a free port
        openai.OpenAI(base_url=srv.url + "/v1", api_key="x") ...

Endpoints: GET /health, GET /metrics, GET /v1/models[/{id}], POST /v1/completions,
POST /v1/chat/completions (streaming as SSE, one chunk per token or
detokenized piece, then `data: [DONE]`).

Default max_tokens when the request gives none: min(default_max_tokens (256),
what is left of the context after the prompt).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Optional, Union

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..sampling import SamplingParams
from .async_engine import AsyncEngine, QueueFull, RequestStream, ShuttingDown, StreamEvent
from .metrics import ServerMetrics
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, TokenText, bad_request_from_value_error,
                       chat_logprobs, completion_logprobs, error_body, now, usage)

log = logging.getLogger("baton.server")

DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_WAITING = 256


def default_served_model_name(model_path: Optional[str]) -> str:
    if not model_path:
        return "SmolLM2-135M-Instruct"
    p = Path(model_path)
    return p.stem if p.suffix == ".gguf" else p.name


class ServerState:
    def __init__(self, engine, served_model_names: list[str], api_key: Optional[str], max_waiting: int,
                 default_max_tokens: int):
        self.engine = engine
        self.served_model_names = served_model_names
        self.api_key = api_key
        self.max_waiting = max_waiting
        self.default_max_tokens = default_max_tokens
        self.created = now()
        self.token_text = TokenText(engine.tokenizer)
        self.async_engine: Optional[AsyncEngine] = None
        self.metrics = ServerMetrics(self)
        self.async_engine = AsyncEngine(engine, self.metrics)

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def check_model(self, model: Optional[str]) -> str:
        if model is None:
            return self.model_name
        if model not in self.served_model_names:
            raise APIError(404, f"The model `{model}` does not exist. Served: {', '.join(self.served_model_names)}",
                           param="model", code="model_not_found")
        return model

    def drain(self) -> None:
        self.async_engine.drain()

    # -------------------------------------------------------- admission
    def sampling_params(self, kw: dict, max_tokens: Optional[int], prompt_len: int) -> SamplingParams:
        e = self.engine
        limit = min(e.max_model_len, e.policy.max_len_that_fits())
        if max_tokens is None:
            room = limit - prompt_len
            if room < 1:
                raise ValueError(f"prompt ({prompt_len} tokens) leaves no room to generate within the "
                                 f"context length of {limit} tokens")
            max_tokens = min(self.default_max_tokens, room)
        return SamplingParams(max_tokens=max_tokens, **kw)

    def validate_params(self, kw: dict, max_tokens: Optional[int]) -> None:
        """Range checks before queueing (max_tokens vs context is checked once the prompt is tokenized)."""
        try:
            SamplingParams(max_tokens=1 if max_tokens is None else max_tokens, **kw)
        except ValueError as e:
            raise bad_request_from_value_error(e) from None
        except TypeError as e:
            raise APIError(400, str(e), code="invalid_type") from None

    async def submit(self, request_id: str, prepare) -> RequestStream:
        ae = self.async_engine
        if ae._thread is None and not ae.draining:  # app served without lifespan events
            ae.start(asyncio.get_running_loop())
        try:
            return await ae.submit(request_id, prepare, self.max_waiting)
        except ShuttingDown:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down") from None
        except QueueFull:
            raise APIError(429, f"too many requests waiting: {ae.queue_depth()} queued beyond the "
                                f"{self.engine.config.max_num_seqs} running rows (limit {self.max_waiting}); "
                                f"retry later", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except ValueError as e:
            raise bad_request_from_value_error(e, default_param="prompt") from None


# ---------------------------------------------------------------- helpers

def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _collect(state: ServerState, stream: RequestStream, request: Request) -> tuple[Optional[StreamEvent], list]:
    """Wait for the final event of a non-streaming request, aborting it if the
    client disconnects meanwhile. Returns (final event or None, logprob entries)."""
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    entries: list = []
    final = None
    try:
        while True:
            get = asyncio.ensure_future(stream.queue.get())
            done, _ = await asyncio.wait({get, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                state.async_engine.abort(stream.request_id)
                return None, entries
            ev = get.result()
            if ev.new_logprobs:
                entries.extend(ev.new_logprobs)
            if ev.finished or ev.error:
                final = ev
                return final, entries
    finally:
        watcher.cancel()
        if final is None:
            state.async_engine.abort(stream.request_id)


class _TextStreamer:
    """Turns the engine's growing text into deltas, holding back the last
    (longest stop string - 1) characters while the request runs, so a stop
    string split across tokens is never streamed."""

    def __init__(self, stop: Union[str, list, None]):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.sent = 0

    def delta(self, ev: StreamEvent) -> str:
        end = len(ev.text) if ev.finished else max(self.sent, len(ev.text) - self.holdback)
        out = ev.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out


class _SSEResponse(StreamingResponse):
    """Server-sent events whose request is aborted whenever the response ends
    without finishing it: client disconnect (Starlette cancels the body
    iterator, possibly before it even started), send errors, cancellation."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _stream_response(state: ServerState, stream: RequestStream, rid: str, stop, include_usage: bool,
                     build, header: dict) -> _SSEResponse:
    """The SSE body of a streamed completion or chat request: `build(event, text
    delta)` makes the endpoint's chunk for an engine event (or None to send
    nothing), then the usage chunk if asked (stream_options.include_usage), then
    [DONE]. If the client goes away first, the request is aborted and its row freed."""

    async def gen():
        finished = False
        streamer = _TextStreamer(stop)
        try:
            async for ev in stream:
                if ev.error:
                    yield _sse(error_body(ev.error, "server_error", None, "engine_error"))
                    finished = True
                    break
                c = build(ev, streamer.delta(ev))
                if c is not None:
                    if include_usage:
                        c["usage"] = None
                    yield _sse(c)
                if ev.finished:
                    finished = True
                    if include_usage:
                        yield _sse({**header, "choices": [], "usage": usage(ev.prompt_tokens, ev.num_tokens)})
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # client went away (or the task was cancelled): free the row
                state.async_engine.abort(rid)

    return _SSEResponse(gen(), on_close=lambda: state.async_engine.abort(rid))


# ---------------------------------------------------------------- the app

class _AuthMiddleware:
    """Bearer-token check for /v1/* (health and metrics stay open)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state
        self.expected = f"Bearer {state.api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(auth, self.expected):
                self.state.metrics.rejections.labels(reason="unauthorized").inc()
                msg = "missing bearer token" if not auth else "invalid API key"
                resp = JSONResponse(error_body(f"{msg}: send `Authorization: Bearer <key>`",
                                               "invalid_request_error", None, "invalid_api_key"), status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine, served_model_name: Union[str, list[str], None] = None, api_key: Optional[str] = None,
               max_waiting: int = DEFAULT_MAX_WAITING, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> FastAPI:
    """An app serving `engine`. Its engine thread starts with the app (lifespan
    startup) and stops on shutdown; one app at a time per engine."""
    if max_waiting < 0:
        raise ValueError(f"max_waiting must be >= 0; got {max_waiting}")
    if default_max_tokens < 1:
        raise ValueError(f"default_max_tokens must be >= 1; got {default_max_tokens}")
    names = served_model_name or default_served_model_name(engine.config.model)
    names = [names] if isinstance(names, str) else list(names)
    state = ServerState(engine, names, api_key, max_waiting, default_max_tokens)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.async_engine.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.to_thread(state.async_engine.stop)

    app = FastAPI(title="baton", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.baton = state
    if api_key:
        app.add_middleware(_AuthMiddleware, state=state)

    # ------------------------------------------------------------ errors
    reasons = {400: "invalid_request", 404: "model_not_found", 429: "queue_full", 503: "shutting_down"}

    def _count(status: int, code: Optional[str]) -> None:
        if status in reasons:
            state.metrics.rejections.labels(reason=reasons[status]).inc()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        _count(exc.status, exc.code)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "invalid"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            msg, param = f"invalid JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", None
        elif not loc and first.get("type") == "missing":
            msg, param = "a JSON object body is required", None
        else:
            where = ".".join(loc)
            msg = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
            if first.get("type") != "missing" and "input" in first:
                msg += f" (got {json.dumps(first['input'], default=str)[:100]})"
            param = loc[0] if loc else None
        if len(errors) > 1:
            msg += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
        _count(400, "invalid_request")
        return JSONResponse(error_body(msg, "invalid_request_error", param, "invalid_request"), status_code=400)

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, exc: ValueError):
        err = bad_request_from_value_error(exc)
        _count(400, err.code)
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        if exc.status_code == 400:  # e.g. a body that is not UTF-8
            _count(400, code)
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", None, code),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error", None,
                                       "internal_error"), status_code=500)

    # ------------------------------------------------------------ info
    @app.get("/health")
    async def health():
        if state.async_engine.alive and not state.async_engine.draining:
            return {"status": "ok"}
        status = "draining" if state.async_engine.draining else "engine not running"
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def _model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": state.created, "owned_by": "baton",
                "root": engine.config.model or name, "max_model_len": engine.max_model_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(n) for n in state.served_model_names]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        return _model_card(state.check_model(model_id))

    # ------------------------------------------------------------ completions
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        req.check()
        model_name = state.check_model(req.model)
        prompt = req.single_prompt()
        kw = req.sampling_kwargs()
        state.validate_params(kw, req.max_tokens)

        def prepare():
            ids = engine.encode_prompt(prompt)
            return ids, state.sampling_params(kw, req.max_tokens, len(ids))

        rid = f"cmpl-{uuid.uuid4().hex}"
        stream = await state.submit(rid, prepare)
        created = now()
        want_lp = req.logprobs is not None

        def chunk(text, finish_reason, lp=None):
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": finish_reason}]}

        if req.stream:
            offset = 0  # characters streamed so far, for text_offset in logprobs

            def build(ev, delta):
                nonlocal offset
                lp = None
                if want_lp and ev.new_logprobs:
                    lp = completion_logprobs(ev.new_logprobs, state.token_text, offset)
                    offset += sum(len(t) for t in lp["tokens"])
                if delta or lp or ev.finished:
                    return chunk(delta, ev.finish_reason if ev.finished else None, lp)
                return None

            return _stream_response(state, stream, rid, kw.get("stop"), req.include_usage, build,
                                    {"id": rid, "object": "text_completion", "created": created,
                                     "model": model_name})

        final, entries = await _collect(state, stream, request)
        if final is None:
            return Response(status_code=499)  # client closed the connection; nobody reads this
        if final.error:
            raise APIError(500, final.error, type="server_error", code="engine_error")
        body = chunk(final.text, final.finish_reason,
                     completion_logprobs(entries, state.token_text) if want_lp else None)
        body["usage"] = usage(final.prompt_tokens, final.num_tokens)
        return body

    # ------------------------------------------------------------ chat
    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        req.check()
        model_name = state.check_model(req.model)
        messages = [m.flat() for m in req.messages]
        kw = req.sampling_kwargs()
        max_tokens = req.requested_max_tokens
        state.validate_params(kw, max_tokens)
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: use /v1/completions with token ids",
                           param="messages", code="unsupported_value")
        add_gen = True if req.add_generation_prompt is None else req.add_generation_prompt

        def prepare():
            try:
                ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=add_gen)
            except ValueError:
                raise
            except Exception as e:  # template errors (e.g. jinja raise_exception on bad role order)
                raise ValueError(f"messages: the chat template failed: {e}") from None
            if not ids:
                raise ValueError("messages: the chat template produced an empty prompt")
            return ids, state.sampling_params(kw, max_tokens, len(ids))

        rid = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await state.submit(rid, prepare)
        created = now()
        want_lp = bool(req.logprobs)

        def chunk(delta: dict, finish_reason, lp=None):
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}]}

        if req.stream:
            first = True

            def build(ev, delta):
                nonlocal first
                lp = chat_logprobs(ev.new_logprobs, state.token_text) if want_lp and ev.new_logprobs else None
                if not (delta or lp or ev.finished or first):
                    return None
                d = {"content": delta} if delta else {}
                if first:  # the role rides on the first token's chunk: one chunk per token
                    d = {"role": "assistant", "content": delta}
                    first = False
                return chunk(d, ev.finish_reason if ev.finished else None, lp)

            return _stream_response(state, stream, rid, kw.get("stop"), req.include_usage, build,
                                    {"id": rid, "object": "chat.completion.chunk", "created": created,
                                     "model": model_name})

        final, entries = await _collect(state, stream, request)
        if final is None:
            return Response(status_code=499)
        if final.error:
            raise APIError(500, final.error, type="server_error", code="engine_error")
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": final.text},
                             "logprobs": chat_logprobs(entries, state.token_text) if want_lp else None,
                             "finish_reason": final.finish_reason}],
                "usage": usage(final.prompt_tokens, final.num_tokens)}

    return app


# ---------------------------------------------------------------- running it

class BatonServer(uvicorn.Server):
    """uvicorn.Server whose shutdown (SIGINT/SIGTERM, or should_exit) first
    drains the app: new requests get 503, in-flight ones are aborted so their
    streams end with finish_reason "abort"; then uvicorn closes the listener,
    waits for connections, and the app's lifespan stops the engine thread."""

    async def shutdown(self, sockets=None):
        state = getattr(getattr(self.config.app, "state", None), "baton", None)
        if state is not None:
            state.drain()
        await super().shutdown(sockets=sockets)


def server_config(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                  timeout_graceful_shutdown: float = 30.0, **kwargs) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                          timeout_graceful_shutdown=timeout_graceful_shutdown, **kwargs)


class ServerThread:
    """Runs an app under uvicorn in a background thread on host:port (port 0: a
    free port, bound before the thread starts so there is no race).

        with ServerThread(app) as srv:
            httpx.get(srv.url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = BatonServer(server_config(app, host=self.host, port=self.port, log_level=log_level))
        self.thread = threading.Thread(target=self._run, name=f"uvicorn-{self.port}", daemon=True)
        self.exc: Optional[BaseException] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self):
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as e:  # SystemExit on startup failure
            self.exc = e

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"server failed to start: {self.exc!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("server did not start in time")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(5)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
