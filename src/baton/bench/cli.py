"""`baton bench throughput | serve | paper | perf | beyond | impls`."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_OUT = "benchmarks/results"


def _rate(text: str) -> float:
    if text.lower() in ("inf", "infinity"):
        return float("inf")
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"request rate must be a number > 0 or inf; got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"request rate must be > 0 or inf; got {text!r}")
    return v


def _range(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.replace(",", ":").split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX; got {text!r}") from None
    if not 1 <= a <= b:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX; got {text!r}")
    return a, b


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers; got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers; got {text!r}")
    return vals


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="output directory (default: benchmarks/results/<command>)")
    p.add_argument("--quick", action="store_true", help="a small version that runs in about a minute")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _workload_args(p: argparse.ArgumentParser, num: int) -> None:
    p.add_argument("--dataset", default="random",
                   help="random (fixed lengths), mixed (long-tailed lengths) or a .jsonl file of "
                        "{prompt | prompt_len, output_len} (default: random)")
    p.add_argument("--num-prompts", type=int, default=None, help=f"number of requests (default {num})")
    p.add_argument("--input-len", "--random-input-len", dest="input_len", type=int, default=None,
                   help="random: prompt tokens (default 128)")
    p.add_argument("--output-len", "--random-output-len", dest="output_len", type=int, default=None,
                   help="random: output tokens (default 128)")
    p.add_argument("--range-ratio", "--random-range-ratio", dest="range_ratio", type=float, default=0.0,
                   help="random: lengths drawn uniformly in [len*(1-r), len*(1+r)] (default 0: fixed)")
    p.add_argument("--prompt-range", type=_range, default=None, help="mixed: MIN:MAX prompt tokens (default 16:512)")
    p.add_argument("--output-range", type=_range, default=None, help="mixed: MIN:MAX output tokens (default 8:256)")


def _make_requests(args, vocab_size: int, tokenizer=None, quick_defaults=(16, 64, 32, (8, 96), (4, 48)),
                   full_defaults=(64, 128, 128, (16, 512), (8, 256))):
    from .workloads import make_workload

    d = quick_defaults if args.quick else full_defaults
    num = args.num_prompts or d[0]
    if num < 1:
        raise ValueError("--num-prompts must be >= 1")
    return make_workload(args.dataset, num, vocab_size, input_len=args.input_len or d[1],
                         output_len=args.output_len or d[2], range_ratio=args.range_ratio, seed=args.seed,
                         tokenizer=tokenizer, prompt_range=args.prompt_range or d[3],
                         output_range=args.output_range or d[4])


# ------------------------------------------------------------------ throughput

def cmd_throughput(args) -> int:
    import torch

    from .throughput import format_table, load_for_bench, parse_policies, run_policy
    from .workloads import workload_summary

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    policies = parse_policies(args.policy)
    from ..cli_args import quantization_value

    quantization = quantization_value(args)
    loaded = load_for_bench(args.model, args.dtype, quantization=quantization)
    reqs = _make_requests(args, loaded.cfg.vocab_size, loaded.tokenizer)
    out = Path(args.out or f"{DEFAULT_OUT}/throughput")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for pol in policies:
        row = run_policy(loaded, pol, reqs, max_num_seqs=args.max_num_seqs, kv_cache_bytes=args.kv_cache_bytes,
                         max_prefill_tokens=args.max_prefill_tokens, request_rate=args.request_rate,
                         burstiness=args.burstiness, seed=args.seed, progress=not args.no_progress,
                         record_timeline=args.timeline)
        rows.append(row)
    from .report import machine_info

    result = {"machine": machine_info(loaded.dtype, torch.get_num_threads()), "model": loaded.path,
              "quantization": quantization or "none", "dataset": args.dataset, "workload": workload_summary(reqs),
              "rows": rows}
    path = out / "throughput.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    w = result["workload"]
    print(f"{w['num_requests']} requests, prompts {w['prompt_len']['min']}-{w['prompt_len']['max']} "
          f"(total {w['prompt_len']['total']}), outputs {w['output_len']['min']}-{w['output_len']['max']} "
          f"(total {w['output_len']['total']}) tokens; model {Path(loaded.path).name}, "
          f"{result['machine']['dtype']}{f', {quantization}' if quantization else ''}, "
          f"{torch.get_num_threads()} threads")
    print(format_table(rows))
    bad = [r for r in rows if r["completed"] != r["num_requests"] or r["output_len_mismatches"]]
    for r in bad:
        print(f"WARNING: {r['policy']}: {r['completed']}/{r['num_requests']} completed, "
              f"{r['output_len_mismatches']} with a wrong output length", file=sys.stderr)
    print(f"wrote {path}")
    return 1 if bad else 0


# ------------------------------------------------------------------ serve

def cmd_serve(args) -> int:
    import asyncio

    from . import serve_client
    from .metrics import parse_goodput
    from .workloads import BenchRequest, exact_text_prompt, workload_summary

    slos = parse_goodput(args.goodput)
    base_url = args.base_url or f"http://{args.host}:{args.port}"
    tokenizer = None
    vocab = args.vocab_size
    if args.prompt_format == "text" or vocab is None:
        from .throughput import _tokenizer_and_vocab

        tokenizer, vocab_from_model = _tokenizer_and_vocab(args.tokenizer or args.model)
        vocab = vocab or vocab_from_model
        if args.prompt_format == "text" and tokenizer is None:
            raise ValueError("--prompt-format text needs a tokenizer: pass --tokenizer PATH")
    reqs = _make_requests(args, vocab, tokenizer, quick_defaults=(16, 32, 16, (8, 64), (4, 32)),
                          full_defaults=(64, 128, 64, (16, 512), (8, 256)))
    if args.prompt_format == "text":
        reqs = [r if isinstance(r.prompt, str) else
                BenchRequest(exact_text_prompt(r.prompt, tokenizer, r.prompt_len), r.prompt_len, r.output_len)
                for r in reqs]
    elif any(isinstance(r.prompt, str) for r in reqs) and tokenizer is not None:
        reqs = [BenchRequest(tokenizer.encode(r.prompt), r.prompt_len, r.output_len) if isinstance(r.prompt, str)
                else r for r in reqs]
    if args.wait_for_server:
        asyncio.run(serve_client.wait_for_server(base_url, args.wait_for_server))
    extra = json.loads(args.extra_body) if args.extra_body else None
    result = serve_client.run(base_url, reqs, endpoint=args.endpoint, model_id=args.served_model_name,
                              request_rate=args.request_rate, burstiness=args.burstiness,
                              max_concurrency=args.max_concurrency, slos=slos, seed=args.seed,
                              backend=args.backend, extra_body=extra, progress=not args.no_progress,
                              api_key=args.api_key)
    result["dataset"] = args.dataset
    result["workload"] = workload_summary(reqs)
    result["prompt_format"] = args.prompt_format
    print(serve_client.format_result(result))
    if args.result_file:
        path = Path(args.result_file)
    else:
        out = Path(args.out or f"{DEFAULT_OUT}/serve")
        rate = result["request_rate"]
        conc = f"-concurrency{args.max_concurrency}" if args.max_concurrency else ""
        path = out / f"{args.backend}-{rate}qps{conc}-{result['date']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0 if result["completed"] == len(reqs) else 1


# ------------------------------------------------------------------ paper

def cmd_paper(args) -> int:
    from .paper import PaperConfig, run_paper, summary_text

    kw = dict(model=args.model, dtype=args.dtype, out=args.out or f"{DEFAULT_OUT}/paper", seed=args.seed,
              num_threads=args.num_threads, kv_cache_bytes=args.kv_cache_bytes, hf=not args.no_hf,
              progress=not args.no_progress, num_requests=args.num_requests, batch_size=args.batch_size,
              batch_sizes=args.batch_sizes, table2_num_requests=args.table2_num_requests,
              prompt_range=args.prompt_range, output_range=args.output_range,
              wait_quiet=args.wait_quiet if args.wait_quiet is not None else (0.0 if args.quick else 120.0))
    cfg = PaperConfig.quick_defaults(**kw) if args.quick else PaperConfig(**{k: v for k, v in kw.items()
                                                                              if v is not None})
    t = time.monotonic()
    paper = run_paper(cfg)
    print(summary_text(paper))
    print(f"wrote {Path(cfg.out) / 'report.md'} and paper.json, table1.png, table2.png, fig8_kv_memory.png "
          f"in {time.monotonic() - t:.0f} s")
    errors = [r for r in paper["table1"] + paper["table2"] if r.get("error") and r.get("policy")]
    return 1 if errors else 0


# ------------------------------------------------------------------ registration

def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..cli_args import add_quantization_arg

    bench = subparsers.add_parser("bench", help="benchmarks: throughput, serve, paper")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    t = sub.add_parser("throughput", help="offline throughput of one or several policies")
    t.add_argument("--model", default=None, help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    t.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16")
    add_quantization_arg(t)
    t.add_argument("--policy", default="all", help="comma-separated policies or all (default all)")
    _workload_args(t, 64)
    t.add_argument("--max-num-seqs", type=int, default=16, help="batch size (default 16)")
    t.add_argument("--kv-cache-bytes", type=int, default=None)
    t.add_argument("--max-prefill-tokens", type=int, default=1024)
    t.add_argument("--request-rate", type=_rate, default=float("inf"),
                   help="arrivals per second (Poisson, or gamma with --burstiness); inf: all at t=0")
    t.add_argument("--burstiness", type=float, default=1.0)
    t.add_argument("--num-threads", type=int, default=None, help="torch threads (default: torch's default)")
    t.add_argument("--timeline", action="store_true", help="record KV bytes per iteration in the JSON")
    _common(t)
    t.set_defaults(func=cmd_throughput)

    s = sub.add_parser("serve", help="streaming client against a running OpenAI-compatible server")
    s.add_argument("--base-url", default=None, help="server URL (default http://HOST:PORT)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions")
    s.add_argument("--backend", default="openai", help="label written into the result (e.g. baton, vllm, llama.cpp)")
    s.add_argument("--served-model-name", default=None, help="model id to send (default: the first of /v1/models)")
    s.add_argument("--model", default=None, help="local model path, for its tokenizer and vocabulary size "
                                                 "(default: SmolLM2-135M-Instruct)")
    s.add_argument("--tokenizer", default=None, help="tokenizer path (default: --model)")
    s.add_argument("--vocab-size", type=int, default=None, help="vocabulary size for synthetic token ids "
                                                                "(skips loading a tokenizer with token-id prompts)")
    s.add_argument("--prompt-format", choices=("ids", "text"), default="ids",
                   help="send prompts as token ids (exact lengths) or as text (decoded, re-encoded to length)")
    _workload_args(s, 64)
    s.add_argument("--request-rate", type=_rate, default=float("inf"),
                   help="requests per second (Poisson, or gamma with --burstiness); inf: all at once")
    s.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson, < 1 burstier")
    s.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    s.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs for goodput, e.g. --goodput ttft:500 tpot:50 e2el:10000")
    s.add_argument("--extra-body", default=None, help="JSON merged into every request body")
    s.add_argument("--api-key", default=None)
    s.add_argument("--wait-for-server", type=float, default=0.0, metavar="S",
                   help="wait up to S seconds for GET /v1/models to answer before starting")
    s.add_argument("--result-file", default=None, help="write the result JSON here (default: OUT/<backend>-...json)")
    _common(s)
    s.set_defaults(func=cmd_serve)

    p = sub.add_parser("paper", help="re-run the BATON paper's experiments (Tables 1-2, Figure 8, roofline)")
    p.add_argument("--model", default=None, help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16")
    p.add_argument("--num-requests", type=int, default=None, help="mixed workload size (default 48; quick 12)")
    p.add_argument("--prompt-range", type=_range, default=None,
                   help="MIN:MAX prompt tokens (default 16:512; quick 8:64)")
    p.add_argument("--output-range", type=_range, default=None,
                   help="MIN:MAX output tokens (default 8:256; quick 4:32)")
    p.add_argument("--batch-size", type=int, default=None, help="Table 1 batch size (default 16; quick 4)")
    p.add_argument("--batch-sizes", type=_ints, default=None, help="Table 2 batch sizes (default 4,8,16,32)")
    p.add_argument("--table2-num-requests", type=int, default=None,
                   help="Table 2 uses the first N requests of the workload (default: all)")
    p.add_argument("--kv-cache-bytes", type=int, default=None)
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers baselines")
    p.add_argument("--wait-quiet", type=float, default=None, metavar="S",
                   help="before each timed run wait up to S seconds for other processes to leave the CPU "
                        "(default 120; quick 0)")
    _common(p)
    p.set_defaults(func=cmd_paper)

    # Other benchmark modules of this package register their own subcommands
    # (`baton bench beyond`, `baton bench perf`, `baton bench impls`) when they are present.
    import importlib

    for name in ("beyond", "perf", "impls", "structured", "prefix", "ppl"):
        try:
            mod = importlib.import_module(f"{__package__}.{name}")
            if hasattr(mod, "add_parser"):
                mod.add_parser(sub)
        except ImportError:
            continue
        except Exception as e:  # noqa: BLE001 - a broken sibling must not take the whole CLI down
            print(f"baton: warning: `bench {name}` unavailable: {type(e).__name__}: {e}", file=sys.stderr)
    return bench
