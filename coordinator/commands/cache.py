"""`llmtp cache [list | size | clean [--all] [--dry-run]]`: the shard cache under
$LLMTP_CACHE_DIR (default ~/.cache/llmtp)."""

from llmtp.common.errors import ConfigError


def register(subparsers) -> None:
    cache = subparsers.add_parser("cache", help="list, size or clean the shard cache ($LLMTP_CACHE_DIR)")
    actions = cache.add_subparsers(dest="cache_command", metavar="ACTION")
    cache.set_defaults(handler=run_list)
    actions.add_parser("list", help="every shard folder and bench preset, its size and state "
                                    "(the default)").set_defaults(handler=run_list)
    actions.add_parser("size", help="the cache's total size").set_defaults(handler=run_size)
    clean = actions.add_parser("clean", help="remove stale shards (their checkpoint changed or is gone) and "
                                             "unfinished ones; never those a running `cluster up` serves")
    clean.add_argument("--all", action="store_true", help="also current shards and bench presets "
                                                         "(remade on demand)")
    clean.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    clean.set_defaults(handler=run_clean)


def megabytes(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:,.1f} MB"


def run_list(args) -> int:
    from ..local_cluster import cache_dir
    from ..shard_cache import inventory
    entries = inventory()
    if not entries:
        print(f"{cache_dir()}: empty")
        return 0
    width = max(len(entry.path.name) for entry in entries)
    for entry in entries:
        print(f"{entry.path.name:<{width}}  {megabytes(entry.n_bytes):>12}  {entry.state:<13}  {entry.note}")
    print(f"{cache_dir()}: {len(entries)} entries, {megabytes(sum(e.n_bytes for e in entries))}")
    return 0


def run_size(args) -> int:
    from ..local_cluster import cache_dir
    from ..shard_cache import inventory
    total = sum(entry.n_bytes for entry in inventory())
    print(f"{total} bytes ({megabytes(total)}) in {cache_dir()}")
    return 0


def run_clean(args) -> int:
    from ..local_cluster import cache_dir
    from ..shard_cache import inventory, remove
    gone = [entry for entry in inventory() if entry.removable(args.all)]
    for entry in gone:
        if not args.dry_run:
            try:
                remove(entry)
            except OSError as error:
                raise ConfigError(f"{entry.path}: cannot remove ({error.strerror})") from None
        print(f"{'would remove' if args.dry_run else 'removed'} {entry.path.name} "
              f"({megabytes(entry.n_bytes)}, {entry.state})")
    freed = sum(entry.n_bytes for entry in gone)
    print(f"{'would free' if args.dry_run else 'freed'} {megabytes(freed)} in {cache_dir()}")
    return 0
