"""OpenAI-compatible request models, response builders and the error schema.

Request bodies are validated strictly: a string where a number belongs is a 400,
not a silent coercion, and a field this server does not know is a 400 naming it.
Every known field is implemented, or one of NOOP_FIELDS (accepted; they cannot
change the output), or refused with a 400 when set to a value that would change
the result (suffix, best_of > 1, ...).
"""
from __future__ import annotations

import json
import time
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict

from ..sampling import SamplingParams
from ..structured import StructuredOutput

# Accepted and ignored: none of them can change what is generated.
NOOP_FIELDS = ("user", "store", "metadata", "service_tier", "safety_identifier", "prompt_cache_key")


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


def invalid(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# ---------------------------------------------------------------- requests

class _Base(BaseModel):
    # strict: no "1" -> 1 or 1.0 -> 1 coercions; forbid: an unknown field is a 400
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Base):
    include_usage: Optional[bool] = None
    continuous_usage_stats: Optional[bool] = None


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
    logit_bias: Optional[dict[str, Union[int, float]]] = None
    # no-ops (NOOP_FIELDS)
    user: Optional[str] = None
    store: Optional[bool] = None
    metadata: Optional[dict[str, Any]] = None
    service_tier: Optional[str] = None
    safety_identifier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    # vLLM's extras
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    ignore_eos: Optional[bool] = None
    priority: Optional[int] = None
    stop_token_ids: Optional[list[int]] = None
    repetition_penalty: Optional[float] = None
    min_tokens: Optional[int] = None
    include_stop_str_in_output: Optional[bool] = None
    bad_words: Optional[list[str]] = None
    prompt_logprobs: Optional[int] = None
    # structured output: OpenAI's, vLLM's (current and older) and llama.cpp's spellings
    response_format: Optional[dict[str, Any]] = None
    structured_outputs: Optional[dict[str, Any]] = None
    guided_json: Union[dict[str, Any], str, None] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[Any]] = None
    guided_grammar: Optional[str] = None
    json_schema: Optional[dict[str, Any]] = None
    grammar: Optional[str] = None

    def sampling_kwargs(self) -> dict:
        """SamplingParams fields except max_tokens, logprobs and structured."""
        kw: dict = {}
        kw["temperature"] = 1.0 if self.temperature is None else self.temperature
        kw["top_p"] = 1.0 if self.top_p is None else self.top_p
        for name in ("top_k", "min_p", "seed", "stop", "ignore_eos", "priority", "n", "presence_penalty",
                     "frequency_penalty", "repetition_penalty", "min_tokens", "include_stop_str_in_output",
                     "bad_words", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None:
                kw[name] = v
        if self.stop_token_ids:
            kw["stop_token_ids"] = list(self.stop_token_ids)
        if self.logit_bias:
            bias = {}
            for k, v in self.logit_bias.items():
                try:
                    tid = int(k)
                except ValueError:
                    raise invalid("logit_bias", f"logit_bias keys must be token ids (integers as strings); "
                                                f"got {k!r}") from None
                bias[tid] = float(v)
            kw["logit_bias"] = bias
        return kw

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options", "stream_options is only allowed with stream: true")

    def structured(self) -> Optional[StructuredOutput]:
        """The request's output constraint, from whichever spelling it used (only one)."""
        specs = []
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type")
            if kind == "json_object":
                specs.append(StructuredOutput("json", None, "response_format"))
            elif kind == "json_schema":
                js = rf.get("json_schema")
                schema = js.get("schema") if isinstance(js, dict) else None
                if not isinstance(schema, dict):
                    raise invalid("response_format", "response_format.json_schema.schema must be a JSON Schema "
                                                     "object")
                specs.append(StructuredOutput("json", schema, "response_format"))
            elif kind != "text":
                raise invalid("response_format", f"response_format.type must be text, json_object or json_schema; "
                                                 f"got {kind!r}")
        so = self.structured_outputs
        if so is not None:
            keys = [k for k in ("json", "regex", "choice", "grammar", "json_object") if so.get(k) not in (None, False)]
            unknown = sorted(set(so) - {"json", "regex", "choice", "grammar", "json_object"})
            if unknown:
                raise invalid("structured_outputs", f"structured_outputs: unsupported key(s) {', '.join(unknown)} "
                                                    f"(supported: json, regex, choice, grammar, json_object)")
            if len(keys) != 1:
                raise invalid("structured_outputs", "structured_outputs must set exactly one of json, regex, "
                                                    "choice, grammar, json_object")
            k = keys[0]
            v = so[k]
            if k == "json_object":
                specs.append(StructuredOutput("json", None, "structured_outputs"))
            elif k == "json":
                specs.append(StructuredOutput("json", _schema(v, "structured_outputs.json"), "structured_outputs"))
            else:
                specs.append(StructuredOutput(k, v, "structured_outputs"))
        if self.guided_json is not None:
            specs.append(StructuredOutput("json", _schema(self.guided_json, "guided_json"), "guided_json"))
        for name, kind in (("guided_regex", "regex"), ("guided_choice", "choice"), ("guided_grammar", "grammar"),
                           ("grammar", "grammar")):
            v = getattr(self, name)
            if v is not None:
                specs.append(StructuredOutput(kind, v, name))
        if self.json_schema is not None:
            specs.append(StructuredOutput("json", self.json_schema, "json_schema"))
        if len(specs) > 1:
            raise invalid(specs[1].param, f"only one output constraint per request; got {specs[0].param} and "
                                          f"{specs[1].param}")
        return specs[0] if specs else None


def _schema(value, param: str) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise invalid(param.split(".")[0], f"{param}: not valid JSON: {e}") from None
    if not isinstance(value, (dict, bool)):
        raise invalid(param.split(".")[0], f"{param} must be a JSON Schema object")
    return value


class CompletionRequest(_SamplingRequest):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    logprobs: Optional[int] = None
    echo: Optional[bool] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    def check(self) -> None:
        self.check_stream_options()
        if self.suffix:
            raise invalid("suffix", "suffix is not supported (no fill-in-the-middle)", "unsupported_value")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise invalid("best_of", f"best_of must equal n ({self.n or 1}): best-of ranking is not supported; "
                                     f"got {self.best_of}", "unsupported_value")

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompt(s): a string, token ids, or a list of either."""
        p = self.prompt
        prompts = list(p) if isinstance(p, list) and p and isinstance(p[0], (str, list)) else [p]
        if not prompts or any(not q for q in prompts):
            raise invalid("prompt", "prompt must not be empty")
        return prompts

    def sampling_kwargs(self) -> dict:
        kw = super().sampling_kwargs()
        if self.logprobs is not None:
            kw["logprobs"] = self.logprobs
            if self.echo:  # the prompt's tokens get logprobs too
                kw.setdefault("prompt_logprobs", self.logprobs)
        return kw


class TextPart(_Base):
    type: str
    text: Optional[str] = None


class FunctionCall(_Base):
    name: str
    arguments: str


class ToolCall(_Base):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Base):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None
    refusal: Optional[str] = None

    def flat(self) -> dict:
        content = self.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise invalid("messages", f"content part of type {part.type!r} is not supported (text only)",
                                  "unsupported_value")
                texts.append(part.text)
            content = "".join(texts)
        role = "system" if self.role == "developer" else self.role
        msg: dict = {"role": role, "content": content or ""}
        if self.name is not None:
            msg["name"] = self.name
        if self.tool_calls:
            if self.role != "assistant":
                raise invalid("messages", "tool_calls is only allowed on assistant messages")
            msg["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        if self.role == "tool" and self.tool_call_id is None:
            raise invalid("messages", "a tool message needs tool_call_id")
        return msg


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[list[Any]] = None
    function_call: Union[str, dict[str, Any], None] = None
    add_generation_prompt: Optional[bool] = None
    continue_final_message: Optional[bool] = None
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None

    def check(self) -> None:
        self.check_stream_options()
        if not self.messages:
            raise invalid("messages", "messages must be a non-empty list")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise invalid("top_logprobs", "top_logprobs requires logprobs to be true")
            if not 0 <= self.top_logprobs <= SamplingParams.MAX_LOGPROBS:
                raise invalid("top_logprobs", f"top_logprobs must be an integer in [0, {SamplingParams.MAX_LOGPROBS}]"
                                              f"; got {self.top_logprobs}")
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise invalid("continue_final_message", "continue_final_message and add_generation_prompt cannot "
                                                        "both be true (set add_generation_prompt: false)")
            if self.messages[-1].role != "assistant":
                raise invalid("continue_final_message", "continue_final_message needs the last message to be the "
                                                        "assistant's")
        reserved = {"messages", "tools", "documents", "add_generation_prompt", "continue_final_message",
                    "chat_template", "tokenize", "return_dict"}
        clash = sorted(reserved & set(self.chat_template_kwargs or {}))
        if clash:
            raise invalid("chat_template_kwargs", f"chat_template_kwargs may not set {', '.join(clash)} (use the "
                                                  f"request fields)")

    @property
    def add_gen(self) -> bool:
        if self.add_generation_prompt is not None:
            return self.add_generation_prompt
        return not self.continue_final_message

    @property
    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def sampling_kwargs(self) -> dict:
        kw = super().sampling_kwargs()
        if self.logprobs:
            kw["logprobs"] = self.top_logprobs or 0
        return kw


class TokenizeRequest(_Base):
    """vLLM's /tokenize: a prompt, or chat messages rendered by the chat template."""
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: Optional[bool] = None
    add_generation_prompt: Optional[bool] = None
    continue_final_message: Optional[bool] = None
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    return_token_strs: Optional[bool] = None

    add_gen = ChatCompletionRequest.add_gen


class DetokenizeRequest(_Base):
    model: Optional[str] = None
    tokens: list[int]


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

def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; cached_tokens: prompt tokens served from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def prompt_logprobs_entries(entries: Optional[list], token_text: "TokenText") -> Optional[list]:
    """vLLM's prompt_logprobs: per prompt token None (the first) or {token id: {logprob,
    rank?, decoded_token}} with the token itself and the top-N."""
    if entries is None:
        return None
    out = []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        token_id, lp, top = e
        d = {str(token_id): {"logprob": lp, "decoded_token": token_text(token_id)[0]}}
        for rank, (t, v) in enumerate(top or [], 1):
            d.setdefault(str(t), {"logprob": v, "rank": rank, "decoded_token": token_text(t)[0]})
            d[str(t)].setdefault("rank", rank)
        out.append(d)
    return out


def now() -> int:
    return int(time.time())
