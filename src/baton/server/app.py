"""The OpenAI-compatible HTTP server: FastAPI app, uvicorn runner, test helper.

    app = create_app(engine, served_model_name="smollm2", api_key=None, max_waiting=256)
    with ServerThread(app) as srv:          # uvicorn on 127.0.0.1, a free port
        openai.OpenAI(base_url=srv.url + "/v1", api_key="x") ...

Endpoints: GET /health, GET /metrics, GET /v1/models[/{id}], POST /v1/completions,
POST /v1/chat/completions (streaming as SSE, one chunk per token or
detokenized piece, then `data: [DONE]`).

Default max_tokens when the request gives none: min(default_max_tokens (256),
what is left of the context after the prompt).

Guards against hostile or clumsy clients (see connection.py and middleware.py): a
deadline for request heads and for bodies, a body-size limit, a bound on open
connections, and every failure answered with OpenAI's error body and a status the
OpenAPI document lists.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Optional, Union

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InvalidRequest, check_unicode
from ..sampling import SamplingParams
from .async_engine import AsyncEngine, QueueFull, RequestStream, ShuttingDown, StreamEvent
from .connection import DEFAULT_HEADER_TIMEOUT, DEFAULT_MAX_CONNECTIONS, guarded_protocol
from .metrics import ServerMetrics
from .middleware import DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_REQUEST_BYTES, AccessLog, BearerAuth, BodyLimits
from .openapi import GENERATION_RESPONSES, PROMETHEUS_RESPONSES, error_responses, without_validation_422
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
    def __init__(self, engine, served_model_names: list[str], max_waiting: int, default_max_tokens: int,
                 stats_interval: float):
        self.engine = engine
        self.served_model_names = served_model_names
        self.max_waiting = max_waiting
        self.default_max_tokens = default_max_tokens
        self.created = now()
        self.token_text = TokenText(engine.tokenizer)
        self.async_engine: Optional[AsyncEngine] = None
        self.metrics = ServerMetrics(self)
        self.async_engine = AsyncEngine(engine, self.metrics, stats_interval=stats_interval)

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
        if max_tokens is None:
            self.engine.check_length(prompt_len, 1)  # the prompt alone must leave room
            max_tokens = min(self.default_max_tokens, self.engine.max_request_len - prompt_len)
        return SamplingParams(max_tokens=max_tokens, **kw)

    def validate(self, kw: dict, max_tokens: Optional[int], renames: dict, prompt=None,
                 messages: Optional[list[dict]] = None) -> None:
        """Every check that needs no tokenizing, before the request is queued, so an
        invalid request gets its 400 even when the server is full (the prompt's
        length against the context is checked once it is tokenized)."""
        try:
            SamplingParams(max_tokens=1 if max_tokens is None else max_tokens, **kw)
            if max_tokens is not None:
                self.engine.check_length(None, max_tokens)
            if prompt is not None:
                self.engine.validate_prompt(prompt)
            if messages is not None:
                self.engine.check_prompt_chars(sum(len(m["content"]) for m in messages), "messages")
                for m in messages:
                    check_unicode(m["content"], "messages")
        except ValueError as e:
            raise bad_request_from_value_error(e, renames) from None
        except TypeError as e:
            raise APIError(400, str(e), code="invalid_type") from None

    async def submit(self, request_id: str, prepare, renames: dict) -> RequestStream:
        """Queue a request; `renames` maps the engine's field names to the
        request's (a chat prompt is `messages`), so a 400 names the right one."""
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
            raise bad_request_from_value_error(e, renames) from None


def _note_access(request: Request, stream: RequestStream, **fields) -> None:
    """What the access log line says of a generation request (see middleware.AccessLog)."""
    info = getattr(request.state, "access", None)
    if info is None:
        return
    info.update(id=stream.request_id, prompt_tokens=stream.prompt_tokens, **fields)
    if stream.first_token_time is not None:
        info["ttft"] = stream.first_token_time - stream.arrival_time


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


