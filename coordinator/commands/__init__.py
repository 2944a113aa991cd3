"""One module per `llmtp` subcommand, each with `register(subparsers)` (its arguments and
handler) and its run function. To add a command: a module here and one line in COMMANDS."""

from . import bench, cache, chat, cluster, convert, generate, inspect, keygen, serve, shard, tokenize, worker

COMMANDS = (generate, chat, serve, shard, worker, cluster, keygen, tokenize, convert, bench, inspect, cache)


def register_all(subparsers) -> None:
    for command in COMMANDS:
        command.register(subparsers)
