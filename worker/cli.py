"""`llmtp worker` / `python -m worker`: serve one shard."""

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shard", required=True, help="this worker's shard file (from `llmtp shard`)")
    parser.add_argument("--bind", default="tcp://127.0.0.1:*",
                        help="ZeroMQ endpoint to listen on, e.g. tcp://0.0.0.0:5555 (port * = any free port)")
    parser.add_argument("--announce", help="write the bound endpoint to this file once listening")
    parser.add_argument("--parent-pid", type=int, help="exit when this process is gone (set by local clusters)")
    parser.add_argument("--threads", type=int, default=0, help="BLAS threads (default: all cores)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for the coordinator mid-step before dropping its session")


def cmd_worker(args) -> int:
    if args.threads > 0:  # must precede numpy's import to take effect
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(args.threads)
    from .server import WorkerOptions, run_worker
    return run_worker(args.shard, WorkerOptions(bind=args.bind, announce_file=args.announce,
                                                parent_pid=args.parent_pid, reduce_timeout=args.timeout))


def main(argv: list[str] | None = None) -> int:
    from common.errors import run_handler
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    add_arguments(parser)
    parser.set_defaults(handler=cmd_worker)
    return run_handler(parser.parse_args(argv))
