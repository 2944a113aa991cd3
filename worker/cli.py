"""`llmtp worker` / `python -m llmtp.worker`: serve one shard."""

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shard", help="this worker's shard file (from `llmtp shard`)")
    parser.add_argument("--config", help="cluster YAML: shard, address, ports, threads, timeouts and keys "
                        "come from its workers[INDEX] entry")
    parser.add_argument("--index", type=int,
                        help="with --config: this worker's position in the config's workers list (0-based)")
    parser.add_argument("--bind", help="ZeroMQ endpoint to listen on, e.g. tcp://127.0.0.1:5555 "
                        "(port * = any free port; default tcp://127.0.0.1:*). Loopback only: off loopback a "
                        "worker needs keys, given by --config")
    parser.add_argument("--secret-file", help="a file holding the secret every HELLO must carry "
                        "(set by local clusters; readable only by their owner)")
    parser.add_argument("--announce", help="write the bound endpoint to this file once listening")
    parser.add_argument("--parent-pid", type=int, help="exit when this process is gone (set by local clusters)")
    parser.add_argument("--threads", type=int, help="BLAS threads (default: all cores)")
    parser.add_argument("--cpus", help="pin this worker (and its BLAS threads) to these cores, e.g. 0,1")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="run the shard unchecked: skip its sha256 check against the manifest.json "
                             "beside it, or serve one that has no manifest.json (refused otherwise)")
    parser.add_argument("--context", type=int, metavar="N",
                        help="positions of context to hold (default: the model's seq_len; fewer need less memory)")
    parser.add_argument("--timeout", type=float,
                        help="seconds to wait for a reduction mid-step before dropping the session (default 60)")


def cmd_worker(args) -> int:
    from .settings import settings_from_args
    settings = settings_from_args(args)
    if args.cpus:  # before numpy and zmq start their threads, so that they inherit it
        pin_to_cpus(args.cpus)
    if settings.threads > 0:  # must precede numpy's import to take effect
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(settings.threads)
    from .run import run_worker
    from .server import WorkerOptions
    return run_worker(settings.shard_path(), WorkerOptions(
        bind=settings.bind, announce_file=args.announce, parent_pid=args.parent_pid,
        reduce_timeout=settings.reduce_timeout, peer_port=settings.peer_port, keys=settings.keys,
        verify=args.verify, secret=read_secret(args.secret_file), context=args.context))


def read_secret(path: str | None) -> str | None:
    from llmtp.common.errors import ConfigError
    if path is None:
        return None
    try:
        secret = open(path).read().strip()
    except OSError as error:
        raise ConfigError(f"--secret-file {path}: {error.strerror}") from None
    if not secret:
        raise ConfigError(f"--secret-file {path}: the file is empty")
    return secret


def pin_to_cpus(text: str) -> None:
    from llmtp.common.errors import ConfigError
    try:
        cpus = {int(cpu) for cpu in text.split(",")}
        os.sched_setaffinity(0, cpus)
    except (ValueError, OSError) as error:
        raise ConfigError(f"--cpus {text!r}: expected a comma-separated list of usable core numbers "
                          f"({error})") from None


def main(argv: list[str] | None = None) -> int:
    from llmtp.common.errors import run_handler
    parser = argparse.ArgumentParser(prog="python -m llmtp.worker", description=__doc__)
    add_arguments(parser)
    parser.set_defaults(handler=cmd_worker)
    return run_handler(parser.parse_args(argv))
