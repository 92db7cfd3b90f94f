"""Structured output: what a request asks its text to match.

StructuredOutput is plain data carried in SamplingParams; the grammar engine
below compiles it against the tokenizer and keeps one matcher per query.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InvalidRequest

log = logging.getLogger(__name__)

# json: value is a JSON Schema (dict), or None for any JSON object;
# regex: a regular expression (str); choice: a list of strings;
# grammar: a GBNF grammar (llama.cpp / vLLM); lark: a Lark grammar (llguidance's
# dialect, used for tool calls).
KINDS = ("json", "regex", "choice", "grammar", "lark")


@dataclass(frozen=True, eq=False)
class StructuredOutput:
    kind: str
    value: Any = None
    param: str = "structured_outputs"  # the request field it came from, named in errors


# ----------------------------------------------------------------------------------------
# The grammar engine: llguidance (see benchmarks/results/structured/library_choice.md).
#
# Each spec compiles once (by content, LRU) into a pristine llguidance LLMatcher; every
# query gets a deep copy of it (cheap: about 1 µs, the lexer and grammar are shared), so
# n choices of one request each walk their own grammar state. Masks are bitmasks, int32
# [rows, ceil(vocab_size / 32)], bit set = token allowed; llguidance fills them on its own
# threads with the GIL released, and fill_async runs that on a background thread so the
# engine can overlap it with the model's forward.

# JSON whitespace. llguidance's default (whitespace_flexible) allows any run of
# [ \t\n\r] between JSON tokens, unbounded: a small model can emit "\n" or spaces
# forever inside an object and never finish. Its `whitespace_pattern` option replaces
# that run with a regex, and the regex bounds each gap: at most one line break, then at
# most 32 spaces or tabs of indentation (json.dumps(indent=2) nested 16 deep, or
# indent=4 8 deep, still fits). Compact output ({"a":1}) and the usual `": "` / `, `
# spacing are allowed too; nothing before the first `{` or after the last `}`.
# A schema's own top-level "x-guidance" whitespace settings, if it has any, win. The same
# bound goes into each %json{...} of a Lark grammar (bound_lark_json_whitespace); a
# GBNF or Lark grammar's own whitespace rules are its author's.
JSON_WHITESPACE = r"(\r?\n)?[\x20\x09]{0,32}"

# Any JSON object, like OpenAI's response_format {"type": "json_object"}.
ANY_JSON_OBJECT = {"type": "object"}

_MAX_MESSAGE = 600  # characters of a library error message kept in ours


def _own_whitespace(schema) -> bool:
    xg = schema.get("x-guidance") if isinstance(schema, dict) else None
    return isinstance(xg, dict) and ("whitespace_flexible" in xg or "whitespace_pattern" in xg)


_LARK_JSON = re.compile(r"%json\s*(?=\{)")


def bound_lark_json_whitespace(lark: str) -> str:
    """The Lark grammar with JSON_WHITESPACE in each inline `%json {...}` schema that
    sets no whitespace of its own (llguidance reads a schema's top-level "x-guidance"
    there too; without it %json allows unbounded whitespace). A %json whose object does
    not parse is left alone for llguidance to report."""
    out, pos = [], 0
    dec = json.JSONDecoder()
    for m in _LARK_JSON.finditer(lark):
        if m.start() < pos:
            continue
        try:
            schema, end = dec.raw_decode(lark, m.end())
        except ValueError:
            continue
        xg = schema.get("x-guidance", {}) if isinstance(schema, dict) else None
        if not isinstance(xg, dict) or _own_whitespace(schema):
            continue
        schema = {**schema, "x-guidance": {**xg, "whitespace_pattern": JSON_WHITESPACE}}
        out.append(lark[pos:m.end()])
        out.append(json.dumps(schema, ensure_ascii=False))
        pos = end
    out.append(lark[pos:])
    return "".join(out)


class StructuredOutputError(InvalidRequest):
    """A structured-output spec that cannot be compiled, or a token its grammar does
    not allow; `param` is the request field the spec came from."""


def _short(msg: str) -> str:
    msg = str(msg).strip()
    return msg if len(msg) <= _MAX_MESSAGE else msg[:_MAX_MESSAGE] + " ..."


def _field(spec: StructuredOutput) -> str:
    """The field a message names: spec.param, spelled down to the schema for
    OpenAI's response_format."""
    if spec.param == "response_format" and spec.kind == "json" and spec.value is not None:
        return "response_format.json_schema"
    return spec.param


