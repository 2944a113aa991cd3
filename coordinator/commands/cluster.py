"""`llmtp cluster up / down`: local workers kept running between generate calls."""

from llmtp.common.errors import ConfigError

from .arguments import positive_int

STATE_HELP = "state file (default: $LLMTP_CACHE_DIR/cluster.json)"


def register(subparsers) -> None:
    cluster = subparsers.add_parser("cluster", help="keep local workers running between generate calls")
    actions = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    up = actions.add_parser("up", help="shard if needed and start N detached workers")
    up.add_argument("checkpoint", nargs="?", help="default: the bundled model")
    up.add_argument("-z", "--tokenizer")
    up.add_argument("-w", "--workers", type=positive_int, required=True)
    up.add_argument("--state", help=STATE_HELP)
    up.set_defaults(handler=run_up)
    down = actions.add_parser("down", help="stop the workers of `cluster up`")
    down.add_argument("--state", help=STATE_HELP)
    down.set_defaults(handler=run_down)


def run_up(args) -> int:
    from llmtp.coordinator import standing_cluster

    from .engines import resolve_model_paths
    if args.workers < 1:
        raise ConfigError(f"-w/--workers must be >= 1, got {args.workers}")
    checkpoint_path, tokenizer_path = resolve_model_paths(args.checkpoint, args.tokenizer)
    state_file = standing_cluster.state_path(args.state)
    state = standing_cluster.cluster_up(checkpoint_path, tokenizer_path, args.workers, state_file)
    for index, worker in enumerate(state.workers):
        print(f"worker {index}: pid {worker.pid} at {worker.endpoint}")
    print(f"cluster is up ({state_file}); use `llmtp generate --cluster`, stop with `llmtp cluster down`")
    return 0


def run_down(args) -> int:
    from llmtp.coordinator import standing_cluster
    stopped = standing_cluster.cluster_down(standing_cluster.state_path(args.state))
    print(f"stopped {stopped} worker(s)")
    return 0
