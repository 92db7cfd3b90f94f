"""OpenAI-compatible request models, response builders and the error schema.

Request bodies are validated strictly (a string where a number belongs is a 400,
not a silent coercion). Fields OpenAI defines that this server does not
implement are rejected with a 400 when set to a value that would change the
result (n > 1, echo, penalties, logit_bias, tools, ...); fields that do not
affect generation (user, metadata, store, ...) are accepted and ignored.
"""
from __future__ import annotations

import time
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict

from ..sampling import SamplingParams


# ---------------------------------------------------------------- errors

class APIError(Exception):
    """An error returned to the client in OpenAI's schema."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorResponse(BaseModel):
    """Every error this server answers, as OpenAI's API shapes it."""
    error: ErrorInfo


def bad_request_from_value_error(e: ValueError, renames: Optional[dict] = None) -> APIError:
    """A 400 for the engine's ValueError; an InvalidRequest names its field, which
    `renames` maps to the request's own spelling (the engine's "prompt" is a chat
    request's "messages")."""
    param, message = getattr(e, "param", None), str(e)
    if renames and param in renames:
        if message.startswith(param):
            message = renames[param] + message[len(param):]
        param = renames[param]
    return APIError(400, message, param=param, code="invalid_value")


# ---------------------------------------------------------------- requests

class _Base(BaseModel):
    # strict: no "1" -> 1 or 1.0 -> 1 coercions; extra: unknown fields are ignored
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Base):
    include_usage: Optional[bool] = None


class _SamplingRequest(_Base):
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: Optional[int] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, Any]] = None
    user: Optional[str] = None
    # extras (vLLM-style)
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    ignore_eos: Optional[bool] = None
    priority: Optional[int] = None
    stop_token_ids: Optional[list[int]] = None
    repetition_penalty: Optional[float] = None

    def _check_unsupported(self) -> None:
        if self.n is not None and self.n != 1:
            raise APIError(400, f"n must be 1: this server returns one choice per request; got {self.n}",
                           param="n", code="unsupported_value")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if v is not None and v != 0:
                raise APIError(400, f"{name} is not supported (must be 0 or absent); got {v}", param=name,
                               code="unsupported_value")
        if self.repetition_penalty is not None and self.repetition_penalty != 1:
            raise APIError(400, f"repetition_penalty is not supported (must be 1 or absent); got "
                                f"{self.repetition_penalty}", param="repetition_penalty", code="unsupported_value")
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias", code="unsupported_value")

    def sampling_kwargs(self) -> dict:
        """SamplingParams fields except max_tokens and logprobs."""
        kw: dict = {}
        kw["temperature"] = 1.0 if self.temperature is None else self.temperature
        kw["top_p"] = 1.0 if self.top_p is None else self.top_p
        if self.top_k is not None:
            kw["top_k"] = self.top_k
        if self.min_p is not None:
            kw["min_p"] = self.min_p
        if self.seed is not None:
            kw["seed"] = self.seed
        if self.stop is not None:
            kw["stop"] = self.stop
        if self.stop_token_ids:
            kw["stop_token_ids"] = list(self.stop_token_ids)
        if self.ignore_eos is not None:
            kw["ignore_eos"] = self.ignore_eos
        if self.priority is not None:
            kw["priority"] = self.priority
        return kw

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    logprobs: Optional[int] = None
    echo: Optional[bool] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    def check(self) -> None:
        self._check_unsupported()
        if self.echo:
            raise APIError(400, "echo is not supported", param="echo", code="unsupported_value")
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix", code="unsupported_value")
        if self.best_of is not None and self.best_of != 1:
            raise APIError(400, f"best_of must be 1; got {self.best_of}", param="best_of", code="unsupported_value")

    def single_prompt(self) -> Union[str, list[int]]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(400, f"batched prompts are not supported: send one prompt per request "
                                    f"(got {len(p)})", param="prompt", code="unsupported_value")
            p = p[0]
        if not p:
            raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
        return p

    def sampling_kwargs(self) -> dict:
        kw = super().sampling_kwargs()
        if self.logprobs is not None:
            kw["logprobs"] = self.logprobs
        return kw


class TextPart(_Base):
    type: str
    text: Optional[str] = None


class ChatMessage(_Base):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None

    def flat(self) -> dict:
        content = self.content
        if isinstance(content, list):
            texts = []
            for i, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"content part of type {part.type!r} is not supported (text only)",
                                   param="messages", code="unsupported_value")
                texts.append(part.text)
            content = "".join(texts)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None
    functions: Optional[list[Any]] = None
    response_format: Optional[dict[str, Any]] = None
    add_generation_prompt: Optional[bool] = None

    def check(self) -> None:
        self._check_unsupported()
        if not self.messages:
            raise APIError(400, "messages must be a non-empty list", param="messages", code="invalid_value")
        if self.tools or self.functions:
            raise APIError(400, "tools and functions are not supported", param="tools", code="unsupported_value")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(400, "response_format other than text is not supported", param="response_format",
                           code="unsupported_value")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs",
                               code="invalid_value")
            if not 0 <= self.top_logprobs <= SamplingParams.MAX_LOGPROBS:
                raise APIError(400, f"top_logprobs must be an integer in [0, {SamplingParams.MAX_LOGPROBS}]; "
                                    f"got {self.top_logprobs}", param="top_logprobs", code="invalid_value")

    @property
    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def sampling_kwargs(self) -> dict:
        kw = super().sampling_kwargs()
        if self.logprobs:
            kw["logprobs"] = self.top_logprobs or 0
        return kw


# ---------------------------------------------------------------- token text

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet (byte -> printable char)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


class TokenText:
    """token id -> (text, utf-8 bytes), for logprobs. Byte-level BPE pieces map
    to their exact bytes; other tokenizers fall back to decoding the token."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self.cache.get(token_id)
        if hit is not None:
            return hit
        if self.tok is None:
            res = (f"token_id:{token_id}", list(f"token_id:{token_id}".encode()))
        else:
            piece = self.tok.id_to_piece(token_id) or ""
            if piece and all(c in _BYTE_DECODER for c in piece):
                raw = bytes(_BYTE_DECODER[c] for c in piece)
            else:
                raw = self.tok.decode([token_id], skip_special_tokens=False).encode("utf-8")
            res = (raw.decode("utf-8", errors="replace"), list(raw))
        self.cache[token_id] = res
        return res


def completion_logprobs(entries: list, token_text: TokenText, offset: int = 0) -> dict:
    """OpenAI legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, lps, tops, offsets = [], [], [], []
    for token_id, lp, top in entries:
        text = token_text(token_id)[0]
        tokens.append(text)
        lps.append(lp)
        tops.append({token_text(t)[0]: v for t, v in (top or [])} if top is not None else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries: list, token_text: TokenText) -> dict:
    content = []
    for token_id, lp, top in entries:
        text, raw = token_text(token_id)
        tops = []
        for t, v in top or []:
            ttext, traw = token_text(t)
            tops.append({"token": ttext, "logprob": v, "bytes": traw})
        content.append({"token": text, "logprob": lp, "bytes": raw, "top_logprobs": tops})
    return {"content": content, "refusal": None}


# ---------------------------------------------------------------- responses

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def now() -> int:
    return int(time.time())
