"""`baton bench prefix`: automatic prefix caching on and off, in one run.

Workloads (token ids drawn from the seed; every request's output length forced
with max_tokens + ignore_eos, so both runs do the same decoding):

- shared: N requests sharing one long system prompt, each with a short question
  of its own, arriving at a steady rate;
- chat: C conversations of T turns; each turn resends the whole history (the
  system prompt, every earlier question and answer) and is sent when the
  conversation's previous turn has finished;
- unique: N requests with no prefix in common, all at once: what the cache costs
  when it never hits.

Per run: TTFT p50 / p99 (all requests, and the requests that hit), output tok/s,
and the cache's counters. Each workload runs with the cache off, then on, on one
engine configuration sharing the same weights.
"""
from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

from .workloads import synthetic_ids


def _pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))]


def _drive(engine, schedule, follow=None):
    """schedule: [(time offset s, id, prompt ids, output len)]; follow(id, output) -> next
    (id, prompt, output len) or None, sent when a request finishes. Returns records."""
    from ..sampling import SamplingParams

    pending = sorted(schedule, key=lambda r: r[0])
    recs, t0 = {}, time.perf_counter()
    sent = {}

    def send(rid, prompt, out_len):
        engine.add_request(rid, prompt, SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True))
        sent[rid] = time.perf_counter()

    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - t0
        while pending and pending[0][0] <= now:
            _, rid, prompt, out_len = pending.pop(0)
            send(rid, prompt, out_len)
        if not engine.has_unfinished_requests():
            time.sleep(min(0.01, max(0.0, pending[0][0] - now)) if pending else 0)
            continue
        for out in engine.step():
            rec = recs.setdefault(out.request_id, {"sent": sent[out.request_id], "first": None, "tokens": 0})
            if out.new_token_ids and rec["first"] is None:
                rec["first"] = time.perf_counter()
            if out.finished:
                rec.update(done=time.perf_counter(), tokens=len(out.outputs[0].token_ids),
                           cached=out.num_cached_tokens, prompt=len(out.prompt_token_ids))
                nxt = follow(out.request_id, out) if follow else None
                if nxt is not None:
                    send(*nxt)
    wall = time.perf_counter() - t0
    return list(recs.values()), wall


def _summary(recs, wall, engine) -> dict:
    ttft = [r["first"] - r["sent"] for r in recs]
    hits = [r["first"] - r["sent"] for r in recs if r.get("cached")]
    st = engine.stats()
    return {"requests": len(recs), "wall_s": wall, "output_tok_s": sum(r["tokens"] for r in recs) / wall,
            "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99), "ttft_mean_s": statistics.mean(ttft),
            "hit_requests": len(hits), "ttft_hit_p50_s": _pct(hits, 50), "ttft_hit_p99_s": _pct(hits, 99),
            "cached_tokens": sum(r.get("cached", 0) for r in recs), "prompt_tokens": sum(r["prompt"] for r in recs),
            "prefix_cache": {k: v for k, v in st.items() if k.startswith("prefix_cache")}}


def workloads(vocab: int, quick: bool, seed: int):
    rng = random.Random(seed)
    n_shared, sys_len, n_conv, turns, n_unique = (16, 1000, 4, 4, 16) if quick else (64, 2000, 16, 6, 64)
    system = synthetic_ids(rng, sys_len, vocab)
    shared = [(i * 0.5, f"s{i}", system + synthetic_ids(rng, rng.randint(12, 32), vocab), 16)
              for i in range(n_shared)]
    chat_sys = synthetic_ids(rng, 200, vocab)
    questions = {c: [synthetic_ids(rng, rng.randint(16, 48), vocab) for _ in range(turns)] for c in range(n_conv)}
    unique = [(0.0, f"u{i}", synthetic_ids(rng, 256, vocab), 32) for i in range(n_unique)]
    return shared, (chat_sys, questions, turns), unique


def run_chat(engine, chat):
    system, questions, turns = chat
    history = {c: list(system) + questions[c][0] for c in questions}

    def follow(rid, out):
        c, t = (int(x) for x in rid[1:].split("t"))
        history[c] += out.outputs[0].token_ids
        if t + 1 >= turns:
            return None
        history[c] += questions[c][t + 1]
        return f"c{c}t{t + 1}", list(history[c]), 32

    schedule = [(0.25 * c, f"c{c}t0", list(history[c]), 32) for c in questions]
    return _drive(engine, schedule, follow)


