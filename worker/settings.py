"""What `llmtp worker` runs with: from its flags, or from its entry in a cluster YAML
(`--config cluster.yaml --index I`). Imports no numpy, so the BLAS thread count can
still go into the environment before numpy loads."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llmtp.common.cluster.addresses import is_loopback
from llmtp.common.errors import ConfigError

if TYPE_CHECKING:  # yaml and ZeroMQ's authenticator (~50 ms of a start) load only for --config
    from llmtp.common.cluster.config import ClusterConfig, WorkerEntry
    from llmtp.common.wire.security import WorkerKeys

DEFAULT_BIND = "tcp://127.0.0.1:*"
DEFAULT_REDUCE_TIMEOUT = 60.0


@dataclass(frozen=True)
class WorkerSettings:
    bind: str
    threads: int  # 0 = all cores
    reduce_timeout: float
    peer_port: int | None = None  # None = any free port
    keys: WorkerKeys | None = None
    shard_file: Path | None = None  # given by --shard
    config: ClusterConfig | None = None  # given by --config
    entry: WorkerEntry | None = None

    def shard_path(self) -> Path:
        """The shard to serve. Imports numpy: call once the thread count is in the environment."""
        if self.shard_file is not None:
            return self.shard_file
        from llmtp.common.formats.shard_file import shard_file_name
        folder = self.config.host_folder(self.entry.host)
        path = folder / shard_file_name(self.entry.shard, self.config.n_workers)
        if not path.is_file():
            raise ConfigError(f"{self.config.path}: shard {self.entry.shard} of {self.entry.host} should be at "
                              f"{path}, which does not exist; run `llmtp shard --config` and copy {folder}/ here")
        return path


def settings_from_args(args) -> WorkerSettings:
    if args.config is None:
        if args.shard is None:
            raise ConfigError("worker needs --shard FILE, or --config cluster.yaml --index I")
        if args.index is not None:
            raise ConfigError("--index needs --config")
        check_bind_is_safe(args.bind or DEFAULT_BIND)
        return WorkerSettings(bind=args.bind or DEFAULT_BIND, threads=args.threads or 0,
                              reduce_timeout=args.timeout or DEFAULT_REDUCE_TIMEOUT, shard_file=Path(args.shard))
    given = [flag for flag, value in (("--shard", args.shard), ("--bind", args.bind), ("--threads", args.threads),
                                      ("--timeout", args.timeout)) if value is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} cannot go with --config (the config's worker entry sets them)")
    if args.index is None:
        raise ConfigError("--config needs --index I (this worker's position in the config's workers list)")
    from llmtp.common.cluster.config import load_cluster_config
    from llmtp.common.cluster.keys import load_worker_keys
    config = load_cluster_config(args.config)
    entry = config.worker(args.index)
    if config.plaintext_notice():
        print(config.plaintext_notice(), file=sys.stderr)
    return WorkerSettings(bind=entry.bind_endpoint, threads=entry.threads, reduce_timeout=config.timeouts.reduce,
                          peer_port=entry.peer_port, keys=load_worker_keys(config), config=config, entry=entry)


def check_bind_is_safe(bind: str) -> None:
    """The YAML's rule for a bare `--bind`: without keys, only loopback (anyone who reaches an
    unkeyed worker's port can talk to it)."""
    if not bind.startswith("tcp://"):
        return  # ipc:// and inproc:// never leave the machine
    host = bind[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host in ("*", "") or not (host == "localhost" or is_loopback(host)):
        raise ConfigError(f"--bind {bind}: {host or '*'} is not a loopback address; a worker reachable from other "
                          f"machines needs CURVE keys (run it as `llmtp worker --config cluster.yaml --index I` "
                          f"with a keys: section, made by `llmtp keygen`)")
