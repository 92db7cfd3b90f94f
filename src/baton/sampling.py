"""SamplingParams and the sampler.

Each row is sampled on its own random generator (seeded per request), so a
query's samples do not depend on which other queries share the batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Optional, Sequence, Union

import torch

from . import platform
from .errors import InvalidRequest

if TYPE_CHECKING:
    from .structured import StructuredOutput


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
    n: int = 1  # completions per request: the engine fans out, the sampler ignores it
    # OpenAI / vLLM: over the OUTPUT tokens, logit -= frequency_penalty * count + presence_penalty * (count > 0).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM / HF: over the prompt and output tokens seen, logit > 0 -> logit / p, else logit * p.
    repetition_penalty: float = 1.0
    logit_bias: Optional[dict[int, float]] = None  # token id -> added to its logit (before temperature)
    min_tokens: int = 0  # until this many output tokens exist, EOS ids and stop_token_ids are masked
    include_stop_str_in_output: bool = False
    bad_words: list[str] = field(default_factory=list)
    # Set by the engine (bad_words tokenized): a word's last token is masked where the
    # output so far ends with the word's other tokens (always, for a one-token word).
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    prompt_logprobs: Optional[int] = None
    structured: Optional["StructuredOutput"] = None

    MAX_LOGPROBS = 20
    MAX_N = 128
    MAX_PENALTY = 2.0
    MAX_LOGIT_BIAS = 100.0

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.bad_words is None:
            self.bad_words = []
        if self.bad_words_token_ids is None:
            self.bad_words_token_ids = []
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
        if not _is_int(self.n) or not 1 <= self.n <= self.MAX_N:
            bad("n", f"an integer in [1, {self.MAX_N}]", self.n)
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -self.MAX_PENALTY <= v <= self.MAX_PENALTY:
                bad(name, f"a number in [-{self.MAX_PENALTY:g}, {self.MAX_PENALTY:g}]", v)
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty <= self.MAX_PENALTY:
            bad("repetition_penalty", f"a number in (0, {self.MAX_PENALTY:g}]", self.repetition_penalty)
        if self.logit_bias is not None:
            lim = self.MAX_LOGIT_BIAS
            if not isinstance(self.logit_bias, dict) or any(
                    not _is_int(k) or k < 0 or not _is_number(v) or not -lim <= v <= lim
                    for k, v in self.logit_bias.items()):
                bad("logit_bias", f"a map from token ids (integers >= 0) to numbers in [-{lim:g}, {lim:g}]",
                    self.logit_bias)
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            bad("min_tokens", f"an integer in [0, max_tokens] = [0, {self.max_tokens}]", self.min_tokens)
        if not isinstance(self.include_stop_str_in_output, bool):
            bad("include_stop_str_in_output", "true or false", self.include_stop_str_in_output)
        if not isinstance(self.bad_words, (list, tuple)) or any(
                not isinstance(w, str) or not w for w in self.bad_words):
            bad("bad_words", "a list of non-empty strings", self.bad_words)
        self.bad_words = list(self.bad_words)
        if not isinstance(self.bad_words_token_ids, (list, tuple)) or any(
                not isinstance(w, (list, tuple)) or not w or any(not _is_int(t) or t < 0 for t in w)
                for w in self.bad_words_token_ids):
            bad("bad_words_token_ids", "a list of non-empty lists of token ids (integers >= 0)",
                self.bad_words_token_ids)
        self.bad_words_token_ids = [list(w) for w in self.bad_words_token_ids]
        if self.prompt_logprobs is not None and (
                not _is_int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= self.MAX_LOGPROBS):
            bad("prompt_logprobs", f"null or an integer in [0, {self.MAX_LOGPROBS}]", self.prompt_logprobs)
        if self.structured is not None:
            from .structured import StructuredOutput

            if not isinstance(self.structured, StructuredOutput):
                bad("structured", "null or a StructuredOutput", self.structured)

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


def _uses_processors(p: SamplingParams) -> bool:
    """Whether a row needs any logits processing before it is sampled (one cheap
    check per row; the common case fails every test and costs nothing more)."""
    return bool(p.logit_bias or p.min_tokens or p.bad_words_token_ids or p.repetition_penalty != 1.0
                or p.frequency_penalty or p.presence_penalty)


_NO_HISTORY = ((), ())


def _ends_with(output_ids, prefix: list[int]) -> bool:
    k = len(prefix)
    return len(output_ids) >= k and list(output_ids[len(output_ids) - k:]) == prefix


def _process(logits: torch.Tensor, rows: list[int], params: list[SamplingParams],
             histories, eos_ids: list[int], token_bitmask, bitmask_rows) -> tuple[torch.Tensor, dict[int, str]]:
    """The logits processors, on a float32 copy of `rows` only ([R, V]), in vLLM's
    order: logit_bias, min_tokens, bad words, repetition / frequency / presence
    penalties, the structured-output bitmask. Python runs per row only to collect
    token ids; every change to the logits is one batched tensor op. Returns the
    processed rows and {row: error} for rows that cannot be processed."""
    V = logits.shape[-1]
    dev = logits.device
    # A copy (the caller's logits are never changed); index_select: advanced indexing
    # with a list copies rows several times slower on the CPU.
    sub = logits.clone() if len(rows) == logits.shape[0] else logits.index_select(0, torch.tensor(rows, device=dev))
    errors: dict[int, str] = {}
    bias_r, bias_t, bias_v = [], [], []
    ban_r, ban_t = [], []
    pen = []  # (position in sub, row)
    for j, i in enumerate(rows):
        p = params[i]
        prompt_ids, output_ids = (histories[i] if histories is not None else None) or _NO_HISTORY
        if p.logit_bias:
            for t, v in p.logit_bias.items():
                if not 0 <= t < V:
                    errors[i] = f"logit_bias token id {t} is outside the vocabulary [0, {V})"
                    continue
                bias_r.append(j)
                bias_t.append(t)
                bias_v.append(float(v))
        if p.min_tokens and len(output_ids) < p.min_tokens:
            for t in (*eos_ids, *p.stop_token_ids):
                if 0 <= t < V:
                    ban_r.append(j)
                    ban_t.append(t)
        for w in p.bad_words_token_ids:
            if 0 <= w[-1] < V and (len(w) == 1 or _ends_with(output_ids, w[:-1])):
                ban_r.append(j)
                ban_t.append(w[-1])
        if p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
            pen.append((j, i))

    if bias_r:
        sub.index_put_((torch.tensor(bias_r, device=dev), torch.tensor(bias_t, device=dev)),
                       torch.tensor(bias_v, device=dev, dtype=sub.dtype), accumulate=True)
    if ban_r:
        sub.index_put_((torch.tensor(ban_r, device=dev), torch.tensor(ban_t, device=dev)),
                       torch.tensor(float("-inf"), device=dev, dtype=sub.dtype))
    if pen:
        _apply_penalties(sub, pen, params, histories, V)
    if token_bitmask is not None and bitmask_rows:
        from .structured import apply_bitmask

        pos = {i: j for j, i in enumerate(rows)}
        at = [pos[i] for i in bitmask_rows]
        apply_bitmask(sub, token_bitmask, None if at == list(range(len(rows))) else at)
    return sub, errors


def _history_keys(rows: list[int], ids_of, V: int, dev) -> torch.Tensor:
    """The flat keys k * V + token of the ids `ids_of(k)` of each row k (ids outside
    the vocabulary dropped), as one long tensor: Python only concatenates lists."""
    r, t = [], []
    for k in rows:
        ids = ids_of(k)
        r.extend([k] * len(ids))
        t.extend(ids)
    r = torch.tensor(r, device=dev, dtype=torch.long)
    t = torch.tensor(t, device=dev, dtype=torch.long)
    ok = (t >= 0) & (t < V)
    return (r * V + t)[ok]


def _apply_penalties(sub: torch.Tensor, pen: list[tuple[int, int]], params: list[SamplingParams],
                     histories, V: int) -> None:
    """vLLM's apply_penalties on the rows `pen` of `sub`, in place: the repetition
    penalty over tokens in the prompt or output (logit > 0: / p, else * p), then
    logit -= frequency_penalty * count and presence_penalty * (count > 0) over the
    output tokens. Only the (row, token) pairs a history holds can change, so they
    are gathered, changed and scattered back: no [R, V] tensor, and exactly vLLM's
    dense result (elsewhere it divides or multiplies by 1 and subtracts 0)."""
    dev = sub.device
    ps = [params[i] for _, i in pen]
    hist = [(histories[i] if histories is not None else None) or _NO_HISTORY for _, i in pen]
    at = torch.tensor([j for j, _ in pen], device=dev)  # row of sub for each penalised row k
    ks = range(len(pen))
    out_keys = _history_keys(ks, lambda k: hist[k][1], V, dev)

    def values(per_row: list[float], k: torch.Tensor) -> torch.Tensor:
        return torch.tensor(per_row, device=dev, dtype=sub.dtype)[k]

    if any(p.repetition_penalty != 1.0 for p in ps):
        keys = torch.unique(torch.cat([out_keys, _history_keys(ks, lambda k: hist[k][0], V, dev)]))
        k, t = keys // V, keys % V
        where = (at[k], t)
        x = sub[where]
        rep = values([p.repetition_penalty for p in ps], k)
        sub[where] = torch.where(x > 0, x / rep, x * rep)
    if any(p.frequency_penalty or p.presence_penalty for p in ps):
        keys, counts = torch.unique(out_keys, return_counts=True)
        k, t = keys // V, keys % V
        where = (at[k], t)
        x = sub[where] - values([p.frequency_penalty for p in ps], k) * counts.to(sub.dtype)
        sub[where] = x - values([p.presence_penalty for p in ps], k)  # count > 0 for every key here


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[Optional[torch.Generator]],
           histories: Optional[Sequence[tuple[list[int], list[int]]]] = None, eos_ids: Iterable[int] = (),
           token_bitmask: Optional[torch.Tensor] = None, bitmask_rows: Optional[Sequence[int]] = None,
           ) -> list[SampledToken]:
    """logits: [N, V], one row per sequence, in the model's dtype; computed on in
    float32 (exact for bf16; PyTorch's bf16 argmax ran ~4x slower than upcast +
    float32 argmax on the CPU). Returns one SampledToken per row; a row that cannot
    be sampled gets `error` set instead of failing the others.

    histories: one (prompt_ids, output_ids) per row (None: no history), for the
    penalties, min_tokens and bad words. eos_ids: what min_tokens masks, with each
    row's stop_token_ids. token_bitmask: int32 [R, ceil(V / 32)] of allowed tokens
    for the rows `bitmask_rows` (None: every row). Logprobs are always of the raw
    logits; only rows that use a processor are copied and processed (see _process)."""
    logits = logits.float()
    greedy_ids = platform.greedy_argmax(logits).tolist()
    want_logprobs = [i for i, p in enumerate(params) if p.logprobs is not None]
    logprobs = logits[want_logprobs].log_softmax(-1) if want_logprobs else None

    rows = [i for i, p in enumerate(params) if _uses_processors(p)]
    if token_bitmask is not None:
        # bitmask_rows None: the bitmask has a row for every logits row.
        bitmask_rows = list(range(len(params))) if bitmask_rows is None else [int(i) for i in bitmask_rows]
        if len(bitmask_rows) != token_bitmask.shape[0]:
            raise ValueError(f"token_bitmask has {token_bitmask.shape[0]} rows for {len(bitmask_rows)} bitmask_rows")
        if bitmask_rows:
            rows = sorted(set(rows).union(bitmask_rows))
    pos: dict[int, int] = {}
    errors: dict[int, str] = {}
    processed = None
    if rows:
        eos = [int(t) for t in eos_ids]
        processed, errors = _process(logits, rows, params, histories, eos, token_bitmask, bitmask_rows)
        pos = {i: j for j, i in enumerate(rows)}
        # amax is NaN (not -inf) for a NaN row: that keeps the NaN row's own behaviour.
        for j, dead in enumerate((processed.amax(-1) == float("-inf")).tolist()):
            if dead and rows[j] not in errors:
                errors[rows[j]] = ("no token can be sampled: logit_bias, min_tokens, bad_words and the "
                                   "structured-output mask together exclude every token")
        greedy_at = [j for j, i in enumerate(rows) if params[i].greedy and i not in errors]
        if greedy_at:
            best = platform.greedy_argmax(processed if len(greedy_at) == len(rows) else
                                          processed.index_select(0, torch.tensor(greedy_at, device=processed.device)))
            for j, t in zip(greedy_at, best.tolist()):
                greedy_ids[rows[j]] = t

    out = []
    for i, p in enumerate(params):
        if errors and i in errors:
            out.append(SampledToken(greedy_ids[i], error=errors[i]))
            continue
        if p.greedy:
            out.append(SampledToken(greedy_ids[i]))
            continue
        row = processed[pos[i]] if pos and i in pos else logits[i]
        try:
            out.append(SampledToken(_sample_row(row, p, generators[i])))
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