class CompiledGrammar:
    """One compiled spec: a pristine llguidance matcher that is only ever copied."""

    __slots__ = ("kind", "key", "_matcher")

    def __init__(self, kind: str, key: str, matcher):
        self.kind, self.key, self._matcher = kind, key, matcher

    def __repr__(self) -> str:
        return f"CompiledGrammar({self.kind}, {len(self.key)} chars)"


class Matcher:
    """The grammar state of one query's generated text."""

    __slots__ = ("_m", "param", "_engine")

    def __init__(self, llmatcher, param: str, engine: "GrammarEngine"):
        self._m, self.param, self._engine = llmatcher, param, engine

    def accept(self, token_id: int) -> None:
        """Advance by one generated token. A token the grammar does not allow raises
        StructuredOutputError (llguidance itself would only flag an error state).
        EOS is accepted when the grammar is complete."""
        if not self._m.consume_token(int(token_id)):
            err = self._m.get_error().split("\n<", 1)[0]  # drop llguidance's state dump
            piece = self._engine.piece(int(token_id))
            raise StructuredOutputError(
                self.param, f"{self.param}: token {int(token_id)} ({piece!r}) is not allowed by the output "
                            f"grammar here: {_short(err) or 'matcher stopped'}")

    @property
    def done(self) -> bool:
        """The grammar is complete and nothing more may follow: only EOS is allowed
        (llguidance's is_stopped; also true once EOS was accepted, and after a token
        accept() refused)."""
        return self._m.is_stopped()

    @property
    def accepting(self) -> bool:
        """The text so far is a complete match (EOS is allowed), though it may go on
        (a JSON number, `[0-9]+`)."""
        return self._m.is_accepting()

    def copy(self) -> "Matcher":
        return Matcher(self._m.deep_copy(), self.param, self._engine)


