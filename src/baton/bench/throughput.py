"""`baton bench throughput`: offline throughput of one or several policies.

Weights are loaded once and one LLMEngine is built per policy around them, so
policies differ only in scheduling. Every request's output length is forced
(max_tokens + ignore_eos, greedy), so every policy does the same work. Requests
are added to the engine when their arrival time has passed (all at t=0 by
default), between steps.

Per policy it reports requests/s, output tok/s, total time, TTFT/TPOT/ITL/E2E
distributions, the idle-computation share and KV padding waste (from the
policy's own accounting), and decode-only step throughput: the tokens produced
in iterations that processed no prompt token, over the time of those
iterations (used for the roofline comparison).
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .metrics import RequestRecord, run_metrics
from .workloads import BenchRequest, arrival_offsets, as_token_ids

ALL_POLICIES = ("static", "orca", "baton", "baton-pd")


@dataclass
class Loaded:
    model: object
    cfg: object
    tokenizer: object
    path: str
    dtype: torch.dtype


def load_for_bench(model_path: Optional[str], dtype: str = "auto", device: str = "cpu",
                   quantization: Optional[str] = None, native_kernels: bool = True) -> Loaded:
    from ..models.loader import default_model_path, load_model
    from ..tokenizer import load_tokenizer

    path = model_path or default_model_path()
    model, cfg = load_model(path, dtype, device, quantization=quantization, native_kernels=native_kernels)
    tok = load_tokenizer(path, cfg.eos_token_ids)
    return Loaded(model, cfg, tok, str(path), model.dtype)


def parse_policies(text: str) -> list[str]:
    if text in ("all", ""):
        return list(ALL_POLICIES)
    pols = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in pols if p not in ALL_POLICIES]
    if bad:
        raise ValueError(f"unknown policy {bad[0]!r}; choose from {', '.join(ALL_POLICIES)} or all")
    return pols


def build_engine(loaded: Loaded, policy: str, max_num_seqs: int, kv_cache_bytes: Optional[int] = None,
                 max_prefill_tokens: int = 1024, record_timeline: bool = False):
    from ..engine import EngineConfig, LLMEngine

    cfg = EngineConfig(model=loaded.path, policy=policy, max_num_seqs=max_num_seqs, kv_cache_bytes=kv_cache_bytes,
                       max_prefill_tokens=max_prefill_tokens, record_timeline=record_timeline)
    return LLMEngine(cfg, model=loaded.model, tokenizer=loaded.tokenizer)


def warmup(loaded: Loaded, policy: str, max_num_seqs: int = 2) -> None:
    """A couple of tiny requests so one-time kernel setup is not timed."""
    from ..sampling import SamplingParams

    eng = build_engine(loaded, policy, max_num_seqs, kv_cache_bytes=64 << 20)
    lo = max(loaded.cfg.vocab_size // 16, 1)
    for i in range(2):
        eng.add_request(f"warmup-{i}", [lo + j for j in range(8 + 4 * i)],
                        SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()


def run_policy(loaded: Loaded, policy: str, requests: Sequence[BenchRequest], *, max_num_seqs: int,
               kv_cache_bytes: Optional[int] = None, max_prefill_tokens: int = 1024,
               request_rate: float = float("inf"), burstiness: float = 1.0, seed: int = 0,
               record_timeline: bool = False, progress: bool = True, desc: Optional[str] = None,
               do_warmup: bool = True) -> dict:
    """Run `requests` through a fresh engine with `policy`; returns the result row."""
    from ..sampling import SamplingParams

    if do_warmup:
        warmup(loaded, policy)
    gc.collect()
    engine = build_engine(loaded, policy, max_num_seqs, kv_cache_bytes, max_prefill_tokens, record_timeline)
    prompts = [as_token_ids(r, loaded.tokenizer) for r in requests]
    offsets = arrival_offsets(len(requests), request_rate, burstiness, seed)
    order = sorted(range(len(requests)), key=lambda i: offsets[i])
    st = engine.policy.stats
    n = len(requests)
    token_times: dict[str, list[float]] = {}
    done: dict[str, dict] = {}
    outputs_len: dict[str, int] = {}
    decode = {"steps": 0, "time": 0.0, "tokens": 0, "rows": 0}
    steps = 0
    bar = tqdm(total=n, desc=desc or policy, unit="req", disable=not progress, leave=False)
    t0 = time.monotonic()
    nxt = 0
    while nxt < n or engine.has_unfinished_requests():
        now = time.monotonic()
        while nxt < n and t0 + offsets[order[nxt]] <= now:
            i = order[nxt]
            r = requests[i]
            engine.add_request(str(i), prompts[i],
                               SamplingParams(max_tokens=r.output_len, temperature=0.0, ignore_eos=True),
                               arrival_time=t0 + offsets[i])
            nxt += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, t0 + offsets[order[nxt]] - time.monotonic()))
            continue
        c0, u0 = st.computed_token_rows, st.useful_tokens
        ts = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - ts
        now = time.monotonic()
        steps += 1
        dc, du = st.computed_token_rows - c0, st.useful_tokens - u0
        produced = 0
        for o in outs:
            if o.new_token_ids:
                produced += len(o.new_token_ids)
                token_times.setdefault(o.request_id, []).append(now)
            if o.finished:
                done[o.request_id] = o.metrics or {}
                outputs_len[o.request_id] = len(o.outputs[0].token_ids)
                bar.update(1)
        if dc > 0 and du == produced:  # no prompt token processed: a pure decode iteration
            decode["steps"] += 1
            decode["time"] += dt
            decode["tokens"] += produced
            decode["rows"] += dc
    t_end = time.monotonic()
    bar.close()

    records = []
    mismatched = 0
    for i, r in enumerate(requests):
        rid = str(i)
        met = done.get(rid, {})
        tt = token_times.get(rid, [])
        arrival = t0 + offsets[i]
        got = outputs_len.get(rid, 0)
        mismatched += got != r.output_len
        rec = RequestRecord(prompt_len=r.prompt_len, output_len=got, expected_output_len=r.output_len,
                            send_time=offsets[i], success=rid in done)
        if rec.success:
            first = met.get("first_token_time") or (tt[0] if tt else arrival)
            fin = met.get("finish_time") or (tt[-1] if tt else arrival)
            rec.ttft = first - arrival
            rec.latency = fin - arrival
            rec.itl = [b - a for a, b in zip(tt, tt[1:])]
        records.append(rec)
    duration = (max((r.finish_time for r in records if r.success), default=0.0) - min(offsets)) if records else 0.0
    m = run_metrics(records, duration or (t_end - t0))
    s = engine.stats()
    row = {
        "policy": policy,
        "max_num_seqs": max_num_seqs,
        "num_requests": n,
        "request_rate": request_rate if request_rate != float("inf") else "inf",
        "total_time_s": duration,
        "iterations": steps,
        **m,
        "idle_share": s["idle_share"],
        "idle_token_rows": s["idle_token_rows"],
        "computed_token_rows": s["computed_token_rows"],
        "kv_padding_ratio": s["kv_padding_ratio"],
        "kv_padding_waste": (1 - 1 / s["kv_padding_ratio"]) if s["kv_padding_ratio"] else 0.0,
        "kv_bytes_peak": s["kv_bytes_peak"],
        "kv_bytes_resident_peak": s["kv_bytes_resident_peak"],
        "preemptions": s["preemptions"],
        "output_len_mismatches": mismatched,
        "decode_steps": decode["steps"],
        "decode_time_s": decode["time"],
        "decode_tokens": decode["tokens"],
        "decode_tok_s": decode["tokens"] / decode["time"] if decode["time"] else 0.0,
        "mean_decode_batch": decode["rows"] / decode["steps"] if decode["steps"] else 0.0,
        "mean_decode_live_batch": decode["tokens"] / decode["steps"] if decode["steps"] else 0.0,
    }
    for key in ("step_seconds", "forward_seconds", "overhead_share", "kv_copy_seconds", "sample_seconds", "iterations"):
        if key in s:  # engine-side timing split, when the engine reports it
            row["engine_" + key] = s[key]
    if record_timeline:
        shift = getattr(engine.policy, "_t0", t0) - t0
        row["timeline"] = [[t + shift, a, l] for t, a, l in st.timeline]
    del engine
    gc.collect()
    return row


HEADLINE = [("policy", "policy", "{}"), ("max_num_seqs", "batch", "{}"), ("completed", "done", "{}"),
            ("total_time_s", "time s", "{:.2f}"), ("request_throughput", "req/s", "{:.3f}"),
            ("output_throughput", "out tok/s", "{:.1f}"), ("decode_tok_s", "decode tok/s", "{:.1f}"),
            ("median_ttft_ms", "TTFT p50 ms", "{:.0f}"), ("p99_ttft_ms", "TTFT p99 ms", "{:.0f}"),
            ("median_tpot_ms", "TPOT p50 ms", "{:.1f}"), ("p99_tpot_ms", "TPOT p99 ms", "{:.1f}"),
            ("idle_share", "idle share", "{:.1%}"), ("kv_padding_waste", "KV pad waste", "{:.1%}")]


def format_table(rows: Sequence[dict], columns=HEADLINE) -> str:
    """A plain-text table (also valid markdown)."""
    head = [c[1] for c in columns]
    body = []
    for r in rows:
        line = []
        for key, _, fmt in columns:
            v = r.get(key)
            line.append("-" if v is None else (fmt.format(v) if not isinstance(v, str) else v))
        body.append(line)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    fmt_line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt_line(head), sep] + [fmt_line(b) for b in body])


def _tokenizer_and_vocab(model_path: Optional[str]):
    """(tokenizer or None, vocabulary size) of a local model, without loading its weights."""
    import json
    from pathlib import Path

    from ..models.loader import default_model_path
    from ..tokenizer import load_tokenizer

    path = Path(model_path or default_model_path())
    tok = load_tokenizer(str(path))
    vocab = None
    if path.is_dir() and (path / "config.json").is_file():
        vocab = json.loads((path / "config.json").read_text()).get("vocab_size")
    if vocab is None and tok is not None:
        vocab = tok.vocab_size
    if vocab is None:
        raise ValueError(f"cannot tell the vocabulary size of {path}: pass --vocab-size")
    return tok, int(vocab)
