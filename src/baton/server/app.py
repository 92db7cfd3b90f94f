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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import check_unicode
from .. import __version__
from ..sampling import SamplingParams
from ..structured import StructuredOutput
from .async_engine import AsyncEngine, QueueFull, RequestStream, ShuttingDown
from .connection import DEFAULT_HEADER_TIMEOUT, DEFAULT_MAX_CONNECTIONS, guarded_protocol
from .metrics import ServerMetrics
from .middleware import DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_REQUEST_BYTES, AccessLog, BearerAuth, BodyLimits
from .openapi import GENERATION_RESPONSES, PROMETHEUS_RESPONSES, error_responses, without_validation_422
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                       TokenText, bad_request_from_value_error, chat_logprobs, completion_logprobs, error_body,
                       invalid, now, prompt_logprobs_entries, usage)
from .tools import (ToolCallStreamer, ToolError, load_chat_template, messages_for_template, parse_tool_calls,
                    template_takes_tool_calls, template_takes_tools, tool_call_grammar, validate_tools)

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
                 stats_interval: float, chat_template: Optional[str] = None, compute_thread=None):
        self.engine = engine
        self.chat_template = chat_template  # the server's --chat-template (text), over the model's
        self.served_model_names = served_model_names
        self.max_waiting = max_waiting
        self.default_max_tokens = default_max_tokens
        self.created = now()
        self.token_text = TokenText(engine.tokenizer)
        self.async_engine: Optional[AsyncEngine] = None
        self.metrics = ServerMetrics(self)
        self.async_engine = AsyncEngine(engine, self.metrics, stats_interval=stats_interval,
                                        compute_thread=compute_thread)

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

    async def submit_many(self, jobs: list, renames: dict) -> list[RequestStream]:
        """Queue the requests of one call (a batched prompt: one each), all or none."""
        streams: list[RequestStream] = []
        try:
            for request_id, prepare in jobs:
                streams.append(await self.submit(request_id, prepare, renames))
        except BaseException:
            _abort_all(self, streams)
            raise
        return streams

    async def submit(self, request_id: str, prepare, renames: dict) -> RequestStream:
        """Queue a request; `renames` maps the engine's field names to the
        request's (a chat prompt is `messages`), so a 400 names the right one."""
        ae = self.async_engine
        if not ae.started and not ae.draining:  # app served without lifespan events
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


@dataclass
class ChoiceResult:
    """One choice of a finished request, gathered from its events."""
    text: str = ""
    num_tokens: int = 0
    finish_reason: Optional[str] = None
    entries: list = field(default_factory=list)  # logprob entries


@dataclass
class Result:
    choices: dict  # index -> ChoiceResult
    prompt_tokens: int
    prompt_logprobs: Optional[list]
    error: Optional[str]
    cached_tokens: int = 0

    @property
    def completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.choices.values())


async def _merge(streams: list[RequestStream]):
    """The events of several requests as they come: (which request, event)."""
    if len(streams) == 1:
        async for ev in streams[0]:
            yield 0, ev
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        async for ev in stream:
            await queue.put((i, ev))
        await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, ev = await queue.get()
            if ev is None:
                left -= 1
                continue
            yield i, ev
    finally:
        for t in tasks:
            t.cancel()


def _abort_all(state: "ServerState", streams: list[RequestStream]) -> None:
    for s in streams:
        state.async_engine.abort(s.request_id)


async def _collect(state: "ServerState", streams: list[RequestStream], request: Request) -> Optional[list[Result]]:
    """Wait for every request of a non-streaming call to finish, aborting them all
    if the client disconnects meanwhile (None then)."""
    results = [Result({}, s.prompt_tokens, None, None) for s in streams]

    async def gather():
        async for i, ev in _merge(streams):
            r = results[i]
            r.prompt_tokens, r.cached_tokens = ev.prompt_tokens, ev.cached_tokens
            if ev.prompt_logprobs is not None:
                r.prompt_logprobs = ev.prompt_logprobs
            for c in ev.choices:
                cr = r.choices.setdefault(c.index, ChoiceResult())
                cr.text, cr.num_tokens = c.text, c.num_tokens
                cr.finish_reason = c.finish_reason or cr.finish_reason
                if c.new_logprobs:
                    cr.entries.extend(c.new_logprobs)
            if ev.error:
                r.error = ev.error
                return

    watcher = asyncio.ensure_future(_wait_disconnect(request))
    work = asyncio.ensure_future(gather())
    done = False
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            work.result()
            done = True
            return results
        return None
    finally:
        watcher.cancel()
        if not done:
            work.cancel()
            _abort_all(state, streams)
        elif any(r.error for r in results):
            _abort_all(state, streams)  # one prompt failed: the call fails, free the others


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


