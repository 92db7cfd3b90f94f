"""LLMEngine: add_request / step / abort.

    batch = policy.step()           # schedule + one model iteration
    return self._postprocess(batch)  # sample, stop checks, detokenize, free rows
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence as Seq, Union

import psutil
import torch

from .kv import KVBudget, resolve_kv_dtype
from .models.loader import load_model
from .sampling import SamplingParams, sample
from .scheduler import POLICIES
from .sequence import Sequence, Status
from .tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer


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
        self.max_model_len = min(config.max_model_len or self.cfg.max_position_embeddings,
                                 self.cfg.max_position_embeddings)
        budget = config.kv_cache_bytes or int(psutil.virtual_memory().available * config.kv_cache_fraction)
        self.budget = KVBudget(budget)
        kwargs = dict(max_num_seqs=config.max_num_seqs, max_prefill_tokens=config.max_prefill_tokens,
                      record_timeline=config.record_timeline,
                      kv_dtype=resolve_kv_dtype(config.kv_cache_dtype, model.dtype))
        if config.policy == "baton-pd":
            kwargs.update(pool_size=config.pool_size, max_preemptions=config.max_preemptions)
        self.timed_model = TimedModel(model)
        self.policy = POLICIES[config.policy](self.timed_model, self.cfg, self.budget, **kwargs)
        self.requests: dict[str, Sequence] = {}
        self.detoks: dict[str, IncrementalDetokenizer] = {}
        self.logprobs: dict[str, list] = {}
        self.lock = threading.RLock()  # add/abort may come from other threads than step
        self.hooks: list[Callable[[str, Sequence], None]] = []  # metrics: (event, seq)
        self.eos_ids = set(tokenizer.eos_token_ids if tokenizer else self.cfg.eos_token_ids)
        self.step_seconds = 0.0  # wall time in step(); timed_model.seconds of it in forwards
        self.sample_seconds = 0.0  # of it in the sampler

    # ------------------------------------------------------------ requests
    def encode_prompt(self, prompt: Union[str, Seq[int]]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass the prompt as token ids")
            return self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not ids:
            raise ValueError("prompt must not be empty")
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.cfg.vocab_size for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {self.cfg.vocab_size})")
        return ids

    def add_request(self, request_id: str, prompt: Union[str, Seq[int]], params: Optional[SamplingParams] = None,
                    arrival_time: Optional[float] = None) -> Sequence:
        params = params or SamplingParams()
        params.validate()
        ids = self.encode_prompt(prompt)
        total = len(ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds the "
                f"model's context length of {self.max_model_len} tokens")
        if total > self.policy.max_len_that_fits():
            raise ValueError(f"prompt + max_tokens = {total} tokens cannot fit the KV cache budget "
                             f"({self.policy.max_len_that_fits()} tokens)")
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
        return bool(self.requests)

    # ------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput]:
        with self.lock:
            t0 = time.perf_counter()
            batch = self.policy.step()
            outputs = self._postprocess(batch)
            self.step_seconds += time.perf_counter() - t0
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
            seq.output_ids.append(tok.token_id)
            if seq.first_token_time is None:
                seq.first_token_time = now
            if tok.logprob is not None:
                self.logprobs.setdefault(seq.request_id, []).append((tok.token_id, tok.logprob, tok.top_logprobs))
            delta = self._detokenize(seq, tok.token_id)
            reason = self._check_stop(seq, tok.token_id)
            if reason:
                delta = self._trim_stop(seq, delta) if reason == "stop" else delta
                finished.append((seq, reason))
            deltas.append(delta)
        # Leaving rows go last row first: a freed row is refilled by moving the batch's
        # last row into it, and that row should not be one that is leaving too.
        for seq, reason in sorted(finished, key=lambda f: -1 if f[0].row is None else f[0].row, reverse=True):
            self._finish(seq, reason)
        outputs = []
        for seq, tok, delta in zip(batch.seqs, tokens, deltas):
            outputs.append(self._output(seq, delta, [tok.token_id]))
            self._emit("token", seq)
        return outputs

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
        self.policy.abort(seq) if reason == "abort" else self.policy.release(seq)
        self._emit("finished", seq)

    def _output(self, seq: Sequence, delta: str, new_ids: list[int]) -> RequestOutput:
        detok = self.detoks.get(seq.request_id)
        text = detok.text if detok else ""
        finished = seq.is_finished
        out = RequestOutput(
            seq.request_id, seq.prompt_ids,
            [CompletionOutput(0, text, list(seq.output_ids), seq.finish_reason,
                              self.logprobs.get(seq.request_id))],
            finished, delta, new_ids)
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
