"""`llmtp bench`: prefill and decode speed against worker count (coordinator/bench/)."""

from pathlib import Path

from llmtp.common.errors import ConfigError
from llmtp.common.exchange.modes import REDUCE_MODES

from .arguments import positive_int

PRESET_NAMES = ("15M", "110M", "7B-layer")  # coordinator/bench/presets.py's, without importing numpy for --help


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="measure prefill/decode speed against worker count")
    bench.add_argument("checkpoint", nargs="?", help="a checkpoint to measure (or use --preset)")
    bench.add_argument("--preset", choices=PRESET_NAMES,
                       help="a random-weight model of this shape, made once into the cache")
    bench.add_argument("-w", "--workers", default="1,2", help="worker counts, e.g. 1,2,4 (default 1,2)")
    bench.add_argument("--prompt-tokens", type=positive_int, default=128)
    bench.add_argument("--decode-tokens", type=positive_int, default=32)
    bench.add_argument("--reduce", choices=REDUCE_MODES,
                       help="how workers sum partials (default: shm when every worker has a core, else peers)")
    bench.add_argument("--quant", metavar="FORMATS",
                       help="also measure the weights quantized to these GGUF block formats, a comma list "
                            "of q8_0, q4_0, q4_1 (each written once into the cache)")
    bench.add_argument("--compare-hf", action="store_true", help="also time transformers on the same weights")
    bench.add_argument("-o", "--out", default="bench-out", help="folder for the JSON and PNG")
    bench.add_argument("--probe-mib", type=positive_int, default=1024, help="size of the bandwidth probe's matrix")
    bench.add_argument("--rounds", type=int, default=3, help="time every engine this many times, interleaved, "
                       "and keep each one's best (default 3)")
    bench.add_argument("--cores-per-worker", type=int, default=1,
                       help="pin each worker to this many cores, so N workers scale over N x that many "
                            "(default 1; 0 = share all cores, as generate does)")
    bench.add_argument("--serve", nargs="?", const="0,2", metavar="WORKERS", help="instead: serve's aggregate "
                       "decode at 1, 4 and 8 streams on these worker counts (default 0,2; 0 = in-process)")
    bench.add_argument("--llama2c", metavar="DIR", help="also time llama2.c's run.c and/or runq.c, built by you "
                       "into DIR as 'run' and 'runq' (gcc -Ofast -march=native -fopenmp run.c -lm -o DIR/run), in "
                       "the same rounds, and each process's time to first token")
    bench.add_argument("--contended", action="store_true", help="also time every row while a busy process holds one core")
    bench.set_defaults(handler=run)


def run(args) -> int:
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
    from llmtp.coordinator.bench.quantized import parse_quant
    quant = parse_quant(args.quant)
    llama2c = None
    if args.llama2c is not None:
        from llmtp.coordinator.bench.llama2c import find_programs
        llama2c = Path(args.llama2c)
        find_programs(llama2c)  # before any model is written: a folder without them is a one-line error
    if args.preset:
        model, path = args.preset, bench.synthetic_checkpoint(args.preset)
    else:
        model, path = Path(args.checkpoint).stem, Path(args.checkpoint)
    if args.serve is not None:
        if llama2c is not None:
            raise ConfigError("--llama2c times llama2.c beside the engine rows, not with --serve")
        from llmtp.coordinator.bench.serve_bench import run_from_args
        return run_from_args(args, model, path)
    report = bench.run_bench(model, path, worker_counts, args.prompt_tokens, args.decode_tokens, args.reduce,
                             args.compare_hf, probe_mib=args.probe_mib,
                             cores_per_worker=args.cores_per_worker or None, rounds=args.rounds,
                             contended=args.contended, quant=quant, llama2c=llama2c)
    print(bench.format_report(report))
    json_path, png_path = bench.save_report(report, Path(args.out))
    print(f"\nwrote {json_path}" + (f" and {png_path}" if png_path else
                                     " (no plot: pip install matplotlib)"))
    return 0