def run_bench(model, tokenizer, quick: bool, seed: int, engine_kwargs: dict, progress: bool = True) -> dict:
    from ..engine import EngineConfig, LLMEngine

    shared, chat, unique = workloads(model.cfg.vocab_size, quick, seed)
    res = {}
    for name, run in (("shared", lambda e: _drive(e, shared)), ("chat", lambda e: run_chat(e, chat)),
                      ("unique", lambda e: _drive(e, unique))):
        res[name] = {}
        for mode in ("off", "on"):
            engine = LLMEngine(EngineConfig(enable_prefix_caching=mode == "on", **engine_kwargs), model=model,
                               tokenizer=tokenizer)
            recs, wall = run(engine)
            res[name][mode] = _summary(recs, wall, engine)
            if progress:
                s = res[name][mode]
                print(f"{name:7s} cache {mode:3s}: TTFT p50 {s['ttft_p50_s']:.3f} s p99 {s['ttft_p99_s']:.3f} s, "
                      f"{s['output_tok_s']:.1f} out tok/s, {s['cached_tokens']} of {s['prompt_tokens']} prompt "
                      f"tokens cached", flush=True)
    return res


def report(res: dict, machine: str, cfg: dict) -> str:
    lines = ["# Prefix caching on vs off (one run)", "", f"Machine: {machine}. Engine: {cfg}.", "",
             "| workload | cache | requests | TTFT p50 s | TTFT p99 s | hits | hit TTFT p50 s | hit TTFT p99 s | "
             "output tok/s | prompt tokens cached |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for name, modes in res.items():
        for mode, s in modes.items():
            lines.append(f"| {name} | {mode} | {s['requests']} | {f(s['ttft_p50_s'])} | {f(s['ttft_p99_s'])} | "
                         f"{s['hit_requests']} | {f(s['ttft_hit_p50_s'])} | {f(s['ttft_hit_p99_s'])} | "
                         f"{s['output_tok_s']:.1f} | {s['cached_tokens']} / {s['prompt_tokens']} |")
    lines.append("")
    for name, modes in res.items():
        off, on = modes["off"], modes["on"]
        line = f"- {name}: TTFT p50 off/on {off['ttft_p50_s'] / on['ttft_p50_s']:.1f}x, p99 " \
               f"{off['ttft_p99_s'] / on['ttft_p99_s']:.1f}x; output tok/s on/off {on['output_tok_s'] / off['output_tok_s']:.3f}"
        if on["ttft_hit_p50_s"]:
            line += f"; hit TTFT p50 vs off p50 {off['ttft_p50_s'] / on['ttft_hit_p50_s']:.1f}x"
        lines.append(line)
    return "\n".join(lines) + "\n"


def cmd_prefix(args) -> int:
    import torch

    from ..cli_args import quantization_value
    from ..models.loader import default_model_path, load_model
    from ..platform import configure
    from ..tokenizer import load_tokenizer
    from .report import machine_info

    configure("cpu", args.num_threads)
    path = args.model or default_model_path()
    quantization = quantization_value(args)
    model, cfg = load_model(path, args.dtype, "cpu", quantization=quantization)
    tok = load_tokenizer(path, cfg.eos_token_ids)
    engine_kwargs = dict(model=path, dtype=args.dtype, quantization=quantization, policy=args.policy,
                         max_num_seqs=args.max_num_seqs,
                         num_threads=args.num_threads)
    res = run_bench(model, tok, args.quick, args.seed, engine_kwargs, progress=not args.no_progress)
    m = machine_info(model.dtype, torch.get_num_threads())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefix_cache.json").write_text(json.dumps({"machine": m, "engine": engine_kwargs, "results": res},
                                                      indent=2))
    text = report(res, f"{m['cpu_model']}, {m['logical_cores']} cores, {m['torch_threads']} torch threads, "
                       f"{m['date']}", engine_kwargs)
    (out / "prefix_cache.md").write_text(text)
    print(text)
    return 0


def add_parser(subparsers) -> None:
    from ..cli_args import add_quantization_arg

    p = subparsers.add_parser("prefix", help="prefix caching on vs off: shared system prompt, multi-turn chat, "
                                             "no shared prefix")
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto")
    add_quantization_arg(p)
    p.add_argument("--policy", default="baton-pd")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="16 shared requests (1,000-token prompt), 4x4 chats")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="benchmarks/results/prefix")
    p.set_defaults(func=cmd_prefix)
