"""`llmtp worker`: serve one shard to a coordinator (the worker package's own command line)."""


def register(subparsers) -> None:
    from llmtp.worker.cli import add_arguments
    work = subparsers.add_parser("worker", help="serve one shard to a coordinator")
    add_arguments(work)
    work.set_defaults(handler=run)


def run(args) -> int:
    from llmtp.worker.cli import cmd_worker
    return cmd_worker(args)
