"""SamplingParams and the sampler.

Each row is sampled on its own random generator (seeded per request), so a
query's samples do not depend on which other queries share the batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from . import platform
from .errors import InvalidRequest


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: Optional[int] = None  # None: off; N >= 0: chosen token plus top-N
    priority: int = 0  # lower runs first

    MAX_LOGPROBS = 20

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        def bad(name, allowed, value):
            raise InvalidRequest(name, f"{name} must be {allowed}; got {value!r}")

        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", "an integer >= 1", self.max_tokens)
        if not _is_number(self.temperature) or not 0 <= self.temperature < math.inf:
            bad("temperature", "a finite number >= 0", self.temperature)
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "in (0, 1]", self.top_p)
        if not _is_int(self.top_k) or self.top_k < -1:
            bad("top_k", "-1, 0 (off) or a positive integer", self.top_k)
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", "in [0, 1]", self.min_p)
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= self.MAX_LOGPROBS):
            bad("logprobs", f"an integer in [0, {self.MAX_LOGPROBS}]", self.logprobs)
        # The range torch.Generator.manual_seed takes (int64 and uint64 values).
        if self.seed is not None and (not _is_int(self.seed) or not -2**63 <= self.seed < 2**64):
            bad("seed", "an integer in [-2**63, 2**64 - 1]", self.seed)
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "a non-empty string or a list of them", self.stop)
        if any(not _is_int(t) for t in self.stop_token_ids):
            bad("stop_token_ids", "a list of integers", self.stop_token_ids)
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", "true or false", self.ignore_eos)
        if not _is_int(self.priority):
            bad("priority", "an integer", self.priority)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class SampledToken:
    token_id: int
    logprob: Optional[float] = None
    top_logprobs: Optional[list[tuple[int, float]]] = None
    error: Optional[str] = None  # this row could not be sampled; token_id is meaningless


# Below this temperature a float32 division by it can turn 0 into 0/0 (it rounds
# to a subnormal or to zero): such rows are scaled in float64 instead.
_FLOAT32_SAFE_TEMPERATURE = torch.finfo(torch.float32).tiny


def _scaled_logits(row: torch.Tensor, temperature: float) -> torch.Tensor:
    """row / temperature, as a distribution: softmax(l / T) == softmax((l - max) / T),
    and with the max subtracted first every scaled logit is <= 0 and the top one is
    exactly 0, so no temperature > 0 gives inf - inf or 0 / 0. A temperature that
    underflows therefore samples the top token with probability 1 (greedy, up to
    exact ties), as its limit does, instead of producing NaN probabilities."""
    row = row - row.max()
    if temperature >= _FLOAT32_SAFE_TEMPERATURE:
        return row / temperature
    return (row.double() / temperature).float()


def _filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits [V] (float32, scaled by _scaled_logits) -> logits with -inf outside the
    kept set. Every filter keeps the most likely token, so the kept set is never empty."""
    if p.top_k and p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= p.top_p  # keep the token that crosses top_p
        # A top_p below float32's resolution compares as 0 and would drop every token.
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def _sample_row(logits: torch.Tensor, p: SamplingParams, generator: Optional[torch.Generator]) -> int:
    row = _filter_logits(_scaled_logits(logits, p.temperature), p)
    return int(torch.multinomial(row.softmax(-1), 1, generator=generator).item())


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[Optional[torch.Generator]]) -> list[SampledToken]:
    """logits: [N, V], one row per sequence, in the model's dtype; computed on in
    float32 (exact for bf16; PyTorch's bf16 argmax ran ~4x slower than upcast +
    float32 argmax on the CPU). Returns one SampledToken per row; a row that cannot
    be sampled gets `error` set instead of failing the others."""
    logits = logits.float()
    greedy_ids = platform.greedy_argmax(logits).tolist()
    want_logprobs = [i for i, p in enumerate(params) if p.logprobs is not None]
    logprobs = logits[want_logprobs].log_softmax(-1) if want_logprobs else None
    out = []
    for i, p in enumerate(params):
        if p.greedy:
            out.append(SampledToken(greedy_ids[i]))
            continue
        try:
            out.append(SampledToken(_sample_row(logits[i], p, generators[i])))
        except Exception as e:  # this row's failure (e.g. NaN logits) is its request's alone
            out.append(SampledToken(greedy_ids[i], error=f"sampling failed: {type(e).__name__}: {e}"))
    if logprobs is not None:
        for j, i in enumerate(want_logprobs):
            lp = logprobs[j]
            out[i].logprob = float(lp[out[i].token_id])
            n = params[i].logprobs
            if n:
                vals, ids = torch.topk(lp, n)
                out[i].top_logprobs = list(zip(ids.tolist(), vals.tolist()))
            else:
                out[i].top_logprobs = []
    return out
