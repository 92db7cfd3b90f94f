"""Latency and throughput metrics shared by the offline and the serving benchmark.

Definitions follow the common serving benchmark (see docs/bench-conventions.md):
TTFT = send (or arrival) to first token; TPOT = (latency - TTFT) / (tokens - 1)
for requests with more than one token; ITL = every gap between token chunks;
E2E = send to last token. Run throughput counts successful requests only over
duration = first send to last completion. Goodput = requests/s meeting ALL the
given SLOs (milliseconds).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

SLO_KEYS = ("ttft", "tpot", "e2el")


@dataclass
class RequestRecord:
    prompt_len: int
    output_len: int = 0             # tokens actually produced
    expected_output_len: int = 0    # tokens asked for
    send_time: float = 0.0          # seconds since the run started
    ttft: float = 0.0               # seconds
    latency: float = 0.0            # seconds, send to last token
    itl: list[float] = field(default_factory=list)
    success: bool = False
    error: str = ""

    @property
    def tpot(self) -> Optional[float]:
        if self.output_len > 1:
            return (self.latency - self.ttft) / (self.output_len - 1)
        return None

    @property
    def finish_time(self) -> float:
        return self.send_time + self.latency

    def token_times(self) -> list[float]:
        """Times (since run start) at which token chunks arrived."""
        t = self.send_time + self.ttft
        out = [t]
        for gap in self.itl:
            t += gap
            out.append(t)
        return out


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return 0.0
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    k = (len(xs) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (k - lo))


def summarize(values: Sequence[float], scale: float = 1.0, percentiles: Iterable[float] = (50, 90, 99)) -> dict:
    """mean, median, std (population), min, max and percentiles of `values` * scale."""
    vs = [v * scale for v in values]
    if not vs:
        return {"mean": 0.0, "median": 0.0, "std": 0.0, "min": 0.0, "max": 0.0,
                **{f"p{int(p) if float(p).is_integer() else p}": 0.0 for p in percentiles}, "count": 0}
    mean = sum(vs) / len(vs)
    std = math.sqrt(sum((v - mean) ** 2 for v in vs) / len(vs))
    out = {"mean": mean, "median": percentile(vs, 50), "std": std, "min": min(vs), "max": max(vs)}
    for p in percentiles:
        out[f"p{int(p) if float(p).is_integer() else p}"] = percentile(vs, p)
    out["count"] = len(vs)
    return out


def parse_goodput(items: Optional[Sequence[str]]) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds)."""
    slos = {}
    for item in items or []:
        for part in item.replace(",", " ").split():
            if ":" not in part:
                raise ValueError(f"goodput SLO must look like KEY:MS with KEY in {', '.join(SLO_KEYS)}; got {part!r}")
            k, v = part.split(":", 1)
            k = k.strip().lower()
            if k not in SLO_KEYS:
                raise ValueError(f"goodput SLO key must be one of {', '.join(SLO_KEYS)}; got {k!r}")
            try:
                ms = float(v)
            except ValueError:
                raise ValueError(f"goodput SLO {k} needs a number of milliseconds; got {v!r}") from None
            if ms < 0:
                raise ValueError(f"goodput SLO {k} must be >= 0 ms; got {ms}")
            slos[k] = ms
    return slos


def meets_slos(r: RequestRecord, slos: dict[str, float]) -> bool:
    vals = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency}
    return all(vals[k] * 1000.0 <= ms for k, ms in slos.items())


def max_concurrency_observed(records: Sequence[RequestRecord]) -> int:
    events = []
    for r in records:
        events.append((r.send_time, 1))
        events.append((r.finish_time, -1))
    events.sort(key=lambda e: (e[0], e[1]))  # an end at the same instant as a start goes first
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def max_tokens_per_second(records: Sequence[RequestRecord]) -> float:
    """Most output tokens finished in any one-second bucket since the start."""
    buckets: dict[int, int] = {}
    for r in records:
        times = r.token_times()
        # a chunk may carry several tokens: spread the count over the chunks evenly
        per = r.output_len / len(times) if times else 0
        for t in times:
            b = int(t)
            buckets[b] = buckets.get(b, 0) + per
    return float(max(buckets.values(), default=0.0))


def run_metrics(records: Sequence[RequestRecord], duration: float, slos: Optional[dict[str, float]] = None) -> dict:
    """The run-level metrics, with key names of the common serving benchmark."""
    ok = [r for r in records if r.success]
    slos = slos or {}
    duration = max(duration, 1e-9)
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    m = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "request_goodput": (sum(meets_slos(r, slos) for r in ok) / duration) if slos else None,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "max_output_tokens_per_s": max_tokens_per_second(ok),
        "max_concurrent_requests": max_concurrency_observed(ok),
    }
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [r.tpot for r in ok if r.tpot is not None],
        "itl": [g for r in ok for g in r.itl],
        "e2el": [r.latency for r in ok],
    }
    for name, vals in series.items():
        s = summarize(vals, 1000.0)
        m[f"mean_{name}_ms"] = s["mean"]
        m[f"median_{name}_ms"] = s["median"]
        m[f"std_{name}_ms"] = s["std"]
        m[f"p90_{name}_ms"] = s["p90"]
        m[f"p99_{name}_ms"] = s["p99"]
    return m
