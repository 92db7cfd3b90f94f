"""LLMEngine: add_request / step / abort.

    batch = policy.step()           # schedule + one model iteration
    return self._postprocess(batch)  # sample, stop checks, detokenize, free rows

Faults stay with their owner: a row that cannot be sampled or detokenized fails
its own request (finish_reason "error") and the batch goes on; an error the
engine cannot attribute (a failed forward) fails every request in flight and
leaves a fresh, empty scheduler and KV budget, so the next request is served as
by a new engine.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence as Seq, Union

import psutil
import torch

from .errors import InvalidRequest, check_unicode
from .kv import KVBudget, resolve_kv_dtype
from .models.loader import load_model
from .sampling import SamplingParams, sample
from .scheduler import POLICIES
from .sequence import Sequence, Status
from .tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer

log = logging.getLogger("baton.engine")


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: Optional[str]
    logprobs: Optional[list] = None  # per token: (token_id, logprob, [(id, logprob), ...])


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    new_text: str = ""
    new_token_ids: list[int] = field(default_factory=list)
    metrics: Optional[dict] = None
    error: Optional[str] = None  # set when the request failed (finish_reason "error")


@dataclass
class EngineConfig:
    model: Optional[str] = None
    policy: str = "baton-pd"
    dtype: str = "auto"
    device: str = "cpu"
    max_num_seqs: int = 32
    max_model_len: Optional[int] = None
    kv_cache_bytes: Optional[int] = None
    kv_cache_fraction: float = 0.3  # of available RAM, when kv_cache_bytes is not given
    max_prefill_tokens: int = 1024  # prompt tokens processed per iteration (chunked beyond)
    pool_size: int = 4              # baton-pd: prefilled queries kept ready
    max_preemptions: int = 2        # baton-pd: starvation guard, preemptions per query
    kv_cache_dtype: str = "auto"    # auto: the model's dtype
    num_threads: Optional[int] = None
    record_timeline: bool = False

    def validate(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {self.policy!r}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1; got {self.max_num_seqs}")
        if self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1; got {self.max_prefill_tokens}")
        if self.pool_size < 1:
            raise ValueError(f"pool_size must be >= 1; got {self.pool_size}")
        if self.max_preemptions < 0:
            raise ValueError(f"max_preemptions must be >= 0; got {self.max_preemptions}")
        resolve_kv_dtype(self.kv_cache_dtype, torch.float32)  # raises on a bad name
        if not (0 < self.kv_cache_fraction <= 1):
            raise ValueError(f"kv_cache_fraction must be in (0, 1]; got {self.kv_cache_fraction}")


def resolve_max_model_len(requested: Optional[int], model_max: int) -> int:
    """The context length to serve: the model's, or a shorter one asked for."""
    if requested is None:
        return model_max
    if isinstance(requested, bool) or not isinstance(requested, int) or not 1 <= requested <= model_max:
        raise InvalidRequest("max_model_len", f"max_model_len must be an integer in [1, {model_max}] (the "
                                              f"model's max_position_embeddings); got {requested!r}")
    return requested


