"""`baton bench structured`: what output constraints cost.

16 concurrent chat requests with a JSON-schema `response_format`, against the
same requests unconstrained, through the OpenAI server (in this process, on
127.0.0.1) in one run. The unconstrained twin of each request is held to the
token count its constrained run produced (max_tokens = that count, ignore_eos),
so both runs have the same batch shape over time and the difference is the
constraint's cost: grammar compile, token masks, their application in the
sampler. Rounds alternate which run goes first, against drift on a shared host.
"""
from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "maxLength": 40},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 4},
        "employed": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "hobbies", "employed"],
    "additionalProperties": False,
}


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Invent person number {i} and describe them as a JSON object with "
                                        f"name, age, city, hobbies and employed."}]


async def _run(url: str, bodies: list[dict]) -> tuple[float, list[dict]]:
    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        resps = await asyncio.gather(*(client.post(url + "/v1/chat/completions", json=b) for b in bodies))
        wall = time.perf_counter() - t0
    out = []
    for r in resps:
        r.raise_for_status()
        out.append(r.json())
    return wall, out


def run_bench(engine, num_requests: int, max_tokens: int, rounds: int, progress: bool = True) -> dict:
    from ..server.app import ServerThread, create_app

    app = create_app(engine, served_model_name="bench")
    rows = []
    with ServerThread(app) as srv:
        base = [{"model": "bench", "messages": messages(i), "temperature": 0.0} for i in range(num_requests)]
        constrained = [{**b, "max_tokens": max_tokens, "response_format": {
            "type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}} for b in base]
        # warm-up (compile the schema once, first forwards); not timed
        asyncio.run(_run(srv.url, constrained[:2]))
        for r in range(rounds):
            order = ["constrained", "unconstrained"] if r % 2 == 0 else ["unconstrained", "constrained"]
            lengths = None
            if order[0] == "unconstrained":  # the lengths come from a constrained run: take them first, untimed
                _, outs = asyncio.run(_run(srv.url, constrained))
                lengths = [o["usage"]["completion_tokens"] for o in outs]
            result = {}
            for mode in order:
                if mode == "constrained":
                    s0 = engine.sample_seconds
                    wall, outs = asyncio.run(_run(srv.url, constrained))
                    lengths = [o["usage"]["completion_tokens"] for o in outs]
                    valid = sum(_valid(o["choices"][0]["message"]["content"]) for o in outs)
                    result["constrained"] = {"wall_s": wall, "tokens": sum(lengths), "valid_json": valid,
                                             "sample_s": engine.sample_seconds - s0,
                                             "finish": [o["choices"][0]["finish_reason"] for o in outs]}
                else:
                    bodies = [{**b, "max_tokens": n, "ignore_eos": True} for b, n in zip(base, lengths)]
                    s0 = engine.sample_seconds
                    wall, outs = asyncio.run(_run(srv.url, bodies))
                    toks = sum(o["usage"]["completion_tokens"] for o in outs)
                    result["unconstrained"] = {"wall_s": wall, "tokens": toks, "sample_s": engine.sample_seconds - s0}
            for m in result.values():
                m["tok_s"] = m["tokens"] / m["wall_s"]
            result["ratio"] = result["constrained"]["tok_s"] / result["unconstrained"]["tok_s"]
            rows.append(result)
            if progress:
                print(f"round {r + 1}/{rounds}: constrained {result['constrained']['tok_s']:.1f} tok/s, "
                      f"unconstrained {result['unconstrained']['tok_s']:.1f} tok/s, ratio {result['ratio']:.3f}",
                      flush=True)
    return {"num_requests": num_requests, "max_tokens": max_tokens, "rounds": rows,
            "median_ratio": statistics.median(r["ratio"] for r in rows)}


def _valid(text: str) -> bool:
    try:
        import jsonschema

        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except Exception:  # noqa: BLE001 - counted, not raised
        return False


def _quant_note(res: dict) -> str:
    q = res.get("quantization", "none")
    return f" ({q} weights)" if q != "none" else ""


def report(res: dict, machine: str) -> str:
    lines = [f"# Cost of structured output: {res['num_requests']} concurrent JSON-schema chat requests",
             "", f"Machine: {machine}. Default model (SmolLM2-135M-Instruct GGUF), policy {res['policy']}, "
                 f"dtype {res['dtype']}{_quant_note(res)}, greedy; max_tokens {res['max_tokens']} for the "
                 f"constrained requests, "
                 f"each unconstrained twin held to its constrained run's token count (ignore_eos).", "",
             "| round | constrained tok/s | unconstrained tok/s | ratio | valid JSON | sampler s (c / u) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(res["rounds"], 1):
        c, u = r["constrained"], r["unconstrained"]
        lines.append(f"| {i} | {c['tok_s']:.1f} | {u['tok_s']:.1f} | {r['ratio']:.3f} | "
                     f"{c['valid_json']}/{res['num_requests']} | {c['sample_s']:.2f} / {u['sample_s']:.2f} |")
    lines += ["", f"Median ratio constrained / unconstrained: **{res['median_ratio']:.3f}** (goal >= 0.8).", ""]
    return "\n".join(lines)


def cmd_structured(args) -> int:
    from ..cli_args import quantization_value
    from ..engine import EngineConfig, LLMEngine
    from .report import machine_info

    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, quantization=quantization_value(args),
                                    max_num_seqs=max(16, args.num_requests),
                                    num_threads=args.num_threads))
    res = run_bench(engine, args.num_requests, args.max_tokens, args.rounds, progress=not args.no_progress)
    import torch

    res.update(policy=engine.config.policy, dtype=str(engine.model.dtype).replace("torch.", ""),
               quantization=engine.config.quantization or "none")
    machine = machine_info(engine.model.dtype, torch.get_num_threads())
    res["machine"] = machine
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "constraint_cost.json").write_text(json.dumps(res, indent=2))
    text = report(res, f"{machine['cpu_model']}, {machine['logical_cores']} cores, {machine['torch_threads']} "
                       f"torch threads, {machine['date']}")
    (out / "constraint_cost.md").write_text(text)
    _plot(res, out / "constraint_cost.png")
    print(text)
    return 0


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = res["rounds"]
    x = range(1, len(rounds) + 1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    w = 0.38
    ax.bar([i - w / 2 for i in x], [r["unconstrained"]["tok_s"] for r in rounds], w, label="unconstrained")
    ax.bar([i + w / 2 for i in x], [r["constrained"]["tok_s"] for r in rounds], w, label="JSON schema")
    ax.set_xlabel("round")
    ax.set_ylabel("output tok/s")
    ax.set_title(f"{res['num_requests']} concurrent requests: median ratio {res['median_ratio']:.2f}")
    ax.set_xticks(list(x))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_parser(subparsers) -> None:
    from ..cli_args import add_quantization_arg

    p = subparsers.add_parser("structured", help="cost of JSON-schema constraints: concurrent constrained vs "
                                                 "unconstrained requests through the server")
    p.add_argument("--model", default=None, help="model (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto")
    add_quantization_arg(p)
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="benchmarks/results/structured")
    p.set_defaults(func=cmd_structured)
