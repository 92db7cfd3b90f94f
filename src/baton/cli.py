"""`baton generate | chat | serve | bench`."""
from __future__ import annotations

import argparse
import sys

from .cli_args import add_engine_args, add_sampling_args, engine_kwargs, sampling_params


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


def cmd_build_kernels(args) -> int:
    from .platform.native import main as native_main

    return native_main(["build"] + (["-v"] if args.verbose else []))


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

    k = sub.add_parser("build-kernels", help="compile baton's C++ CPU kernels (scripts/setup.sh runs this)")
    k.add_argument("-v", "--verbose", action="store_true", help="show the compiler's command lines")
    k.set_defaults(func=cmd_build_kernels)

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
