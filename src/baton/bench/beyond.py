"""`baton bench beyond`: what re-batching makes possible beyond the paper (issue 6).

(a) priority: latency of high-priority queries under a saturating low-priority
    load, with and without preemption;
(b) stall-free prefill: inter-token latency of running queries while long prompts
    arrive, with and without the per-iteration prefill bound;
(c) memory: throughput of a mixed workload at several KV budgets.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from ..engine import EngineConfig, LLMEngine
from ..cache import KVSpec, resolve_kv_dtype
from ..sampling import SamplingParams
from .metrics import percentile


@dataclass
class Req:
    rid: str
    prompt: list[int]
    max_tokens: int
    at_step: int = 0  # arrival: the engine iteration at which it is added
    priority: int = 0
    tag: str = ""
    token_times: list[float] = field(default_factory=list)
    added: Optional[float] = None
    preemptions: int = 0


def run(engine: LLMEngine, reqs: list[Req], budget_check: bool = True) -> dict:
    """Step the engine, adding each request at its arrival iteration; records the
    wall time of every token of every request."""
    by_id = {r.rid: r for r in reqs}
    pending = sorted(reqs, key=lambda r: r.at_step)
    step, t0, finished = 0, time.perf_counter(), 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0].at_step <= step:
            r = pending.pop(0)
            r.added = time.perf_counter()
            engine.add_request(r.rid, r.prompt, SamplingParams(max_tokens=r.max_tokens, temperature=0,
                                                                ignore_eos=True, priority=r.priority))
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            by_id[o.request_id].token_times.extend([now] * len(o.new_token_ids))
            if o.finished:
                finished += 1
                by_id[o.request_id].preemptions = o.metrics["num_preemptions"]
        if budget_check:
            assert engine.budget.used <= engine.budget.limit
        step += 1
    assert finished == len(reqs), "a request was lost"
    return {"duration_s": time.perf_counter() - t0, "iterations": step}


def ms(x) -> float:
    return float(x) * 1000.0


def tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab - 1) for _ in range(n)]


def make_engine(model, tok, **kw) -> LLMEngine:
    kw.setdefault("kv_cache_bytes", 4 << 30)
    return LLMEngine(EngineConfig(policy="baton-pd", **kw), model=model, tokenizer=tok)


# ---------------------------------------------------------------- (a) priority
def priority_experiment(model, tok, quick: bool) -> dict:
    rng = random.Random(1)
    vocab = model.cfg.vocab_size
    n_low, n_high, rows = (12, 4, 4) if quick else (32, 12, 8)
    results = {}
    for name, max_pre in (("no preemption", 0), ("preemption", 2)):
        rng.seed(1)
        reqs = [Req(f"low{i}", tokens(rng, 64, vocab), 96 if quick else 160, 0, priority=10, tag="low")
                for i in range(n_low)]
        reqs += [Req(f"high{i}", tokens(rng, 32, vocab), 16, 10 + 12 * i, priority=0, tag="high")
                 for i in range(n_high)]
        engine = make_engine(model, tok, max_num_seqs=rows, max_preemptions=max_pre)
        summary = run(engine, reqs)
        high = [r for r in reqs if r.tag == "high"]
        ttft = [r.token_times[0] - r.added for r in high]
        second = [r.token_times[1] - r.added for r in high]
        e2e = [r.token_times[-1] - r.added for r in high]
        low_tokens = sum(len(r.token_times) for r in reqs if r.tag == "low")
        results[name] = {
            "high_p99_ttft_ms": ms(percentile(ttft, 99)), "high_mean_ttft_ms": ms(np.mean(ttft)),
            "high_p99_time_to_second_token_ms": ms(percentile(second, 99)),
            "high_p99_e2e_ms": ms(percentile(e2e, 99)), "high_mean_e2e_ms": ms(np.mean(e2e)),
            "preemptions": engine.policy.stats.preemptions,
            "total_output_tok_s": sum(len(r.token_times) for r in reqs) / summary["duration_s"],
            "low_output_tokens": low_tokens, **summary,
        }
    return {"setup": {"low_priority": n_low, "high_priority": n_high, "max_num_seqs": rows,
                      "low": "64-token prompts, all at t=0", "high": "32-token prompts, 16 tokens, arriving "
                      "every 12 iterations"}, "results": results}


# ---------------------------------------------------------------- (b) stall-free prefill
def prefill_experiment(model, tok, quick: bool) -> dict:
    rng = random.Random(2)
    vocab = model.cfg.vocab_size
    long_len = 512 if quick else 2048
    n_run, n_long = (4, 2) if quick else (8, 3)
    results = {}
    for name, bound in (("unbounded prefill", 1 << 30), ("prefill bound 256", 256)):
        rng.seed(2)
        reqs = [Req(f"run{i}", tokens(rng, 32, vocab), 64 if quick else 160, 0, tag="run") for i in range(n_run)]
        reqs += [Req(f"long{i}", tokens(rng, long_len, vocab), 8, 8 + 25 * i, tag="long") for i in range(n_long)]
        engine = make_engine(model, tok, max_num_seqs=n_run + n_long, max_prefill_tokens=bound, pool_size=2)
        summary = run(engine, reqs)
        itl = [b - a for r in reqs if r.tag == "run" for a, b in zip(r.token_times, r.token_times[1:])]
        long_ttft = [r.token_times[0] - r.added for r in reqs if r.tag == "long"]
        results[name] = {"p99_itl_ms": ms(percentile(itl, 99)), "max_itl_ms": ms(max(itl)), "mean_itl_ms": ms(np.mean(itl)),
                         "median_itl_ms": ms(percentile(itl, 50)), "long_mean_ttft_ms": ms(np.mean(long_ttft)),
                         "max_prefill_tokens": bound if bound < (1 << 30) else None, **summary}
    return {"setup": {"running": n_run, "long_prompts": n_long, "long_prompt_tokens": long_len},
            "results": results}


# ---------------------------------------------------------------- (c) memory budgets
def memory_experiment(model, tok, quick: bool) -> dict:
    rng = random.Random(3)
    vocab = model.cfg.vocab_size
    n, rows = (16, 8) if quick else (48, 16)
    spec = [(rng.randint(16, 256), rng.choice([16, 32, 64, 128, 192])) for _ in range(n)]
    slot = KVSpec.of(model.cfg, resolve_kv_dtype("auto", model.dtype), model.device).slot_bytes  # the engines' KV dtype
    longest = max(p + o for p, o in spec)
    full = rows * longest * slot  # the whole batch at the longest final length
    results = {}
    fractions = (0.125, 0.25, 0.5, 1.0, 2.0)
    for frac in fractions:
        budget = max(int(full * frac), 3 * longest * slot)
        reqs = [Req(f"q{i}", tokens(rng, p, vocab), o) for i, (p, o) in enumerate(spec)]
        engine = make_engine(model, tok, max_num_seqs=rows, kv_cache_bytes=budget)
        summary = run(engine, reqs)
        out_tokens = sum(len(r.token_times) for r in reqs)
        results[f"{frac:g}"] = {"kv_budget_bytes": budget, "kv_peak_bytes": engine.budget.peak,
                                "output_tok_s": out_tokens / summary["duration_s"],
                                "requests_s": n / summary["duration_s"],
                                "preemptions": engine.policy.stats.preemptions, **summary}
    return {"setup": {"requests": n, "max_num_seqs": rows, "full_batch_bytes": full,
                      "budget": "fraction of the bytes of max_num_seqs rows at the longest final length"},
            "results": results}


# ---------------------------------------------------------------- report
def plot(data: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def grouped_bars(results: dict, keys: list[str], labels: list[str], ylabel: str, title: str, name: str):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        x = np.arange(len(keys))
        for i, (setting, r) in enumerate(results.items()):
            ax.bar(x + 0.38 * i, [r[k] for k in keys], 0.38, label=setting)
        ax.set_xticks(x + 0.19, labels)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        files.append(name)

    files = []
    grouped_bars(data["priority"]["results"], ["high_p99_ttft_ms", "high_p99_time_to_second_token_ms",
                                               "high_p99_e2e_ms"], ["p99 TTFT", "p99 to 2nd token", "p99 E2E"],
                 "ms (high-priority queries)", "Priority under saturating low-priority load", "priority.png")
    grouped_bars(data["prefill"]["results"], ["median_itl_ms", "p99_itl_ms", "max_itl_ms"],
                 ["median ITL", "p99 ITL", "max ITL"], "ms (running queries)",
                 f"ITL while {data['prefill']['setup']['long_prompt_tokens']}-token prompts arrive", "prefill_itl.png")

    c = data["memory"]["results"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    fr = [float(k) for k in c]
    ax.plot(fr, [r["output_tok_s"] for r in c.values()], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV budget (fraction of full batch at longest length)")
    ax.set_ylabel("output tok/s")
    ax.set_title("Throughput vs KV memory budget (baton-pd)")
    fig.tight_layout()
    fig.savefig(out / "memory_budget.png", dpi=120)
    files.append("memory_budget.png")
    plt.close("all")
    return files


def table(rows: dict, cols: list[str]) -> str:
    head = "| setting | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    body = ""
    for name, r in rows.items():
        cells = [f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        body += f"| {name} | " + " | ".join(cells) + " |\n"
    return head + body


def main(model_path: Optional[str], dtype: str, quick: bool, out_dir: str, num_threads: Optional[int],
         quantization: Optional[str] = None) -> dict:
    import torch

    from ..models.loader import load_model
    from .report import machine_info

    if num_threads:
        torch.set_num_threads(num_threads)
    model, cfg = load_model(model_path, dtype, quantization=quantization)
    tok = None  # token-id prompts: no tokenizer needed
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {"machine": machine_info(model.dtype, torch.get_num_threads()), "quick": quick,
            "model": model_path or "default", "quantization": quantization or "none"}
    for key, fn in tqdm([("priority", priority_experiment), ("prefill", prefill_experiment),
                         ("memory", memory_experiment)], desc="beyond"):
        data[key] = fn(model, tok, quick)
    plot(data, out)
    (out / "beyond.json").write_text(json.dumps(data, indent=2))
    md = ["# Beyond the paper: preemption, stall-free prefill, memory budgets", "",
          f"Machine: {data['machine']}", "",
          "## (a) High-priority queries under a saturating low-priority load (baton-pd)", "",
          f"Setup: {data['priority']['setup']}", "",
          table(data["priority"]["results"], ["high_p99_ttft_ms", "high_p99_time_to_second_token_ms",
                                               "high_p99_e2e_ms", "preemptions", "total_output_tok_s"]),
          "![priority](priority.png)", "",
          "## (b) Inter-token latency of running queries while long prompts arrive", "",
          f"Setup: {data['prefill']['setup']}", "",
          table(data["prefill"]["results"], ["median_itl_ms", "p99_itl_ms", "max_itl_ms", "long_mean_ttft_ms"]),
          "![prefill](prefill_itl.png)", "",
          "## (c) Throughput at several KV memory budgets", "",
          f"Setup: {data['memory']['setup']}", "",
          table(data["memory"]["results"], ["kv_budget_bytes", "kv_peak_bytes", "output_tok_s", "preemptions"]),
          "![memory](memory_budget.png)", ""]
    (out / "report.md").write_text("\n".join(md))
    print("\n".join(md))
    return data


def add_parser(subparsers) -> None:
    from ..cli_args import add_quantization_arg

    p = subparsers.add_parser("beyond", help="preemption, stall-free prefill and memory budgets (beyond the paper)")
    p.add_argument("--model", default=None, help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto")
    add_quantization_arg(p)
    p.add_argument("--quick", action="store_true", help="a small version (about a minute)")
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results/beyond")
    p.set_defaults(func=cmd_beyond)


def cmd_beyond(args) -> int:
    from ..cli_args import quantization_value

    main(args.model, args.dtype, args.quick, args.out, args.num_threads, quantization_value(args))
    return 0
