"""`llmtp shard CHECKPOINT -w N -o DIR` (or `--config cluster.yaml`): one shard file per worker.

Each file is written under a temporary name and renamed when complete. A DIR that already
holds shards (a manifest.json) is refused unless --force, which replaces them file by file."""

import sys
from pathlib import Path

from llmtp.common.errors import ConfigError

from .arguments import positive_int
from .outputs import make_folder

MANIFEST_NAME = "manifest.json"


def register(subparsers) -> None:
    shard = subparsers.add_parser("shard", help="cut a checkpoint into one shard file per worker")
    shard.add_argument("checkpoint", nargs="?")
    shard.add_argument("-w", "--workers", type=positive_int)
    shard.add_argument("-o", "--output", help="folder for the shards and manifest.json")
    shard.add_argument("--force", action="store_true",
                       help="replace the shards already in -o (each file atomically)")
    shard.add_argument("--config", help="cluster YAML: write one folder per host under its shards folder "
                       "(instead of CHECKPOINT, -w and -o)")
    shard.set_defaults(handler=run)


def run(args) -> int:
    if args.config is not None:
        return run_for_config(args)
    missing = [name for name, value in (("CHECKPOINT", args.checkpoint), ("-w/--workers", args.workers),
                                        ("-o/--output", args.output)) if value is None]
    if missing:
        raise ConfigError(f"shard needs {', '.join(missing)} (or --config cluster.yaml)")
    from ..shard import describe_manifest, run_shard
    output = Path(args.output)
    make_folder(output, "-o")
    if (output / MANIFEST_NAME).exists() and not args.force:
        raise ConfigError(f"-o {output}: already holds shards ({MANIFEST_NAME}); give --force to replace them")
    manifest = run_shard(args.checkpoint, args.workers, output)
    print(describe_manifest(manifest))
    return 0


def run_for_config(args) -> int:
    from llmtp.common.cluster.config import load_cluster_config

    from ..config_cluster import shard_for_config
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