def _stream_response(state: "ServerState", request: Request, streams: list[RequestStream], req, build,
                     header: dict) -> _SSEResponse:
    """The SSE body of a streamed completion or chat call: `build(prompt index,
    choice event)` makes the chunks for one choice's step, then the usage chunk if
    asked (stream_options.include_usage), then [DONE]. A request that failed gets
    an error event instead. If the client goes away first, every request of the
    call is aborted and its rows freed."""
    include_usage, continuous = req.include_usage, req.continuous_usage

    async def gen():
        finished = False
        tokens = [dict() for _ in streams]  # per request: choice index -> tokens so far
        prompts = [0] * len(streams)
        cached = [0] * len(streams)

        def usage_now():
            return usage(sum(prompts), sum(sum(t.values()) for t in tokens), sum(cached))

        try:
            async for i, ev in _merge(streams):
                prompts[i], cached[i] = ev.prompt_tokens, ev.cached_tokens
                if ev.error:
                    yield _sse(error_body(ev.error, "server_error", None, "engine_error"))
                    finished = True
                    break
                for c in ev.choices:
                    tokens[i][c.index] = c.num_tokens
                    for chunk in build(i, c, ev):  # the engine holds back text that could start a stop string
                        if include_usage:
                            chunk["usage"] = usage_now() if continuous else None
                        yield _sse(chunk)
            else:
                finished = True
                if include_usage:
                    yield _sse({**header, "choices": [], "usage": usage_now()})
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # client went away (or the task was cancelled): free the rows
                _abort_all(state, streams)
            _note_access(request, streams[0], output_tokens=sum(sum(t.values()) for t in tokens),
                         finish_reason="stop" if finished else "abort")

    return _SSEResponse(gen(), on_close=lambda: _abort_all(state, streams))


# ---------------------------------------------------------------- the app