class TimedModel:
    """The model as the policies see it: same calls, plus the wall time spent in
    forwards, so the engine can split a step into model time and its own overhead
    (scheduling, shaping inputs, sampling, detokenizing)."""

    def __init__(self, model):
        self.model = model
        self.seconds = 0.0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.model(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0

    def __getattr__(self, name):
        return getattr(self.model, name)


class LLMEngine:
    def __init__(self, config: Optional[EngineConfig] = None, *, model=None, tokenizer: Optional[Tokenizer] = None,
                 **kwargs):
        """Build from an EngineConfig (or its fields as keyword arguments). A loaded
        `model` and `tokenizer` may be passed to share weights between engines."""
        config = config or EngineConfig(**kwargs)
        config.validate()
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        if model is None:
            from .models.loader import default_model_path
            path = config.model or default_model_path()
            model, _ = load_model(path, config.dtype, config.device)
            tokenizer = tokenizer or load_tokenizer(path, model.cfg.eos_token_ids)
        self.model, self.cfg, self.tokenizer = model, model.cfg, tokenizer
        self.max_model_len = resolve_max_model_len(config.max_model_len, self.cfg.max_position_embeddings)
        # No prompt longer than this many characters can fit the context: refused
        # before it is tokenized (tokenizing 8 MB of text took seconds).
        self.max_prompt_chars = self.max_model_len * (tokenizer.max_token_chars if tokenizer else 1)
        budget = config.kv_cache_bytes or int(psutil.virtual_memory().available * config.kv_cache_fraction)
        self.budget = KVBudget(budget)
        self.timed_model = TimedModel(model)
        self.policy = self._make_policy()
        self.requests: dict[str, Sequence] = {}
        self.detoks: dict[str, IncrementalDetokenizer] = {}
        self.logprobs: dict[str, list] = {}
        self.lock = threading.RLock()  # add/abort may come from other threads than step
        self.hooks: list[Callable[[str, Sequence], None]] = []  # metrics: (event, seq)
        self.eos_ids = set(tokenizer.eos_token_ids if tokenizer else self.cfg.eos_token_ids)
        self.step_seconds = 0.0  # wall time in step(); timed_model.seconds of it in forwards
        self.sample_seconds = 0.0  # of it in the sampler

    def _make_policy(self):
        config = self.config
        kwargs = dict(max_num_seqs=config.max_num_seqs, max_prefill_tokens=config.max_prefill_tokens,
                      record_timeline=config.record_timeline,
                      kv_dtype=resolve_kv_dtype(config.kv_cache_dtype, self.model.dtype))
        if config.policy == "baton-pd":
            kwargs.update(pool_size=config.pool_size, max_preemptions=config.max_preemptions)
        return POLICIES[config.policy](self.timed_model, self.cfg, self.budget, **kwargs)

    # ------------------------------------------------------------ requests
    @property
    def max_request_len(self) -> int:
        """Longest prompt + max_tokens a request may have: the context, or less
        where the KV budget could not hold a query that long."""
        return min(self.max_model_len, self.policy.max_len_that_fits())

    def check_prompt_chars(self, num_chars: int, param: str = "prompt") -> None:
        if num_chars > self.max_prompt_chars:
            raise InvalidRequest(param, f"{param} is {num_chars} characters long: no text longer than "
                                        f"{self.max_prompt_chars} characters fits the context length of "
                                        f"{self.max_model_len} tokens")

    def validate_prompt(self, prompt: Union[str, Seq[int]]) -> None:
        """Every check on a prompt that needs no tokenizing (so a server can answer
        a bad prompt 400 before it queues it)."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("prompt", "prompt must not be empty")
            if self.tokenizer is None:
                raise InvalidRequest("prompt", "prompt must be token ids: this engine has no tokenizer")
            self.check_prompt_chars(len(prompt))
            check_unicode(prompt, "prompt")
            return
        if not len(prompt):
            raise InvalidRequest("prompt", "prompt must not be empty")
        if len(prompt) > self.max_model_len:
            raise InvalidRequest("prompt", f"prompt ({len(prompt)} tokens) is longer than the model's context "
                                           f"length of {self.max_model_len} tokens")
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.cfg.vocab_size for t in prompt):
            raise InvalidRequest("prompt", f"prompt token ids must be integers in [0, {self.cfg.vocab_size})")

    def encode_prompt(self, prompt: Union[str, Seq[int]]) -> list[int]:
        self.validate_prompt(prompt)
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def check_length(self, prompt_len: Optional[int], max_tokens: int) -> None:
        """Raise, naming the field to change, if the request cannot fit the context
        (or the KV budget): the prompt when no max_tokens could, else max_tokens.
        prompt_len None: not tokenized yet (a prompt has at least one token)."""
        limit = self.max_request_len
        what = (f"the model's context length of {self.max_model_len} tokens" if limit == self.max_model_len
                else f"the KV cache budget ({limit} tokens)")
        if prompt_len is None:
            if max_tokens >= limit:
                raise InvalidRequest("max_tokens", f"max_tokens must be less than {limit}: prompt + max_tokens "
                                                   f"must fit {what}")
            return
        if prompt_len >= limit:
            raise InvalidRequest("prompt", f"prompt ({prompt_len} tokens) leaves no room to generate within {what}")
        if prompt_len + max_tokens > limit:
            raise InvalidRequest("max_tokens", f"max_tokens must be at most {limit - prompt_len} for this prompt: "
                                               f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = "
                                               f"{prompt_len + max_tokens} exceeds {what}")

    def add_request(self, request_id: str, prompt: Union[str, Seq[int]], params: Optional[SamplingParams] = None,
                    arrival_time: Optional[float] = None) -> Sequence:
        params = params or SamplingParams()
        params.validate()
        ids = self.encode_prompt(prompt)
        self.check_length(len(ids), params.max_tokens)
        seq = Sequence(request_id, ids, params, arrival_time=arrival_time or time.monotonic())
        with self.lock:
            if request_id in self.requests:
                raise ValueError(f"request id {request_id!r} is already in use")
            self.requests[request_id] = seq
            self.detoks[request_id] = IncrementalDetokenizer(self.tokenizer, ids) if self.tokenizer else None
            self.policy.add(seq)
        self._emit("added", seq)
        return seq

    def abort(self, request_id: str) -> RequestOutput:
        with self.lock:
            seq = self.requests.get(request_id)
            if seq is None:
                raise KeyError(f"no running request with id {request_id!r}")
            self._finish(seq, "abort")
            return self._output(seq, "", [])

    def has_unfinished_requests(self) -> bool:
        """Whether step() has work: a known request, or anything the scheduler
        still holds (so a loop that sleeps on this never sleeps with work in it)."""
        return bool(self.requests) or self.policy.has_work()

    # ------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput]:
        with self.lock:
            t0 = time.perf_counter()
            try:
                outputs = self._postprocess(self.policy.step())
            except Exception as e:  # not attributable to one request: fail all, start clean
                log.exception("engine step failed; failing every request in flight")
                outputs = self.fail_all(f"engine error: {type(e).__name__}: {e}")
            self.step_seconds += time.perf_counter() - t0
            return outputs

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every request with `message` (finish_reason "error") and replace the
        scheduler and its KV with fresh ones, whatever state a failure left them in.
        Returns the requests' final outputs."""
        with self.lock:
            outputs = []
            for seq in list(self.requests.values()):
                seq.error = message
                seq.finish_reason, seq.status, seq.finish_time = "error", Status.FINISHED, time.monotonic()
                self._emit("finished", seq)
                outputs.append(self._output(seq, "", []))
            stats = self.policy.stats
            self.budget.reset()
            self.policy = self._make_policy()
            self.policy.stats = stats  # lifetime counters (iterations, preemptions) carry on
            return outputs

    def _postprocess(self, batch) -> list[RequestOutput]:
        if not batch.seqs:
            return []
        params = [s.params for s in batch.seqs]
        t0 = time.perf_counter()
        tokens = sample(batch.logits, params, [s.generator for s in batch.seqs])
        self.sample_seconds += time.perf_counter() - t0
        now = time.monotonic()
        deltas, finished = [], []
        for seq, tok in zip(batch.seqs, tokens):
            delta, reason = "", None
            if tok.error is None:
                try:
                    delta, reason = self._append_token(seq, tok, now)
                except Exception as e:  # e.g. the detokenizer on this request's tokens
                    log.exception("request %s failed after sampling", seq.request_id)
                    tok.error = f"{type(e).__name__}: {e}"
            if tok.error is not None:
                seq.error, reason = tok.error, "error"
            if reason:
                finished.append((seq, reason))
            deltas.append(delta)
        # Leaving rows go last row first: a freed row is refilled by moving the batch's
        # last row into it, and that row should not be one that is leaving too.
        for seq, reason in sorted(finished, key=lambda f: -1 if f[0].row is None else f[0].row, reverse=True):
            self._finish(seq, reason)
        outputs = []
        for seq, tok, delta in zip(batch.seqs, tokens, deltas):
            outputs.append(self._output(seq, delta, [] if tok.error else [tok.token_id]))
            self._emit("token", seq)
        return outputs

    def _append_token(self, seq: Sequence, tok, now: float) -> tuple[str, Optional[str]]:
        """Add a sampled token to its query: returns (text delta, finish reason or None)."""
        seq.output_ids.append(tok.token_id)
        if seq.first_token_time is None:
            seq.first_token_time = now
        if tok.logprob is not None:
            self.logprobs.setdefault(seq.request_id, []).append((tok.token_id, tok.logprob, tok.top_logprobs))
        delta = self._detokenize(seq, tok.token_id)
        reason = self._check_stop(seq, tok.token_id)
        if reason == "stop":
            delta = self._trim_stop(seq, delta)
        return delta, reason

    def _detokenize(self, seq: Sequence, token_id: int) -> str:
        detok = self.detoks.get(seq.request_id)
        if detok is None or token_id in self.eos_ids and not seq.params.ignore_eos:
            return ""
        return detok.add(token_id)

    def _check_stop(self, seq: Sequence, token_id: int) -> Optional[str]:
        p = seq.params
        if not p.ignore_eos and token_id in self.eos_ids:
            return "stop"
        if token_id in p.stop_token_ids:
            return "stop"
        if p.stop and self.detoks.get(seq.request_id):
            text = self.detoks[seq.request_id].text
            tail = text[-(max(map(len, p.stop)) + 32):]
            if any(s in tail for s in p.stop):
                return "stop"
        if len(seq.output_ids) >= p.max_tokens:
            return "length"
        return None

    def _trim_stop(self, seq: Sequence, delta: str) -> str:
        """Cut the text at the first stop string (the stop string is not returned)."""
        detok = self.detoks.get(seq.request_id)
        if not detok or not seq.params.stop:
            return delta
        text = detok.text
        cut = min((i for i in (text.find(s) for s in seq.params.stop) if i >= 0), default=len(text))
        emitted_before = len(text) - len(delta)
        detok.text = text[:cut]
        return text[emitted_before:cut] if cut > emitted_before else ""

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        seq.status = Status.FINISHED
        seq.finish_time = time.monotonic()
        self.policy.release(seq)
        self._emit("finished", seq)

    def _output(self, seq: Sequence, delta: str, new_ids: list[int]) -> RequestOutput:
        detok = self.detoks.get(seq.request_id)
        text = detok.text if detok else ""
        finished = seq.is_finished
        out = RequestOutput(
            seq.request_id, seq.prompt_ids,
            [CompletionOutput(0, text, list(seq.output_ids), seq.finish_reason,
                              self.logprobs.get(seq.request_id))],
            finished, delta, new_ids, error=seq.error)
        if finished:
            out.metrics = {"arrival_time": seq.arrival_time, "first_token_time": seq.first_token_time,
                           "finish_time": seq.finish_time, "num_preemptions": seq.num_preemptions}
            self.requests.pop(seq.request_id, None)
            self.detoks.pop(seq.request_id, None)
            self.logprobs.pop(seq.request_id, None)
        return out

    def _emit(self, event: str, seq: Sequence) -> None:
        for hook in self.hooks:
            hook(event, seq)

    # ------------------------------------------------------------ introspection
    def stats(self) -> dict:
        p = self.policy
        return {
            "policy": p.name,
            "running": p.num_running,
            "waiting": len(p.waiting),
            "prefilled": p.num_prefilled,
            "parked": p.num_parked,
            "kv_bytes_used": self.budget.used,
            "kv_bytes_peak": self.budget.peak,
            "kv_bytes_resident": self.budget.resident,
            "kv_bytes_resident_peak": self.budget.resident_peak,
            "kv_bytes_budget": self.budget.limit,
            "kv_bytes_live": p.live_tokens() * p.slot,
            "iterations": p.stats.iterations,
            "idle_token_rows": p.stats.idle_token_rows,
            "computed_token_rows": p.stats.computed_token_rows,
            "idle_share": p.stats.idle_share,
            "kv_padding_ratio": p.stats.kv_padding_ratio,
            "preemptions": p.stats.preemptions,
            "step_seconds": self.step_seconds,
            "forward_seconds": self.timed_model.seconds,
            "overhead_share": 1 - self.timed_model.seconds / self.step_seconds if self.step_seconds else 0.0,
            "kv_copy_seconds": self.budget.copy_seconds,  # overhead parts: KV allocation and copies,
            "sample_seconds": self.sample_seconds,        # the sampler; the rest is scheduling and Python
        }
