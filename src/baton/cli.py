"""`baton generate | chat | serve | bench`."""
from __future__ import annotations

import argparse
import sys


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--policy", default="baton-pd", choices=["static", "orca", "baton", "baton-pd"])
    p.add_argument("--dtype", default="auto",
                   help="auto (bfloat16 where the CPU computes it natively, else float32), float32 or bfloat16. "
                        "In bfloat16, greedy output can depend on which other requests share the batch (the "
                        "kernels round differently per batch shape: 16 of 32 prompts differed alone vs batched in "
                        "one measurement); float32 output does not")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-bytes", type=int, default=None)
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: the model's dtype")
    p.add_argument("--max-prefill-tokens", type=int, default=1024,
                   help="prompt tokens prefilled per iteration; longer prompts are chunked (stall-free decode)")
    p.add_argument("--pool-size", type=int, default=4, help="baton-pd: prefilled queries kept ready")
    p.add_argument("--max-preemptions", type=int, default=2,
                   help="baton-pd: how often one query may be preempted by higher-priority ones (0: never)")
    p.add_argument("--num-threads", type=int, default=None)


def engine_kwargs(args) -> dict:
    return dict(model=args.model, policy=args.policy, dtype=args.dtype, device=args.device,
                max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                kv_cache_bytes=args.kv_cache_bytes, kv_cache_dtype=args.kv_cache_dtype,
                max_prefill_tokens=args.max_prefill_tokens,
                pool_size=args.pool_size, max_preemptions=args.max_preemptions, num_threads=args.num_threads)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def sampling_params(args):
    from .sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)


def stream(engine, prompt, params) -> str:
    """Run one request to completion, printing text as it is produced."""
    engine.add_request("cli", prompt, params)
    text = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            print(out.new_text, end="", flush=True)
            text = out.outputs[0].text
            if out.error:
                print(f"\nbaton: error: {out.error}", file=sys.stderr)
    print()
    return text


def cmd_generate(args) -> int:
    from .engine import EngineConfig, LLMEngine

    params = sampling_params(args)  # bad flags fail before the model loads
    engine = LLMEngine(EngineConfig(**engine_kwargs(args)))
    stream(engine, args.prompt, params)
    return 0


def cmd_chat(args) -> int:
    from .engine import EngineConfig, LLMEngine

    params = sampling_params(args)
    engine = LLMEngine(EngineConfig(**engine_kwargs(args)))
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("baton chat: type a message, Ctrl-D or /exit to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = stream(engine, engine.tokenizer.apply_chat_template(messages), params)
        messages.append({"role": "assistant", "content": reply})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baton", description="LLM serving with dynamic re-batching")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a completion for one prompt")
    g.add_argument("prompt")
    add_engine_args(g)
    add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat with the model's chat template")
    c.add_argument("--system", default=None, help="system prompt")
    add_engine_args(c)
    add_sampling_args(c)
    c.set_defaults(func=cmd_chat)

    # The server and the benchmarks register their own subcommands.
    try:
        from .server.cli import add_parser as add_serve
        add_serve(sub)
    except ImportError:
        pass
    try:
        from .bench.cli import add_parser as add_bench
        add_bench(sub)
    except ImportError:
        pass
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, KeyError) as e:
        print(f"baton: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
