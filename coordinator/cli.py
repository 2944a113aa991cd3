"""`llmtp` command line: parse arguments, call one module per command, and turn
LlmtpError into one line on stderr with exit code 2 (130 on Ctrl-C)."""

import argparse
import sys
import time
from pathlib import Path

import llmtp
import llmtp.common as common_package
from llmtp.common.errors import ConfigError, run_handler

DEFAULT_MODEL_DIR = Path(common_package.__file__).resolve().parent / "default_model"  # package data


def main(argv: list[str] | None = None) -> int:
    return run_handler(build_parser().parse_args(argv))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmtp", description="Llama-2 inference split across worker processes.")
    parser.add_argument("--version", action="version", version=f"llmtp {llmtp.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser("generate", help="generate text (run.c's flags)")
    gen.add_argument("checkpoint", nargs="?", help="llama2.c checkpoint (default: the bundled Shakespeare model)")
    gen.add_argument("-z", "--tokenizer", help="tokenizer.bin or SentencePiece .model "
                     "(default: tokenizer.model or tokenizer.bin beside the checkpoint)")
    gen.add_argument("-i", "--prompt", "--input", dest="prompt", default="", help="prompt text")
    gen.add_argument("-n", "--steps", type=int, default=256, help="positions to run, prompt included "
                     "(0 = seq_len; default 256)")
    gen.add_argument("-t", "--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    gen.add_argument("-p", "--topp", type=float, default=0.9, help="top-p nucleus sampling (default 0.9)")
    gen.add_argument("-k", "--top-k", dest="topk", type=int, default=0, help="keep only the k likeliest (0 = off)")
    gen.add_argument("-s", "--seed", type=int, default=0, help="random seed (0 = time, as run.c)")
    gen.add_argument("-w", "--workers", type=int, default=0, help="run on N local worker processes "
                     "(0 = in this process)")
    gen.add_argument("--cluster", nargs="?", const="", default=None, metavar="STATE",
                     help="use the workers of `llmtp cluster up` (optional: its state file)")
    gen.add_argument("--config", help="cluster YAML: run on the workers it lists, with its tokenizer, "
                     "shard folder and timeouts")
    gen.add_argument("--timeout", type=float, help="seconds to wait for any worker reply "
                     "(default 30, or the config's timeouts.reply)")
    gen.add_argument("--recover-wait", type=float,
                     help="seconds to wait for a lost worker to come back before giving up "
                          "(default 30, or the config's timeouts.recover)")
    gen.set_defaults(handler=cmd_generate)

    shard = commands.add_parser("shard", help="cut a checkpoint into one shard file per worker")
    shard.add_argument("checkpoint", nargs="?")
    shard.add_argument("-w", "--workers", type=int)
    shard.add_argument("-o", "--output", help="folder for the shards and manifest.json")
    shard.add_argument("--config", help="cluster YAML: write one folder per host under its shards folder "
                       "(instead of CHECKPOINT, -w and -o)")
    shard.set_defaults(handler=cmd_shard)

    from llmtp.worker.cli import add_arguments as add_worker_arguments, cmd_worker
    work = commands.add_parser("worker", help="serve one shard to a coordinator")
    add_worker_arguments(work)
    work.set_defaults(handler=cmd_worker)

    cluster = commands.add_parser("cluster", help="keep local workers running between generate calls")
    cluster_commands = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    up = cluster_commands.add_parser("up", help="shard if needed and start N detached workers")
    up.add_argument("checkpoint", nargs="?", help="default: the bundled model")
    up.add_argument("-z", "--tokenizer")
    up.add_argument("-w", "--workers", type=int, required=True)
    up.add_argument("--state", help="state file (default: $LLMTP_CACHE_DIR/cluster.json)")
    up.set_defaults(handler=cmd_cluster_up)
    down = cluster_commands.add_parser("down", help="stop the workers of `cluster up`")
    down.add_argument("--state", help="state file (default: $LLMTP_CACHE_DIR/cluster.json)")
    down.set_defaults(handler=cmd_cluster_down)

    keygen = commands.add_parser("keygen", help="make the CURVE key pairs of a cluster (coordinator, worker)")
    keygen.add_argument("-o", "--output", required=True, help="folder for the key files")
    keygen.set_defaults(handler=cmd_keygen)

    tok = commands.add_parser("tokenize", help="print the token ids of a text, BOS first")
    tok.add_argument("-z", "--tokenizer", required=True)
    tok.add_argument("-i", "--prompt", "--input", dest="prompt", required=True)
    tok.set_defaults(handler=cmd_tokenize)

    conv = commands.add_parser("convert", help="rewrite a checkpoint as llama2.c version 1 or 2")
    conv.add_argument("input")
    conv.add_argument("output")
    conv.add_argument("--version", type=int, choices=(0, 1, 2), required=True)
    conv.add_argument("--group-size", type=int, default=None, help="int8 group size for version 2 "
                      "(default: the largest <= 64 that divides every row)")
    conv.set_defaults(handler=cmd_convert)

    bench = commands.add_parser("bench", help="measure prefill/decode speed against worker count")
    bench.add_argument("checkpoint", nargs="?", help="a checkpoint to measure (or use --preset)")
    bench.add_argument("--preset", choices=("15M", "110M", "7B-layer"),
                       help="a random-weight model of this shape, made once into the cache")
    bench.add_argument("-w", "--workers", default="1,2", help="worker counts, e.g. 1,2,4 (default 1,2)")
    bench.add_argument("--prompt-tokens", type=int, default=128)
    bench.add_argument("--decode-tokens", type=int, default=32)
    bench.add_argument("--reduce", choices=("shm", "peers", "star"),
                       help="how workers sum partials (default: shm when every worker has a core, else peers)")
    bench.add_argument("--compare-hf", action="store_true", help="also time transformers on the same weights")
    bench.add_argument("-o", "--out", default="bench-out", help="folder for the JSON and PNG")
    bench.add_argument("--probe-mib", type=int, default=1024, help="size of the bandwidth probe's matrix")
    bench.add_argument("--rounds", type=int, default=3, help="time every engine this many times, interleaved, "
                       "and keep each one's best (default 3)")
    bench.add_argument("--cores-per-worker", type=int, default=1,
                       help="pin each worker to this many cores, so N workers scale over N x that many "
                            "(default 1; 0 = share all cores, as generate does)")
    bench.set_defaults(handler=cmd_bench)

    from .commands import chat, serve; chat.register(commands); serve.register(commands)  # noqa: E702

    insp = commands.add_parser("inspect", help="print a checkpoint's format, shapes and sizes")
    insp.add_argument("checkpoint")
    insp.set_defaults(handler=cmd_inspect)
    return parser


def resolve_model_paths(checkpoint: str | None, tokenizer: str | None) -> tuple[Path, Path]:
    if checkpoint is None:
        checkpoint_path = DEFAULT_MODEL_DIR / "model.bin"
        if not checkpoint_path.exists():
            raise ConfigError(f"no checkpoint given and the bundled model {checkpoint_path} is missing")
    else:
        checkpoint_path = Path(checkpoint)
    if tokenizer is None:
        # A .model says how it normalizes whitespace; a tokenizer.bin cannot, so prefer the former.
        candidates = [checkpoint_path.parent / name for name in ("tokenizer.model", "tokenizer.bin")]
        tokenizer_path = next((path for path in candidates if path.exists()), None)
        if tokenizer_path is None:
            raise ConfigError(f"no tokenizer given (-z) and neither {candidates[0]} nor {candidates[1].name} "
                              f"exists")
    else:
        tokenizer_path = Path(tokenizer)
    return checkpoint_path, tokenizer_path


def plan_steps(requested: int, n_prompt: int, seq_len: int) -> int:
    """run.c's rule (0 or too many -> seq_len) plus a notice, and room for one new token."""
    if n_prompt >= seq_len:
        raise ConfigError(f"prompt is {n_prompt} tokens (BOS included); the model's context is {seq_len}")
    steps = requested
    if steps <= 0 or steps > seq_len:
        if steps > seq_len:
            print(f"llmtp: notice: -n {requested} exceeds the context; clamped to seq_len {seq_len}",
                  file=sys.stderr)
        steps = seq_len
    if steps < n_prompt:
        print(f"llmtp: notice: -n {requested} is shorter than the prompt ({n_prompt} tokens); "
              f"using {n_prompt}", file=sys.stderr)
        steps = n_prompt
    return steps


def cmd_generate(args) -> int:
    from llmtp.common.model.sampler import Sampler, SamplerConfig
    from llmtp.common.formats.tokenizer import load_tokenizer
    from .generate import generate, report_speed

    check_sampling_args(args)
    config, tokenizer_path, open_engine = plan_engine(args)
    tokenizer = load_tokenizer(tokenizer_path, config.vocab_size)
    prompt_ids = tokenizer.encode(args.prompt, bos=True)
    steps = plan_steps(args.steps, len(prompt_ids), config.seq_len)
    seed = args.seed if args.seed > 0 else int(time.time())
    sampler = Sampler(SamplerConfig(temperature=args.temperature, topp=args.topp, topk=args.topk, seed=seed))

    engine = open_engine()
    if hasattr(engine, "recover"):  # workers: survive losing one (restart or wait, rebuild, go on)
        from .recovery import RecoveringEngine
        engine = RecoveringEngine(engine, wait_seconds=args.recover_wait or 30.0)
    decoder = tokenizer.stream_decoder()
    decoder.push(tokenizer.bos_id)

    def emit(token: int) -> None:
        sys.stdout.write(decoder.push(token))
        sys.stdout.flush()

    try:
        result = generate(engine, sampler, prompt_ids, steps, on_token=emit)
    finally:
        sys.stdout.write(decoder.flush() + "\n")
        sys.stdout.flush()
        engine.close()
    report_speed(result)
    return 0


def plan_engine(args):
    """-> (model config, tokenizer path, a function that opens the engine).

    With workers, the coordinator maps only the shard folder's embedding table; the
    checkpoint itself is read once, to shard it into the cache."""
    from llmtp.common.formats.manifest import load_manifest
    from llmtp.coordinator import local_cluster

    if args.config is not None:
        return plan_config_engine(args)
    if args.timeout is None:
        args.timeout = 30.0
    if args.cluster is not None:
        state = local_cluster.read_cluster_state(local_cluster.state_path(args.cluster or None))
        config = load_manifest(state["shards"]).config
        tokenizer = args.tokenizer or state["tokenizer"]
        return config, Path(tokenizer), lambda: local_cluster.open_cluster_engine(state, timeout=args.timeout)

    checkpoint_path, tokenizer_path = resolve_model_paths(args.checkpoint, args.tokenizer)
    if args.workers:
        shard_folder = local_cluster.ensure_shards(checkpoint_path, args.workers)
        config = load_manifest(shard_folder).config
        return config, tokenizer_path, lambda: local_cluster.open_local_engine(
            shard_folder, args.workers, timeout=args.timeout)

    from llmtp.common.formats.checkpoint import load_checkpoint
    from .local_engine import LocalEngine
    checkpoint = load_checkpoint(checkpoint_path)
    return checkpoint.config, tokenizer_path, lambda: LocalEngine.from_checkpoint(checkpoint)


def plan_config_engine(args):
    """plan_engine for --config: the YAML's tokenizer (unless -z), shards and workers."""
    from llmtp.common.cluster.config import load_cluster_config
    from .config_cluster import coordinator_manifest, open_config_engine
    if args.checkpoint or args.workers or args.cluster is not None:
        raise ConfigError("--config replaces CHECKPOINT, --workers and --cluster")
    cluster = load_cluster_config(args.config)
    manifest = coordinator_manifest(cluster)
    tokenizer = Path(args.tokenizer) if args.tokenizer else cluster.tokenizer
    if args.recover_wait is None:
        args.recover_wait = cluster.timeouts.recover
    return manifest.config, tokenizer, lambda: open_config_engine(cluster, manifest, timeout=args.timeout)


def check_sampling_args(args) -> None:
    if args.temperature < 0:
        raise ConfigError(f"-t/--temperature must be >= 0, got {args.temperature}")
    if not 0 <= args.topp <= 1:
        raise ConfigError(f"-p/--topp must be in [0, 1], got {args.topp}")
    if args.topk < 0:
        raise ConfigError(f"-k/--top-k must be >= 0, got {args.topk}")
    if args.workers < 0:
        raise ConfigError(f"-w/--workers must be >= 0, got {args.workers}")


def cmd_tokenize(args) -> int:
    from llmtp.common.formats.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(args.tokenizer)
    print(" ".join(str(token) for token in tokenizer.encode(args.prompt, bos=True)))
    return 0


def cmd_convert(args) -> int:
    from llmtp.common.formats.checkpoint import convert_checkpoint
    converted = convert_checkpoint(args.input, args.output, args.version, args.group_size)
    print(f"wrote {args.output}: version {converted.version}, {converted.n_bytes} bytes", file=sys.stderr)
    return 0


def cmd_shard(args) -> int:
    if args.config is not None:
        return cmd_shard_config(args)
    missing = [name for name, value in (("CHECKPOINT", args.checkpoint), ("-w/--workers", args.workers),
                                        ("-o/--output", args.output)) if value is None]
    if missing:
        raise ConfigError(f"shard needs {', '.join(missing)} (or --config cluster.yaml)")
    from .shard import describe_manifest, run_shard
    manifest = run_shard(args.checkpoint, args.workers, args.output)
    print(describe_manifest(manifest))
    return 0


def cmd_shard_config(args) -> int:
    from llmtp.common.cluster.config import load_cluster_config
    from .config_cluster import shard_for_config
    if args.checkpoint or args.workers is not None or args.output:
        raise ConfigError("--config replaces CHECKPOINT, -w and -o (the config's model, workers and shards)")
    cluster = load_cluster_config(args.config)
    placed = shard_for_config(cluster)
    for host, files in placed.items():
        names = ", ".join(f"{path.name} ({path.stat().st_size:,} bytes)" for path in files)
        print(f"{host}: {cluster.host_folder(host)}/ <- {names}")
    remote = [host for host in placed if host != cluster.coordinator.host]
    if remote:
        folder = cluster.host_folder(remote[0])
        print(f"copy each folder to its host, at the same path (README: Multi-host), e.g. "
              f"rsync -a --mkpath {folder}/ {remote[0]}:{folder}/", file=sys.stderr)
    return 0


def cmd_keygen(args) -> int:
    from llmtp.common.wire.security import generate_keys, keys_yaml
    written = generate_keys(args.output)
    for public, secret in written.values():
        print(f"wrote {public} and {secret} (secret, mode 0600)", file=sys.stderr)
    print("coordinator host needs: coordinator.key_secret, worker.key; worker hosts need: worker.key_secret, "
          "coordinator.key. Paste into the cluster YAML:", file=sys.stderr)
    print(keys_yaml(args.output))
    return 0


def cmd_cluster_up(args) -> int:
    from llmtp.coordinator import local_cluster
    if args.workers < 1:
        raise ConfigError(f"-w/--workers must be >= 1, got {args.workers}")
    checkpoint_path, tokenizer_path = resolve_model_paths(args.checkpoint, args.tokenizer)
    state_file = local_cluster.state_path(args.state)
    state = local_cluster.cluster_up(checkpoint_path, tokenizer_path, args.workers, state_file)
    for index, worker in enumerate(state["workers"]):
        print(f"worker {index}: pid {worker['pid']} at {worker['endpoint']}")
    print(f"cluster is up ({state_file}); use `llmtp generate --cluster`, stop with `llmtp cluster down`")
    return 0


def cmd_cluster_down(args) -> int:
    from llmtp.coordinator import local_cluster
    stopped = local_cluster.cluster_down(local_cluster.state_path(args.state))
    print(f"stopped {stopped} worker(s)")
    return 0


def cmd_bench(args) -> int:
    from llmtp.coordinator import bench
    if (args.checkpoint is None) == (args.preset is None):
        raise ConfigError("bench needs a checkpoint or --preset (not both)")
    try:
        worker_counts = [int(n) for n in args.workers.split(",") if n.strip()]
    except ValueError:
        raise ConfigError(f"-w/--workers must be comma-separated integers, got {args.workers!r}") from None
    if args.rounds < 1:
        raise ConfigError(f"--rounds must be 1 or more, got {args.rounds}")
    if args.cores_per_worker < 0:
        raise ConfigError(f"--cores-per-worker must be 0 or more, got {args.cores_per_worker}")
    if args.preset:
        model, path = args.preset, bench.synthetic_checkpoint(args.preset)
    else:
        model, path = Path(args.checkpoint).stem, Path(args.checkpoint)
    report = bench.run_bench(model, path, worker_counts, args.prompt_tokens, args.decode_tokens, args.reduce,
                             args.compare_hf, probe_mib=args.probe_mib,
                             cores_per_worker=args.cores_per_worker or None, rounds=args.rounds)
    print(bench.format_report(report))
    json_path, png_path = bench.save_report(report, Path(args.out))
    print(f"\nwrote {json_path}" + (f" and {png_path}" if png_path else
                                     " (no plot: pip install matplotlib)"))
    return 0


def cmd_inspect(args) -> int:
    from llmtp.common.formats.checkpoint import describe_checkpoint, load_checkpoint
    print(describe_checkpoint(load_checkpoint(args.checkpoint)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
