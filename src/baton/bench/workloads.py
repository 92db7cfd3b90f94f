"""Benchmark workloads: which requests to send, and when.

A workload is a list of `BenchRequest`s: a prompt (token ids, or text for a
JSONL file that gives text), its length in tokens, and the exact number of
output tokens to produce (forced with max_tokens + ignore_eos, so every system
under test does the same work).

- `random`: lengths drawn uniformly in [len*(1-r), len*(1+r)] (r = range ratio,
  0 gives fixed lengths), as in the common serving benchmark.
- `mixed`: widely varying, long-tailed prompt and output lengths (log-normal,
  clipped), the kind of mix where run-to-completion batching wastes compute.
- a JSONL file: one object per line with `prompt` (text or a list of token ids)
  or `prompt_len`, and `output_len` (or `max_tokens`).

Prompt token ids are made deterministically from the seed, avoiding the low ids
where tokenizers keep their special tokens. With a tokenizer, `exact_text_prompt`
turns them into text that re-encodes to exactly the target length.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

Prompt = Union[str, list[int]]


@dataclass
class BenchRequest:
    prompt: Prompt
    prompt_len: int
    output_len: int

    def to_dict(self) -> dict:
        return asdict(self)


def _token_range(vocab_size: int) -> tuple[int, int]:
    """Ids used for synthetic prompts: skip the low ids (special tokens live there)."""
    lo = min(max(vocab_size // 16, 1), vocab_size - 1)
    return lo, vocab_size


def synthetic_ids(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    lo, hi = _token_range(vocab_size)
    return [rng.randrange(lo, hi) for _ in range(n)]


def random_workload(num: int, input_len: int, output_len: int, vocab_size: int, range_ratio: float = 0.0,
                    seed: int = 0) -> list[BenchRequest]:
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range ratio must be in [0, 1); got {range_ratio}")
    if input_len < 1 or output_len < 1:
        raise ValueError("input and output lengths must be >= 1")
    rng = random.Random(seed)

    def draw(n):
        lo, hi = max(1, int(n * (1 - range_ratio))), max(1, int(n * (1 + range_ratio)))
        return rng.randint(lo, hi)

    out = []
    for _ in range(num):
        p, o = draw(input_len), draw(output_len)
        out.append(BenchRequest(synthetic_ids(rng, p, vocab_size), p, o))
    return out


def _lognormal_int(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(math.exp(rng.gauss(math.log(median), sigma))))))


def mixed_workload(num: int, vocab_size: int, prompt_range: tuple[int, int] = (16, 512),
                   output_range: tuple[int, int] = (8, 256), seed: int = 0,
                   prompt_median: Optional[float] = None, output_median: Optional[float] = None,
                   sigma: float = 1.0) -> list[BenchRequest]:
    """Long-tailed lengths: log-normal (sigma 1) around a median, clipped to the range.
    Default medians: twice the shortest prompt and four times the shortest output
    (32 and 32 tokens for the default ranges 16-512 and 8-256), so most requests are
    short and a few are very long. The first request is given the longest output and
    the middle one the longest prompt, so the tails are always present."""
    rng = random.Random(seed)
    pm = prompt_median or min(2 * prompt_range[0], prompt_range[1])
    om = output_median or min(4 * output_range[0], output_range[1])
    out = []
    for i in range(num):
        p = _lognormal_int(rng, pm, sigma, *prompt_range)
        o = _lognormal_int(rng, om, sigma, *output_range)
        if num >= 4 and i == 0:
            o = output_range[1]
        if num >= 4 and i == num // 2:
            p = prompt_range[1]
        out.append(BenchRequest(synthetic_ids(rng, p, vocab_size), p, o))
    return out


def jsonl_workload(path: Union[str, Path], vocab_size: int, tokenizer=None, num: Optional[int] = None,
                   seed: int = 0) -> list[BenchRequest]:
    rng = random.Random(seed)
    out = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not JSON: {e}") from None
        olen = d.get("output_len", d.get("max_tokens"))
        if not isinstance(olen, int) or olen < 1:
            raise ValueError(f"{path}:{lineno}: needs an integer output_len >= 1")
        if "prompt" in d:
            prompt = d["prompt"]
            if isinstance(prompt, str):
                if tokenizer is None:
                    raise ValueError(f"{path}:{lineno}: a text prompt needs a model with a tokenizer")
                ids = tokenizer.encode(prompt)
                out.append(BenchRequest(prompt, len(ids), olen))
            elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                out.append(BenchRequest(list(prompt), len(prompt), olen))
            else:
                raise ValueError(f"{path}:{lineno}: prompt must be text or a non-empty list of token ids")
        elif isinstance(d.get("prompt_len"), int) and d["prompt_len"] >= 1:
            n = d["prompt_len"]
            out.append(BenchRequest(synthetic_ids(rng, n, vocab_size), n, olen))
        else:
            raise ValueError(f"{path}:{lineno}: needs `prompt` or an integer `prompt_len` >= 1")
        if num is not None and len(out) >= num:
            break
    if not out:
        raise ValueError(f"{path}: no requests")
    return out


def make_workload(dataset: str, num: int, vocab_size: int, *, input_len: int = 128, output_len: int = 128,
                  range_ratio: float = 0.0, seed: int = 0, tokenizer=None,
                  prompt_range: tuple[int, int] = (16, 512), output_range: tuple[int, int] = (8, 256)
                  ) -> list[BenchRequest]:
    if dataset == "random":
        return random_workload(num, input_len, output_len, vocab_size, range_ratio, seed)
    if dataset == "mixed":
        return mixed_workload(num, vocab_size, prompt_range, output_range, seed)
    if dataset.endswith(".jsonl") or Path(dataset).is_file():
        return jsonl_workload(dataset, vocab_size, tokenizer, num, seed)
    raise ValueError(f"dataset must be random, mixed or a .jsonl file; got {dataset!r}")


def as_token_ids(req: BenchRequest, tokenizer=None) -> list[int]:
    if isinstance(req.prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer")
        return tokenizer.encode(req.prompt)
    return list(req.prompt)


def exact_text_prompt(ids: Sequence[int], tokenizer, target_len: int, rng: Optional[random.Random] = None) -> str:
    """Text whose encoding has exactly `target_len` tokens (decode, re-encode, then
    trim or pad with more synthetic ids until it fits). Falls back to the closest
    length found after a few rounds."""
    rng = rng or random.Random(len(ids))
    ids = list(ids)
    text = tokenizer.decode(ids)
    best = text
    for _ in range(8):
        enc = tokenizer.encode(text)
        if len(enc) == target_len:
            return text
        best = text
        if len(enc) > target_len:
            ids = ids[: max(1, len(ids) - (len(enc) - target_len))]
        else:
            ids = ids + synthetic_ids(rng, target_len - len(enc), tokenizer.vocab_size)
        text = tokenizer.decode(ids)
    return best


def arrival_offsets(num: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times (seconds after the start) per request, in order.

    inf: all at 0. Otherwise gaps are gamma(shape=burstiness, scale=1/(rate*burstiness))
    (burstiness 1 is Poisson), and the cumulative delays are rescaled so the last
    arrival lands at num/rate, as the common serving benchmark does."""
    if num <= 0:
        return []
    if math.isinf(request_rate) and request_rate > 0:
        return [0.0] * num
    if request_rate <= 0:
        raise ValueError(f"request rate must be > 0 or inf; got {request_rate}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0; got {burstiness}")
    rng = random.Random(seed)
    theta = 1.0 / (request_rate * burstiness)
    t, out = 0.0, []
    for _ in range(num):
        t += rng.gammavariate(burstiness, theta)
        out.append(t)
    target = num / request_rate
    if out[-1] > 0:
        out = [x * target / out[-1] for x in out]
    return out


def workload_summary(reqs: Sequence[BenchRequest]) -> dict:
    p = [r.prompt_len for r in reqs]
    o = [r.output_len for r in reqs]
    return {
        "num_requests": len(reqs),
        "prompt_len": {"min": min(p), "mean": sum(p) / len(p), "max": max(p), "total": sum(p)},
        "output_len": {"min": min(o), "mean": sum(o) / len(o), "max": max(o), "total": sum(o)},
    }