def _stream_response(state: ServerState, request: Request, stream: RequestStream, rid: str,
                     include_usage: bool, build, header: dict) -> _SSEResponse:
    """The SSE body of a streamed completion or chat request: `build(event, text
    delta)` makes the endpoint's chunk for an engine event (or None to send
    nothing), then the usage chunk if asked (stream_options.include_usage), then
    [DONE]. A request that failed gets an error event instead. If the client goes
    away first, the request is aborted and its row freed."""

    async def gen():
        finished = False
        last = None
        try:
            async for ev in stream:
                last = ev
                if ev.error:
                    yield _sse(error_body(ev.error, "server_error", None, "engine_error"))
                    finished = True
                    break
                c = build(ev, ev.new_text)  # the engine holds back any text that could start a stop string
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
            _note_access(request, stream, output_tokens=last.num_tokens if last else 0,
                         finish_reason=(last.finish_reason if finished and last else "abort"))

    return _SSEResponse(gen(), on_close=lambda: state.async_engine.abort(rid))


# ---------------------------------------------------------------- the app

def create_app(engine, served_model_name: Union[str, list[str], None] = None, api_key: Optional[str] = None,
               max_waiting: int = DEFAULT_MAX_WAITING, default_max_tokens: int = DEFAULT_MAX_TOKENS,
               metrics_api_key: Optional[str] = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               body_timeout: float = DEFAULT_BODY_TIMEOUT, stats_interval: float = 10.0) -> FastAPI:
    """An app serving `engine`. Its engine thread starts with the app (lifespan
    startup) and stops on shutdown; one app at a time per engine.

    api_key guards every route but /health; metrics_api_key, if given, guards
    /metrics instead. Request bodies over max_request_bytes get 413, bodies not
    received within body_timeout seconds 408. stats_interval: seconds between the
    engine's stats log lines while busy (0: none)."""
    if max_waiting < 0:
        raise ValueError(f"max_waiting must be >= 0; got {max_waiting}")
    if default_max_tokens < 1:
        raise ValueError(f"default_max_tokens must be >= 1; got {default_max_tokens}")
    names = served_model_name or default_served_model_name(engine.config.model)
    names = [names] if isinstance(names, str) else list(names)
    state = ServerState(engine, names, max_waiting, default_max_tokens, stats_interval)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.async_engine.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.to_thread(state.async_engine.stop)

    app = FastAPI(title="baton", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.baton = state
    without_validation_422(app)

    # Added innermost first: the access log sees every answer, auth runs before any body is read.
    reject = state.metrics.reject
    app.add_middleware(BodyLimits, max_bytes=max_request_bytes, timeout=body_timeout, on_reject=reject)
    if api_key or metrics_api_key:
        app.add_middleware(BearerAuth, api_key=api_key, metrics_api_key=metrics_api_key, on_reject=reject)
    app.add_middleware(AccessLog)

    # ------------------------------------------------------------ errors
    reasons = {400: "invalid_request", 404: "model_not_found", 429: "queue_full", 503: "shutting_down"}

    def _count(status: int, code: Optional[str]) -> None:
        if status in reasons:
            state.metrics.reject(reasons[status])

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
    @app.get("/health", responses={200: {"description": "Serving"},
                                   503: {"description": "Draining or engine not running"}})
    async def health():
        if state.async_engine.alive and not state.async_engine.draining:
            return {"status": "ok"}
        status = "draining" if state.async_engine.draining else "engine not running"
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/metrics", response_class=PlainTextResponse, responses=PROMETHEUS_RESPONSES)
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def _model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": state.created, "owned_by": "baton",
                "root": engine.config.model or name, "max_model_len": engine.max_model_len}

    @app.get("/v1/models", responses=error_responses(401, 503))
    async def models():
        return {"object": "list", "data": [_model_card(n) for n in state.served_model_names]}

    @app.get("/v1/models/{model_id:path}", responses=error_responses(401, 404, 503))
    async def model(model_id: str):
        return _model_card(state.check_model(model_id))

    # ------------------------------------------------------------ completions
    @app.post("/v1/completions", responses=GENERATION_RESPONSES)
    async def completions(req: CompletionRequest, request: Request):
        req.check()
        model_name = state.check_model(req.model)
        prompt = req.single_prompt()
        kw = req.sampling_kwargs()
        renames: dict = {}
        state.validate(kw, req.max_tokens, renames, prompt)

        def prepare():  # validated above; engine.add_request checks the ids and the length
            ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            return ids, state.sampling_params(kw, req.max_tokens, len(ids))

        rid = f"cmpl-{uuid.uuid4().hex}"
        stream = await state.submit(rid, prepare, renames)
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

            return _stream_response(state, request, stream, rid, req.include_usage, build,
                                    {"id": rid, "object": "text_completion", "created": created,
                                     "model": model_name})

        final, entries = await _collect(state, stream, request)
        _note_access(request, stream, output_tokens=final.num_tokens if final else None,
                     finish_reason=final.finish_reason if final else "abort")
        if final is None:
            return Response(status_code=499)  # client closed the connection; nobody reads this
        if final.error:
            raise APIError(500, final.error, type="server_error", code="engine_error")
        body = chunk(final.text, final.finish_reason,
                     completion_logprobs(entries, state.token_text) if want_lp else None)
        body["usage"] = usage(final.prompt_tokens, final.num_tokens)
        return body

    # ------------------------------------------------------------ chat
    @app.post("/v1/chat/completions", responses=GENERATION_RESPONSES)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        req.check()
        model_name = state.check_model(req.model)
        messages = [m.flat() for m in req.messages]
        kw = req.sampling_kwargs()
        max_tokens = req.requested_max_tokens
        renames = {"prompt": "messages"}
        if req.max_completion_tokens is not None:
            renames["max_tokens"] = "max_completion_tokens"
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: use /v1/completions with token ids",
                           param="messages", code="unsupported_value")
        state.validate(kw, max_tokens, renames, messages=messages)
        add_gen = True if req.add_generation_prompt is None else req.add_generation_prompt

        def prepare():
            try:
                ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=add_gen)
            except Exception as e:  # no template, or its own errors (jinja raise_exception on bad role order)
                raise InvalidRequest("messages", f"messages: the chat template failed: {e}") from None
            if not ids:
                raise InvalidRequest("messages", "messages: the chat template produced an empty prompt")
            return ids, state.sampling_params(kw, max_tokens, len(ids))

        rid = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await state.submit(rid, prepare, renames)
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

            return _stream_response(state, request, stream, rid, req.include_usage, build,
                                    {"id": rid, "object": "chat.completion.chunk", "created": created,
                                     "model": model_name})

        final, entries = await _collect(state, stream, request)
        _note_access(request, stream, output_tokens=final.num_tokens if final else None,
                     finish_reason=final.finish_reason if final else "abort")
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

    async def startup(self, sockets=None):
        await super().startup(sockets=sockets)
        if self.started:  # uvicorn announces nothing when it is handed its sockets
            host, port = (sockets[0].getsockname()[:2] if sockets else (self.config.host, self.config.port))
            log.info("serving on http://%s:%d", f"[{host}]" if ":" in host else host, port)

    async def shutdown(self, sockets=None):
        state = getattr(getattr(self.config.app, "state", None), "baton", None)
        if state is not None:
            state.drain()
        await super().shutdown(sockets=sockets)


def server_config(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                  timeout_graceful_shutdown: float = 30.0, header_timeout: float = DEFAULT_HEADER_TIMEOUT,
                  max_connections: Optional[int] = DEFAULT_MAX_CONNECTIONS, **kwargs) -> uvicorn.Config:
    """uvicorn's settings for the app: HTTP/1.1 through the guarded protocol
    (header deadline, connection bound); the app logs its own access lines."""
    state = getattr(getattr(app, "state", None), "baton", None)
    protocol = guarded_protocol(header_timeout, max_connections, *([state.metrics.reject] if state else []))
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                          http=protocol, access_log=False,
                          timeout_graceful_shutdown=timeout_graceful_shutdown, **kwargs)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (0: a free port), made before anything
    slow (loading the model) so a busy port fails at once. OSError if taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


class ServerThread:
    """Runs an app under uvicorn in a background thread on host:port (port 0: a
    free port, bound before the thread starts so there is no race).

        with ServerThread(app) as srv:
            httpx.get(srv.url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", **config):
        self.app = app
        self.sock = bind_socket(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = BatonServer(server_config(app, host=self.host, port=self.port, log_level=log_level,
                                                **config))
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