def create_app(engine, served_model_name: Union[str, list[str], None] = None, api_key: Optional[str] = None,
               max_waiting: int = DEFAULT_MAX_WAITING, default_max_tokens: int = DEFAULT_MAX_TOKENS,
               metrics_api_key: Optional[str] = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               body_timeout: float = DEFAULT_BODY_TIMEOUT, stats_interval: float = 10.0,
               chat_template: Optional[str] = None, allowed_origins: Optional[list[str]] = None,
               compute_thread=None) -> FastAPI:
    """An app serving `engine`. Its engine thread starts with the app (lifespan
    startup) and stops on shutdown; one app at a time per engine.

    api_key guards every route but /health; metrics_api_key, if given, guards
    /metrics instead. Request bodies over max_request_bytes get 413, bodies not
    received within body_timeout seconds 408. stats_interval: seconds between the
    engine's stats log lines while busy (0: none). chat_template: a template (a
    built-in name, a file or jinja text) used instead of the model's. allowed_origins:
    browser origins allowed by CORS (none by default; ["*"] for any). compute_thread:
    the ComputeThread that loaded the engine's model, to step the engine on (see
    platform/compute_thread.py; default: a thread of its own)."""
    if max_waiting < 0:
        raise ValueError(f"max_waiting must be >= 0; got {max_waiting}")
    if default_max_tokens < 1:
        raise ValueError(f"default_max_tokens must be >= 1; got {default_max_tokens}")
    names = served_model_name or default_served_model_name(engine.config.model)
    names = [names] if isinstance(names, str) else list(names)
    template = load_chat_template(chat_template) if chat_template else None
    state = ServerState(engine, names, max_waiting, default_max_tokens, stats_interval, template, compute_thread)

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
    if allowed_origins:  # outermost: a browser's preflight is answered before auth asks for a key
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], allow_credentials="*" not in allowed_origins)

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
        unknown = [e for e in errors if e.get("type") == "extra_forbidden"]
        first = (unknown or errors or [{"loc": (), "msg": "invalid request", "type": "invalid"}])[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if unknown:
            where = ".".join(loc)
            msg, param = f"unknown field `{where}`: this server does not support it", loc[0] if loc else None
        elif first.get("type") == "json_invalid":
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
        prompts = req.prompts()
        kw = req.sampling_kwargs()
        spec = req.structured()
        if spec is not None:
            kw["structured"] = spec
        renames: dict = {}
        for i, prompt in enumerate(prompts):
            state.validate(kw, req.max_tokens, renames, prompt)
        n = kw.get("n", 1)

        def job(prompt):
            def prepare():  # validated above; engine.add_request checks the ids, the length, the grammar
                ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
                return ids, state.sampling_params(kw, req.max_tokens, len(ids))
            return f"cmpl-{uuid.uuid4().hex}", prepare

        streams = await state.submit_many([job(p) for p in prompts], renames)
        rid = streams[0].request_id
        created = now()
        want_lp = req.logprobs is not None
        echo_text = [(p if isinstance(p, str) else engine.tokenizer.decode(p)) if req.echo else "" for p in prompts]

        def choice(i, index, text, finish_reason, lp=None):
            return {"index": i * n + index, "text": text, "logprobs": lp, "finish_reason": finish_reason}

        def chunk(choices):
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": choices}

        if req.stream:
            offsets: dict = {}   # characters streamed so far per choice, for text_offset in logprobs
            started: set = set()

            def build(i, c, ev):
                key = (i, c.index)
                text, lp = c.new_text, None
                if key not in started:
                    started.add(key)
                    text = echo_text[i] + text
                    offsets[key] = len(echo_text[i])
                if want_lp and c.new_logprobs:
                    lp = completion_logprobs(c.new_logprobs, state.token_text, offsets[key])
                    offsets[key] += sum(len(t) for t in lp["tokens"])
                if not (text or lp or c.finished):
                    return []
                ch = choice(i, c.index, text, c.finish_reason if c.finished else None, lp)
                if ev.prompt_logprobs is not None and c.finished:
                    ch["prompt_logprobs"] = prompt_logprobs_entries(ev.prompt_logprobs, state.token_text)
                return [chunk([ch])]

            return _stream_response(state, request, streams, req, build,
                                    {"id": rid, "object": "text_completion", "created": created,
                                     "model": model_name})

        results = await _collect(state, streams, request)
        if results is None:
            return Response(status_code=499)  # client closed the connection; nobody reads this
        _note_access(request, streams[0], output_tokens=sum(r.completion_tokens for r in results),
                     finish_reason=results[0].choices.get(0, ChoiceResult()).finish_reason)
        for r in results:
            if r.error:
                raise APIError(500, r.error, type="server_error", code="engine_error")
        choices = []
        for i, r in enumerate(results):
            echo_lp = None
            if want_lp and req.echo and r.prompt_logprobs is not None:
                echo_lp = [(e[0], e[1], e[2]) if e is not None else None for e in r.prompt_logprobs]
            for index in sorted(r.choices):
                c = r.choices[index]
                lp = None
                if want_lp:
                    entries = c.entries
                    if echo_lp is not None:
                        entries = [(streams[i].first_prompt_token, None, None)] + echo_lp[1:] + entries
                    lp = completion_logprobs(entries, state.token_text)
                ch = choice(i, index, echo_text[i] + c.text, c.finish_reason, lp)
                if r.prompt_logprobs is not None:
                    ch["prompt_logprobs"] = prompt_logprobs_entries(r.prompt_logprobs, state.token_text)
                choices.append(ch)
        body = chunk(choices)
        body["usage"] = usage(sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results),
                              sum(r.cached_tokens for r in results))
        return body

    # ------------------------------------------------------------ chat
    def chat_template_for(req) -> Optional[str]:
        if req.chat_template:
            try:
                return load_chat_template(req.chat_template)
            except ValueError as e:
                raise invalid("chat_template", f"chat_template: {e}") from None
        return state.chat_template or (engine.tokenizer.chat_template if engine.tokenizer else None)

    def render_messages(req, messages: list[dict], plan) -> str:
        """The prompt text of a chat request (or a /tokenize one), rendered by the
        template; a template that cannot take what the request holds is a 400."""
        if engine.tokenizer is None:
            raise invalid("messages", "this model has no tokenizer: use /v1/completions with token ids",
                          "unsupported_value")
        template = chat_template_for(req)
        if not template:
            raise invalid("messages", "this model has no chat template: use /v1/completions, or start the "
                                      "server with --chat-template", "unsupported_value")
        tools = plan.tools if plan is not None else None
        if tools and not template_takes_tools(template):
            raise invalid("tools", "this model's chat template does not take tools: start the server with "
                                   "--chat-template chatml-tools (a ChatML template with Hermes-style "
                                   "<tool_call> blocks) or a template of your own, or send chat_template",
                          "unsupported_value")
        if any(m.get("tool_calls") or m["role"] == "tool" for m in messages) and \
                not template_takes_tool_calls(template):
            raise invalid("messages", "messages hold tool calls or tool results, which this model's chat "
                                      "template cannot render: use a template that takes tools (e.g. "
                                      "--chat-template chatml-tools)", "unsupported_value")
        try:
            return engine.tokenizer.render_chat(
                messages_for_template(messages), req.add_gen, tools=tools, chat_template=template,
                continue_final_message=bool(req.continue_final_message), template_kwargs=req.chat_template_kwargs)
        except ToolError as e:
            raise invalid(e.param, e.message) from None
        except Exception as e:  # the template's own errors (jinja raise_exception on bad role order)
            raise invalid("messages", f"messages: the chat template failed: {type(e).__name__}: {e}") from None

    def tool_plan(req):
        try:
            return validate_tools(req.tools, req.tool_choice, req.parallel_tool_calls, req.functions,
                                  req.function_call)
        except ToolError as e:
            raise invalid(e.param, e.message) from None

    @app.post("/v1/chat/completions", responses=GENERATION_RESPONSES)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        req.check()
        model_name = state.check_model(req.model)
        messages = [m.flat() for m in req.messages]
        plan = tool_plan(req)
        kw = req.sampling_kwargs()
        spec = req.structured()
        grammar = tool_call_grammar(plan)
        if grammar is not None:
            if spec is not None:
                raise invalid(spec.param, f"{spec.param} cannot be combined with tool_choice {req.tool_choice!r}: "
                                          f"the tool call is the output")
            spec = StructuredOutput("lark", grammar, "tool_choice")
        if spec is not None:
            kw["structured"] = spec
        max_tokens = req.requested_max_tokens
        renames = {"prompt": "messages"}
        if req.max_completion_tokens is not None:
            renames["max_tokens"] = "max_completion_tokens"
        state.validate(kw, max_tokens, renames, messages=messages)
        text = await asyncio.to_thread(render_messages, req, messages, plan)  # jinja can be slow on long chats
        if not text:
            raise invalid("messages", "messages: the chat template produced an empty prompt")

        def prepare():
            ids = engine.tokenizer.hf.encode(text, add_special_tokens=False)
            return ids, state.sampling_params(kw, max_tokens, len(ids))

        rid = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await state.submit_many([(rid, prepare)], renames)
        created = now()
        want_lp = bool(req.logprobs)
        parse_tools = plan is not None and plan.mode != "none"

        def chunk(choices):
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": choices}

        if req.stream:
            streamers: dict = {}
            started: set = set()

            def build(_, c, ev):
                out = []
                lp = chat_logprobs(c.new_logprobs, state.token_text) if want_lp and c.new_logprobs else None
                if parse_tools:
                    st = streamers.setdefault(c.index, ToolCallStreamer(plan))
                    deltas = st.feed(c.new_text) if c.new_text else []
                    if c.finished:
                        deltas += st.finish()
                else:
                    deltas = [{"content": c.new_text}] if c.new_text else []
                if c.index not in started:  # the role rides on the first chunk
                    started.add(c.index)
                    first = deltas[0] if deltas else {}
                    deltas[:1] = [{"role": "assistant", **({"content": ""} if not first else {}), **first}]
                for j, d in enumerate(deltas):
                    out.append(chunk([{"index": c.index, "delta": d, "logprobs": lp if j == len(deltas) - 1 else None,
                                       "finish_reason": None}]))
                if lp is not None and not deltas:
                    out.append(chunk([{"index": c.index, "delta": {}, "logprobs": lp, "finish_reason": None}]))
                if c.finished:
                    reason = c.finish_reason
                    if parse_tools and streamers[c.index].saw_tool_calls and reason == "stop":
                        reason = "tool_calls"
                    last = {"index": c.index, "delta": {}, "logprobs": None, "finish_reason": reason}
                    if out and out[-1]["choices"][0]["finish_reason"] is None and not \
                            out[-1]["choices"][0]["delta"].get("tool_calls"):
                        out[-1]["choices"][0]["finish_reason"] = reason  # one chunk per token where it can
                    else:
                        out.append(chunk([last]))
                    if ev.prompt_logprobs is not None:
                        out[-1]["prompt_logprobs"] = prompt_logprobs_entries(ev.prompt_logprobs, state.token_text)
                return out

            return _stream_response(state, request, streams, req, build,
                                    {"id": rid, "object": "chat.completion.chunk", "created": created,
                                     "model": model_name})

        results = await _collect(state, streams, request)
        if results is None:
            return Response(status_code=499)
        r = results[0]
        _note_access(request, streams[0], output_tokens=r.completion_tokens,
                     finish_reason=r.choices.get(0, ChoiceResult()).finish_reason)
        if r.error:
            raise APIError(500, r.error, type="server_error", code="engine_error")
        choices = []
        for index in sorted(r.choices):
            c = r.choices[index]
            message: dict = {"role": "assistant", "content": c.text}
            reason = c.finish_reason
            if parse_tools:
                content, calls = parse_tool_calls(c.text, plan)
                if calls:
                    message = {"role": "assistant", "content": content, "tool_calls": calls}
                    if reason == "stop":
                        reason = "tool_calls"
            choices.append({"index": index, "message": message,
                            "logprobs": chat_logprobs(c.entries, state.token_text) if want_lp else None,
                            "finish_reason": reason})
        body = {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": choices, "usage": usage(r.prompt_tokens, r.completion_tokens, r.cached_tokens)}
        if r.prompt_logprobs is not None:
            body["prompt_logprobs"] = prompt_logprobs_entries(r.prompt_logprobs, state.token_text)
        return body

    # ------------------------------------------------------------ tokens
    def tokens_request(req, param: str) -> None:
        state.check_model(req.model)
        if engine.tokenizer is None:
            raise invalid(param, "this model has no tokenizer", "unsupported_value")

    @app.post("/tokenize", responses=error_responses(400, 401, 404, 503))
    async def tokenize(req: TokenizeRequest):
        tokens_request(req, "prompt")
        if (req.prompt is None) == (req.messages is None):
            raise invalid("prompt", "give exactly one of prompt and messages")
        if req.prompt is not None:
            check_unicode(req.prompt, "prompt")
            engine.check_prompt_chars(len(req.prompt))
            add = True if req.add_special_tokens is None else req.add_special_tokens
            ids = await asyncio.to_thread(engine.tokenizer.hf.encode, req.prompt, add_special_tokens=add)
        else:
            messages = [m.flat() for m in req.messages]
            try:
                plan = validate_tools(req.tools, None, None) if req.tools else None
            except ToolError as e:
                raise invalid(e.param, e.message) from None
            text = await asyncio.to_thread(render_messages, req, messages, plan)
            add = False if req.add_special_tokens is None else req.add_special_tokens
            ids = await asyncio.to_thread(engine.tokenizer.hf.encode, text, add_special_tokens=add)
        body = {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}
        body["token_strs"] = [engine.tokenizer.id_to_piece(t) for t in ids] if req.return_token_strs else None
        return body

    @app.post("/detokenize", responses=error_responses(400, 401, 404, 503))
    async def detokenize(req: DetokenizeRequest):
        tokens_request(req, "tokens")
        vocab = engine.cfg.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise invalid("tokens", f"tokens must be integers in [0, {vocab}); got {bad[0]}")
        return {"prompt": engine.tokenizer.decode(req.tokens)}

    @app.get("/version")
    async def version():
        return {"version": __version__}

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
