"""`baton serve`: the OpenAI-compatible server (registered by baton.cli)."""
from __future__ import annotations

import argparse
import logging
import os
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..cli import add_engine_args

    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, metrics)",
                              description="Serve the model over an OpenAI-compatible API: /v1/models, "
                                          "/v1/completions, /v1/chat/completions, /health, /metrics.")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("BATON_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1/* (default: $BATON_API_KEY, else open)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests allowed to queue beyond --max-num-seqs before 429 (default 256)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients use (default: the model file or directory name)")
    p.add_argument("--default-max-tokens", type=int, default=256,
                   help="max_tokens when a request gives none, capped by the remaining context (default 256)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args) -> int:
    from ..cli import engine_kwargs
    from ..engine import EngineConfig, LLMEngine
    from .app import BatonServer, create_app, server_config

    if args.max_waiting < 0:
        raise ValueError(f"--max-waiting must be >= 0; got {args.max_waiting}")
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s: %(message)s")
    log = logging.getLogger("baton.server")
    log.info("loading the model ...")
    engine = LLMEngine(EngineConfig(**engine_kwargs(args)))
    app = create_app(engine, served_model_name=args.served_model_name, api_key=args.api_key,
                     max_waiting=args.max_waiting, default_max_tokens=args.default_max_tokens)
    state = app.state.baton
    log.info("serving %s (policy %s, dtype %s, max_num_seqs %d, context %d) on http://%s:%d",
             state.model_name, engine.config.policy, engine.model.dtype if hasattr(engine.model, "dtype") else "?",
             engine.config.max_num_seqs, engine.max_model_len, args.host, args.port)
    server = BatonServer(server_config(app, host=args.host, port=args.port, log_level=args.log_level))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled, after a clean shutdown
        pass
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="baton")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
