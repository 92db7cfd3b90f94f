"""`baton serve`: the OpenAI-compatible server (registered by baton.cli)."""
from __future__ import annotations

import argparse
import logging
import os
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..cli_args import add_engine_args
    from .connection import DEFAULT_HEADER_TIMEOUT, DEFAULT_MAX_CONNECTIONS
    from .middleware import DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_REQUEST_BYTES

    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, metrics)",
                              description="Serve the model over an OpenAI-compatible API: /v1/models, "
                                          "/v1/completions, /v1/chat/completions, /health, /metrics.")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("BATON_API_KEY"),
                   help="require `Authorization: Bearer KEY` on every route but /health, which load balancers "
                        "probe without credentials (default: $BATON_API_KEY, else open)")
    p.add_argument("--metrics-api-key", default=os.environ.get("BATON_METRICS_API_KEY"),
                   help="a separate key for /metrics, so a scraper need not hold the API key "
                        "(default: $BATON_METRICS_API_KEY, else /metrics takes --api-key)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests allowed to queue beyond --max-num-seqs before 429 (default 256; 0: none queue)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients use (default: the model file or directory name)")
    p.add_argument("--default-max-tokens", type=int, default=256,
                   help="max_tokens when a request gives none, capped by the remaining context (default 256)")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help=f"largest request body accepted; larger ones get 413 (default {DEFAULT_MAX_REQUEST_BYTES})")
    p.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT,
                   help=f"seconds a connection may take to send its request line and headers before a 408 "
                        f"(default {DEFAULT_HEADER_TIMEOUT:g})")
    p.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT,
                   help=f"seconds a request may take to send its whole body before a 408 "
                        f"(default {DEFAULT_BODY_TIMEOUT:g})")
    p.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                   help=f"open connections beyond which requests get 503 (default {DEFAULT_MAX_CONNECTIONS})")
    p.add_argument("--chat-template", default=None,
                   help="chat template used instead of the model's: a file, jinja text, or a built-in name "
                        "(chatml-tools: ChatML with Hermes-style <tool_call> blocks, for tool calling on "
                        "ChatML models such as SmolLM2)")
    p.add_argument("--allowed-origins", default=None,
                   help="browser origins allowed by CORS, as a JSON list ('[\"*\"]') or comma-separated "
                        "(default: none, CORS off)")
    p.add_argument("--log-stats-interval", type=float, default=10.0,
                   help="seconds between engine stats lines while busy (default 10; 0: off)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="baton's and uvicorn's log level; info logs one access line per request (default info)")
    p.set_defaults(func=cmd_serve)
    return p


def _check_flags(args) -> None:
    for flag, value, ok, allowed in [
        ("--max-waiting", args.max_waiting, args.max_waiting >= 0, ">= 0"),
        ("--max-request-bytes", args.max_request_bytes, args.max_request_bytes >= 1, ">= 1"),
        ("--header-timeout", args.header_timeout, args.header_timeout > 0, "> 0"),
        ("--body-timeout", args.body_timeout, args.body_timeout > 0, "> 0"),
        ("--max-connections", args.max_connections, args.max_connections >= 1, ">= 1"),
        ("--log-stats-interval", args.log_stats_interval, args.log_stats_interval >= 0, ">= 0"),
        ("--default-max-tokens", args.default_max_tokens, args.default_max_tokens >= 1, ">= 1"),
    ]:
        if not ok:
            raise ValueError(f"{flag} must be {allowed}; got {value}")


def parse_origins(value):
    """--allowed-origins: a JSON list or comma-separated origins."""
    if not value:
        return None
    import json

    if value.lstrip().startswith("["):
        try:
            origins = json.loads(value)
        except ValueError as e:
            raise ValueError(f"--allowed-origins: not a JSON list: {e}") from None
        if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
            raise ValueError("--allowed-origins must be a list of strings")
        return origins
    return [o.strip() for o in value.split(",") if o.strip()]


def cmd_serve(args) -> int:
    from ..cli_args import engine_kwargs
    from ..engine import EngineConfig, LLMEngine
    from ..platform.compute_thread import ComputeThread
    from .app import BatonServer, bind_socket, create_app, server_config

    _check_flags(args)  # before anything slow
    origins = parse_origins(args.allowed_origins)
    if args.chat_template:
        from .tools import load_chat_template

        load_chat_template(args.chat_template)  # a missing file fails now
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("baton.server")
    # The port first: a busy one fails now, not after the model has loaded.
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as e:
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    log.info("listening on %s:%d; loading the model ...", args.host, args.port)
    # The model is loaded on the thread that will step the engine (platform/compute_thread.py).
    compute = ComputeThread("baton-engine")
    engine = compute.call(lambda: LLMEngine(EngineConfig(**engine_kwargs(args))))
    app = create_app(engine, served_model_name=args.served_model_name, api_key=args.api_key,
                     metrics_api_key=args.metrics_api_key, max_waiting=args.max_waiting,
                     default_max_tokens=args.default_max_tokens, max_request_bytes=args.max_request_bytes,
                     body_timeout=args.body_timeout, stats_interval=args.log_stats_interval,
                     chat_template=args.chat_template, allowed_origins=origins, compute_thread=compute)
    state = app.state.baton
    server = BatonServer(server_config(app, host=args.host, port=args.port, log_level=args.log_level,
                                       header_timeout=args.header_timeout, max_connections=args.max_connections))
    # BatonServer says "serving on http://..." once the app has started.
    log.info("loaded %s (policy %s, dtype %s, quantization %s, max_num_seqs %d, context %d)", state.model_name,
             engine.config.policy, engine.model.dtype, engine.config.quantization or "none",
             engine.config.max_num_seqs, engine.max_model_len)
    try:
        server.run(sockets=[sock])
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
