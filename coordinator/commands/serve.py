"""`llmtp serve`: an OpenAI-compatible HTTP server over one engine, with continuous batching."""

from llmtp.common.errors import ConfigError

from llmtp.coordinator.serve.opening import add_model_arguments, log

LOOPBACK = "127.0.0.1"


def register(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="serve the OpenAI API (completions, chat) over HTTP")
    add_model_arguments(serve)
    serve.add_argument("--host", default=LOOPBACK, help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--slots", type=int, help="sequences decoded together, each with its own KV cache "
                       "(default: what fits in a quarter of free memory, at most 8)")
    serve.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 and /metrics")
    serve.add_argument("--prefill-chunk", type=int, default=64,
                       help="prompt tokens per step, so running streams keep flowing (default 64)")
    serve.add_argument("--queue-timeout", type=float, default=30.0,
                       help="seconds a request may wait for a free slot before a 503 (default 30)")
    serve.add_argument("--max-body", type=int, default=1 << 20, help="request body limit in bytes (default 1 MiB)")
    serve.set_defaults(handler=run_serve)


def run_serve(args) -> int:
    import uvicorn

    from llmtp.coordinator.serve.app import ServeApp, ServeSettings
    from llmtp.coordinator.serve.opening import open_model
    from llmtp.coordinator.serve.scheduler import Scheduler

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    if args.prefill_chunk < 1 or args.queue_timeout < 0 or args.max_body < 1:
        raise ConfigError("--prefill-chunk and --max-body must be >= 1, --queue-timeout >= 0")
    opened = open_model(args, args.slots)
    scheduler = Scheduler(opened.engine, opened.tokenizer, prefill_chunk=args.prefill_chunk,
                          queue_timeout=args.queue_timeout)
    settings = ServeSettings(model_name=opened.name, api_key=args.api_key, max_body_bytes=args.max_body,
                             queue_timeout=args.queue_timeout)
    app = ServeApp(scheduler, opened.tokenizer, opened.template, settings).build()
    if args.host != LOOPBACK and args.api_key is None:
        log(f"warning: listening on {args.host} without --api-key: anyone who can reach it may use it")
    log(f"serving {opened.name} on http://{args.host}:{args.port}/v1 ({opened.engine.n_slots} slots, "
        f"chat template {opened.template.name})")
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, limit_concurrency=1024)
    try:
        uvicorn.Server(config).run()
    finally:
        scheduler.close()
        opened.engine.close()
    return 0