class GrammarEngine:
    """Compiles StructuredOutput specs against one tokenizer and fills token masks.

    hf_tokenizer: a fast HF tokenizer; vocab_size: the model's logits width (may be
    more than len(tokenizer): the extra ids are never allowed); eos_token_ids: the ids
    that end a generation (SmolLM2's <|im_end|>); a complete grammar allows exactly
    these, so a constrained query finishes with "stop"."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: list[int], *,
                 cache_size: int = 256, num_threads: int | None = None):
        import llguidance
        import llguidance.hf

        self._llg = llguidance
        eos = sorted({int(t) for t in eos_token_ids})
        if not eos:
            raise ValueError("GrammarEngine needs at least one EOS token id")
        self.vocab_size = int(vocab_size)
        self.eos_token_ids = eos
        self.hf = hf_tokenizer
        # n_vocab = the logits width, so masks are exactly as wide as the logits;
        # eos_token overrides the tokenizer's own (which may be <|endoftext|>).
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=self.vocab_size, eos_token=eos)
        # Terse errors: the default (verbose_errors) appends the parser state and the
        # whole grammar to every message.
        self._limits = llguidance.LLParserLimits(verbose_errors=False)
        self.mask_words = (self.vocab_size + 31) // 32
        self._executor = llguidance.LLExecutor(num_threads) if num_threads else llguidance.LLExecutor()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="baton-grammar")
        self._pin = torch.cuda.is_available()
        self._cache: OrderedDict[tuple, CompiledGrammar | StructuredOutputError] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    # -- compiling ---------------------------------------------------------------------

    def compile(self, spec: StructuredOutput) -> CompiledGrammar:
        """The compiled grammar of `spec` (cached by content); raises
        StructuredOutputError naming spec.param when the spec is bad."""
        key = self._key(spec)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
        if hit is None:
            try:
                hit = self._compile(spec, key)
            except StructuredOutputError as e:
                hit = e  # a bad spec is remembered too (without its param: see below)
            with self._lock:
                self._cache[key] = hit
                self._cache.move_to_end(key)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        if isinstance(hit, StructuredOutputError):
            # the message was built for one field; name this spec's
            raise StructuredOutputError(spec.param, str(hit).replace(hit._field, _field(spec), 1)) from None
        return hit

    def matcher(self, spec: StructuredOutput) -> Matcher:
        """A fresh matcher for one query (each of n choices gets its own)."""
        return Matcher(self.compile(spec)._matcher.deep_copy(), spec.param, self)

    def _key(self, spec: StructuredOutput) -> tuple:
        if spec.kind not in KINDS:
            raise StructuredOutputError(spec.param, f"{spec.param}: unknown structured output kind {spec.kind!r} "
                                                    f"(expected one of {', '.join(KINDS)})")
        v = spec.value
        if isinstance(v, str) or v is None:
            return (spec.kind, v)
        try:  # content, order-preserving (JSON property order is the output's order)
            return (spec.kind, json.dumps(v, ensure_ascii=False, separators=(",", ":"), allow_nan=False))
        except (TypeError, ValueError) as e:
            raise self._error(spec, f"value is not JSON data: {e}") from None

    def _error(self, spec: StructuredOutput, what: str) -> StructuredOutputError:
        field = _field(spec)
        e = StructuredOutputError(spec.param, f"{field}: {what}")
        e._field = field
        return e

    def _compile(self, spec: StructuredOutput, key: tuple) -> CompiledGrammar:
        LLMatcher = self._llg.LLMatcher
        kind, v = spec.kind, spec.value
        if kind == "json":
            grammar = self._json_grammar(spec)
            bad = "unsupported JSON Schema"  # jsonschema accepted it; llguidance did not
        elif kind == "regex":
            if not isinstance(v, str):
                raise self._error(spec, f"regex must be a string, got {type(v).__name__}")
            grammar, bad = LLMatcher.grammar_from_regex(v), "invalid regex"
        elif kind == "choice":
            if not isinstance(v, (list, tuple)) or not v:
                raise self._error(spec, "choice must be a non-empty list of strings")
            if not all(isinstance(c, str) for c in v):
                raise self._error(spec, "choice must be a list of strings; got "
                                        + ", ".join(sorted({type(c).__name__ for c in v if not isinstance(c, str)})))
            # a JSON string literal is a Lark string literal
            lark = "start: " + " | ".join(json.dumps(c) for c in dict.fromkeys(v))
            grammar, bad = LLMatcher.grammar_from_lark(lark), "invalid choice"
        elif kind == "grammar":
            if not isinstance(v, str) or not v.strip():
                raise self._error(spec, "invalid GBNF grammar: must be a non-empty string")
            from llguidance.gbnf_to_lark import gbnf_to_lark
            try:
                lark = gbnf_to_lark(v)
            except Exception as e:  # GbnfToLarkError, or a bare Exception for a missing rule
                raise self._error(spec, f"invalid GBNF grammar: {_short(e)}") from None
            grammar, bad = LLMatcher.grammar_from_lark(lark), "invalid GBNF grammar"
        else:  # lark
            if not isinstance(v, str) or not v.strip():
                raise self._error(spec, "invalid Lark grammar: must be a non-empty string")
            grammar, bad = LLMatcher.grammar_from_lark(bound_lark_json_whitespace(v)), "invalid Lark grammar"
        # The constructor never raises on a bad grammar: it enters an error state.
        m = LLMatcher(self.tokenizer, grammar, log_level=0, limits=self._limits)
        if m.is_error():
            raise self._error(spec, f"{bad}: {_short(m.get_error())}")
        for w in m.get_grammar_warnings():
            log.warning("%s: grammar warning: %s", spec.param, w)
        return CompiledGrammar(kind, key[1] or "", m)

    def _json_grammar(self, spec: StructuredOutput) -> str:
        v = spec.value
        if v is None:
            schema = ANY_JSON_OBJECT
        else:
            if isinstance(v, str):
                try:
                    v = json.loads(v)
                except ValueError as e:
                    raise self._error(spec, f"invalid JSON Schema: not JSON: {e}") from None
            if not isinstance(v, (dict, bool)):
                raise self._error(spec, f"invalid JSON Schema: must be an object, got {type(v).__name__}")
            import jsonschema
            from jsonschema.validators import validator_for
            try:
                validator_for(v).check_schema(v)
            except jsonschema.SchemaError as e:
                where = "/".join(str(p) for p in e.path)
                raise self._error(spec, f"invalid JSON Schema: {_short(e.message)}"
                                        + (f" (at {where})" if where else "")) from None
            schema = v
        # defaults, so a schema's own x-guidance options still apply on top
        return self._llg.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults=None if _own_whitespace(schema) else {"whitespace_pattern": JSON_WHITESPACE})

    # -- masks -------------------------------------------------------------------------

    def fill_bitmasks(self, matchers: list[Matcher]) -> torch.Tensor:
        """The next-token masks of `matchers`: int32 [len(matchers), ceil(vocab_size/32)],
        bit j of word i = token 32*i+j allowed; filled in parallel by llguidance.
        Do not accept() tokens into these matchers while this runs."""
        n = len(matchers)
        out = torch.zeros((n, self.mask_words), dtype=torch.int32, pin_memory=self._pin)
        if n:
            # What llguidance.torch.fill_next_token_bitmask_par does, called directly:
            # importing llguidance.torch runs a @torch.compile decorator, which pulls in
            # torch._dynamo (about 1-2 s on the first structured request, for nothing).
            self._executor.unsafe_compute_mask_ptr([(m._m, i) for i, m in enumerate(matchers)],
                                                   out.data_ptr(), self.mask_words * 4, n)
        return out

    def fill_async(self, matchers: list[Matcher]) -> concurrent.futures.Future:
        """fill_bitmasks on a background thread; future.result() is the tensor. The
        matchers must not be advanced until the future is done."""
        return self._pool.submit(self.fill_bitmasks, list(matchers))

    def piece(self, token_id: int) -> str:
        try:
            return self.hf.convert_ids_to_tokens(token_id) or ""
        except Exception:
            return "?"

    def close(self) -> None:
        self._pool.shutdown(wait=True)


_BITS: dict = {}


def _bit_values(device) -> torch.Tensor:
    """int32 [32]: 1 << j (bit 31 is the sign bit, -2**31), one tensor per device."""
    t = _BITS.get(device)
    if t is None:
        t = _BITS[device] = torch.bitwise_left_shift(
            torch.ones(32, dtype=torch.int32, device=device), torch.arange(32, dtype=torch.int32, device=device))
    return t


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """In place: logits[rows[i]] (or logits[i] when rows is None) gets -inf wherever
    bitmask[i] has no bit. Bits past logits' width are ignored; logits columns past the
    bitmask's 32*words are not allowed either (-inf). Pure torch, no per-row loop; the
    bitmask moves to logits.device; any float dtype."""
    if logits.dim() == 1:
        logits = logits.unsqueeze(0)
    if bitmask.dim() == 1:
        bitmask = bitmask.unsqueeze(0)
    n, words = bitmask.shape
    if n == 0:
        return
    vocab = logits.shape[-1]
    width = min(vocab, words * 32)
    mask = bitmask.to(logits.device, non_blocking=True)
    # [n, words, 32] -> [n, words*32]: bit j of word i is token 32*i + j
    banned = (mask.unsqueeze(-1) & _bit_values(logits.device)).view(n, words * 32)[:, :width] == 0
    if rows is None:
        if n != logits.shape[0]:
            raise ValueError(f"apply_bitmask: {n} mask rows for {logits.shape[0]} logits rows (pass rows=)")
        logits[:, :width].masked_fill_(banned, float("-inf"))
        if vocab > width:
            logits[:, width:] = float("-inf")
        return
    rows = torch.as_tensor(rows, device=logits.device, dtype=torch.long)
    if rows.numel() != n:
        raise ValueError(f"apply_bitmask: {n} mask rows for {rows.numel()} row indices")
    sub = logits.index_select(0, rows)
    sub[:, :width].masked_fill_(banned, float("-inf"))
    if vocab > width:
        sub[:, width:] = float("-inf")
    logits.index_copy_(0, rows, sub)
