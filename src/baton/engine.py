"""LLMEngine: add_request / step / abort.

    plan = scheduler.schedule()          # which rows feed which tokens (pure data)
    masks = grammar.fill_async(...)      # structured output: token masks, while the forward runs
    out = runner.execute(plan)           # the one forward
    scheduler.commit(plan, out.computed) # those tokens are now cached
    tokens = sample(out.logits, ...)     # one token per row that wanted one
    return self._update(plan, tokens)    # outputs: detokenize, stop, free finished rows

A request with n > 1 is n Sequences (choices) sharing its prompt; under a policy
that shares prompts only the first is prefilled and the others take a copy of
its KV and a first token drawn from the same logits.

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
from dataclasses import dataclass
from typing import Optional, Sequence as Seq, Union

import torch

from . import platform
from .cache import KVBudget, KVSpec, PrefixCache, resolve_kv_dtype
from .errors import InvalidRequest, check_unicode
from .models.loader import MODEL_IMPLS, load_model
from .outputs import CompletionOutput, OutputProcessor, RequestOutput
from .platform.quant import KINDS as QUANT_KINDS, check_quantization
from .runner import ModelRunner
from .sampling import SamplingParams, sample
from .scheduler import POLICIES
from .sequence import Request, Sequence, Status
from .tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("baton.engine")

# The policies whose queries are prefilled into caches of their own, where a
# cached prefix can be copied in first (static and inline baton feed prompts in
# the batch itself).
PREFIX_CACHING_POLICIES = ("baton-pd", "orca")

__all__ = ["CompletionOutput", "EngineConfig", "LLMEngine", "RequestOutput"]


@dataclass
class EngineConfig:
    model: Optional[str] = None
    policy: str = "baton-pd"
    dtype: str = "auto"
    quantization: Optional[str] = None  # None ("none"), "int8" or "int4": weight-only, when the engine loads the model
    batch_invariant: bool = False   # a bf16/fp16 model computed in float32 by row-independent kernels (see loader)
    device: str = "cpu"
    model_impl: str = "auto"        # native family file, or the HF transformers backend
    max_num_seqs: int = 32
    max_model_len: Optional[int] = None
    kv_cache_bytes: Optional[int] = None
    kv_cache_fraction: float = 0.3  # of available memory (host RAM, or the GPU's), when kv_cache_bytes is not given
    max_prefill_tokens: int = 1024  # prompt tokens processed per iteration (chunked beyond)
    pool_size: int = 4              # baton-pd: prefilled queries kept ready
    max_preemptions: int = 2        # baton-pd: starvation guard, preemptions per query
    kv_cache_dtype: str = "auto"    # auto: the model's dtype
    num_threads: Optional[int] = None
    record_timeline: bool = False
    enable_prefix_caching: bool = True   # baton-pd and orca: reuse prefilled K/V of shared prefixes
    prefix_cache_bytes: Optional[int] = None  # of the KV budget (default: half of it); it gives way first
    prefix_block_size: int = 16

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
        try:
            self.quantization = check_quantization(self.quantization)  # "none" -> None
        except (ValueError, TypeError):
            raise ValueError(f"quantization must be one of none, {', '.join(QUANT_KINDS)} (or None); "
                             f"got {self.quantization!r}") from None
        platform.resolve_device(self.device)  # raises when the device is not here
        if self.model_impl not in MODEL_IMPLS:
            raise ValueError(f"model_impl must be one of {', '.join(MODEL_IMPLS)}; got {self.model_impl!r}")
        resolve_kv_dtype(self.kv_cache_dtype, torch.float32)  # raises on a bad name
        if self.prefix_cache_bytes is not None and self.prefix_cache_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be >= 0; got {self.prefix_cache_bytes}")
        if self.prefix_block_size < 1:
            raise ValueError(f"prefix_block_size must be >= 1; got {self.prefix_block_size}")
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


class LLMEngine:
    def __init__(self, config: Optional[EngineConfig] = None, *, model=None, tokenizer: Optional[Tokenizer] = None,
                 **kwargs):
        """Build from an EngineConfig (or its fields as keyword arguments). A loaded
        `model` and `tokenizer` may be passed to share weights between engines."""
        config = config or EngineConfig(**kwargs)
        config.validate()
        self.config = config
        platform.configure(config.device, config.num_threads)
        if model is None:
            from .models.loader import default_model_path
            path = config.model or default_model_path()
            model, _ = load_model(path, config.dtype, config.device, model_impl=config.model_impl, progress=True,
                                  quantization=config.quantization, batch_invariant=config.batch_invariant)
            tokenizer = tokenizer or load_tokenizer(path, model.cfg.eos_token_ids)
        self.model, self.cfg, self.tokenizer = model, model.cfg, tokenizer
        self.max_model_len = resolve_max_model_len(config.max_model_len, self.cfg.max_position_embeddings)
        # No prompt longer than this many characters can fit the context: refused
        # before it is tokenized (tokenizing 8 MB of text took seconds).
        self.max_prompt_chars = self.max_model_len * (tokenizer.max_token_chars if tokenizer else 1)
        budget = config.kv_cache_bytes or int(platform.available_memory(model.device) * config.kv_cache_fraction)
        self.budget = KVBudget(budget)
        self.kv_spec = KVSpec.of(self.cfg, resolve_kv_dtype(config.kv_cache_dtype, model.dtype), model.device)
        self.runner = ModelRunner(model)
        self.policy = self._make_policy()
        self.requests: dict[str, Request] = {}
        self._grammar = None  # the structured-output engine, built on first use
        self.lock = threading.RLock()  # add/abort may come from other threads than step
        eos_ids = set(tokenizer.eos_token_ids if tokenizer else self.cfg.eos_token_ids)
        self.outputs = OutputProcessor(tokenizer, eos_ids)
        self.step_seconds = 0.0  # wall time in step(); runner.seconds of it in forwards
        self.sample_seconds = 0.0  # of it in the sampler

    def _make_policy(self):
        config = self.config
        kwargs = dict(max_num_seqs=config.max_num_seqs, max_prefill_tokens=config.max_prefill_tokens,
                      record_timeline=config.record_timeline)
        if config.enable_prefix_caching and config.policy in PREFIX_CACHING_POLICIES:
            capacity = config.prefix_cache_bytes if config.prefix_cache_bytes is not None else self.budget.limit // 2
            kwargs["prefix_cache"] = PrefixCache(self.kv_spec, self.budget, capacity, config.prefix_block_size,
                                                 salt=str(config.model))
        if config.policy == "baton-pd":
            kwargs.update(pool_size=config.pool_size, max_preemptions=config.max_preemptions)
        return POLICIES[config.policy](self.kv_spec, self.budget, **kwargs)

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

    @property
    def grammar(self):
        """The grammar engine (built on the first structured request: it indexes
        the vocabulary once)."""
        if self._grammar is None:
            if self.tokenizer is None:
                raise InvalidRequest("structured_outputs", "structured output needs a tokenizer; this model has none")
            from .structured import GrammarEngine
            self._grammar = GrammarEngine(self.tokenizer.hf, self.cfg.vocab_size, sorted(self.outputs.eos_ids))
        return self._grammar

    def check_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: token ids against the vocabulary,
        bad words (tokenized here), the structured output spec (compiled here, so an
        invalid one is refused before the request is queued)."""
        params.validate()
        vocab = self.cfg.vocab_size
        for name, ids in (("logit_bias", list(params.logit_bias or ())), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise InvalidRequest(name, f"{name}: token ids must be in [0, {vocab}); got {bad[0]}")
        if params.bad_words and not params.bad_words_token_ids:
            if self.tokenizer is None:
                raise InvalidRequest("bad_words", "bad_words needs a tokenizer; this model has none")
            words = []
            for w in params.bad_words:  # as vLLM: the word alone and after a space
                for text in (w, " " + w.lstrip()):
                    ids = self.tokenizer.hf.encode(text, add_special_tokens=False)
                    if ids and ids not in words:
                        words.append(ids)
            params.bad_words_token_ids = words
        if params.structured is not None:
            self.grammar.compile(params.structured)

    def add_request(self, request_id: str, prompt: Union[str, Seq[int]], params: Optional[SamplingParams] = None,
                    arrival_time: Optional[float] = None) -> Request:
        params = params or SamplingParams()
        self.check_params(params)
        ids = self.encode_prompt(prompt)
        self.check_length(len(ids), params.max_tokens)
        arrival = arrival_time or time.monotonic()
        seqs = [Sequence(request_id, ids, params, arrival_time=arrival, index=i, device=self.model.device)
                for i in range(params.n)]
        if params.structured is not None:
            for seq in seqs:
                seq.matcher = self.grammar.matcher(params.structured)
        request = Request(request_id, ids, seqs, [None] if params.prompt_logprobs is not None else None)
        with self.lock:
            if request_id in self.requests:
                raise ValueError(f"request id {request_id!r} is already in use")
            self.requests[request_id] = request
            for seq in seqs:
                self.outputs.add(seq)
            if self.policy.shares_prompts:
                seqs[0].followers = seqs[1:]
                self.policy.add(seqs[0])
            else:
                for seq in seqs:
                    self.policy.add(seq)
        return request

    def abort(self, request_id: str) -> RequestOutput:
        with self.lock:
            request = self.requests.get(request_id)
            if request is None:
                raise KeyError(f"no running request with id {request_id!r}")
            return self._output(request, self._end_choices(request, lambda seq: self._finish(seq, "abort")))

    def _end_choices(self, request: Request, end) -> list:
        """End each unfinished choice of `request` with `end(seq)`, handing out
        what its output held back; returns those choices' outputs."""
        choices = []
        for seq in request.seqs:
            if not seq.is_finished:
                delta = self.outputs.flush(seq)
                end(seq)
                choices.append(self.outputs.choice(seq, delta, []))
        return choices

    def has_unfinished_requests(self) -> bool:
        """Whether step() has work: a known request, or anything the scheduler
        still holds (so a loop that sleeps on this never sleeps with work in it)."""
        return bool(self.requests) or self.policy.has_work()

    # ------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput]:
        with self.lock:
            t0 = time.perf_counter()
            try:
                plan = self.policy.schedule()
                outputs = []
                if not plan.empty:
                    seqs, rows = self._sampled(plan)
                    masks = self._start_masks(seqs)
                    out = self.runner.execute(plan)
                    self.policy.commit(plan, out.computed)
                    for seq, start, rows_logits in out.prompt_logits:
                        request = self.requests.get(seq.request_id)
                        if request is not None and seq.index == 0:  # the prompt's own: once per request
                            self.outputs.add_prompt_logprobs(request, start, rows_logits)
                    logits = out.logits
                    if logits is not None and len(rows) != logits.shape[0]:
                        logits = logits[torch.tensor(rows, device=logits.device)]
                    outputs = self._update(seqs, logits, masks)
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
            for request in list(self.requests.values()):
                ended = self._end_choices(request, lambda seq: self.outputs.finish(seq, "error", message))
                outputs.append(self._output(request, ended))
            stats, old_cache = self.policy.stats, self.policy.prefix_cache
            self.budget.reset()
            self.policy = self._make_policy()
            self.policy.stats = stats  # lifetime counters (iterations, preemptions) carry on
            if old_cache is not None and self.policy.prefix_cache is not None:
                self.policy.prefix_cache.stats = old_cache.stats  # its blocks went with the failed state
            return outputs

    def _sampled(self, plan) -> tuple[list[Sequence], list[int]]:
        """The queries that get a token this step and, for each, its logits row:
        a leader whose prompt was just prefilled lends its row to its followers."""
        seqs = plan.sampled()
        rows = list(range(len(seqs)))
        for i, seq in enumerate(list(seqs)):
            if seq.followers and not seq.output_ids:
                # its prompt is prefilled by this step (the policy hands the followers
                # the KV in commit): same logits, own draws
                for f in seq.followers:
                    if f.status is Status.WAITING and not f.output_ids and not f.is_finished:
                        seqs.append(f)
                        rows.append(i)
        return seqs, rows

    def _start_masks(self, seqs: list[Sequence]):
        """Structured output: start filling the constrained rows' token masks (on
        the grammar engine's thread, overlapping the forward)."""
        rows = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if not rows:
            return None
        return rows, self.grammar.fill_async([seqs[i].matcher for i in rows])

    def _update(self, seqs: list[Sequence], logits, masks=None) -> list[RequestOutput]:
        """Sample a token for each of `seqs` (one per logits row) and hand it to the
        output processor; finished requests leave the scheduler."""
        if not seqs:
            return []
        t0 = time.perf_counter()
        bitmask, bitmask_rows = None, None
        if masks is not None:
            bitmask_rows, future = masks
            bitmask = future.result()
        tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs],
                        [(s.prompt_ids, s.output_ids) for s in seqs], self.outputs.eos_ids, bitmask, bitmask_rows)
        self.sample_seconds += time.perf_counter() - t0
        now = time.monotonic()
        choices, finished = [], []
        for seq, tok in zip(seqs, tokens):
            delta, reason = "", None
            if tok.error is None:
                try:
                    done = False
                    if seq.matcher is not None:
                        seq.matcher.accept(tok.token_id)
                        done = seq.matcher.done
                    delta, reason = self.outputs.append(seq, tok, now, grammar_done=done)
                except Exception as e:  # e.g. the detokenizer on this request's tokens
                    log.exception("request %s failed after sampling", seq.request_id)
                    tok.error = f"{type(e).__name__}: {e}"
            if tok.error is not None:
                seq.error, reason = tok.error, "error"
            if reason:
                finished.append((seq, reason))
            choices.append((seq, delta, [] if tok.error else [tok.token_id]))
        # A failed choice fails its request: its other choices end with it.
        for seq, _ in list(finished):
            if seq.error:
                for sib in self.requests[seq.request_id].seqs:
                    if sib is not seq and not sib.is_finished and all(sib is not f for f, _ in finished):
                        sib.error = seq.error
                        finished.append((sib, "error"))
                        choices.append((sib, self.outputs.flush(sib), []))
        # Leaving rows go last row first: a freed row is refilled by moving the batch's
        # last row into it, and that row should not be one that is leaving too.
        for seq, reason in sorted(finished, key=lambda f: -1 if f[0].row is None else f[0].row, reverse=True):
            self._finish(seq, reason)
        by_request: dict[str, list] = {}
        for seq, delta, new_ids in choices:
            by_request.setdefault(seq.request_id, []).append(self.outputs.choice(seq, delta, new_ids))
        return [self._output(self.requests[rid], cs) for rid, cs in by_request.items()]

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.outputs.finish(seq, reason)
        self.policy.release(seq)

    def _output(self, request: Request, choices) -> RequestOutput:
        out = self.outputs.output(request, choices)
        if out.finished:
            self.requests.pop(request.request_id, None)
        return out

    # ------------------------------------------------------------ introspection
    def _prefix_stats(self) -> dict:
        pc = self.policy.prefix_cache
        if pc is None:
            return {}
        st = pc.stats
        return {"prefix_cache_bytes": pc.nbytes, "prefix_cache_capacity_bytes": pc.capacity,
                "prefix_cache_queries": st.queries, "prefix_cache_query_hits": st.query_hits,
                "prefix_cache_tokens": st.tokens, "prefix_cache_token_hits": st.token_hits,
                "prefix_cache_evictions": st.evictions}

    def stats(self) -> dict:
        p = self.policy
        return {
            "policy": p.name,
            "running": p.num_running,
            "waiting": len(p.waiting),
            "prefilled": p.num_prefilled,
            "parked": p.num_parked,
            "kv_bytes_used": self.budget.query_bytes,  # the prefix cache's bytes are prefix_cache_bytes
            "kv_bytes_peak": self.budget.peak,
            "kv_bytes_resident": self.budget.query_resident,
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
            "forward_seconds": self.runner.seconds,
            "overhead_share": 1 - self.runner.seconds / self.step_seconds if self.step_seconds else 0.0,
            **self._prefix_stats(),
            "kv_copy_seconds": self.budget.copy_seconds,  # overhead parts: KV allocation and copies,
            "sample_seconds": self.sample_seconds,        # the sampler; the rest is scheduling and Python
        }
