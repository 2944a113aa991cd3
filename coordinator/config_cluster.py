"""A cluster described by a YAML file (common/cluster_config.py): cut the model into one
folder per host, and open the coordinator's engine on the workers the file lists."""

import shutil
import sys
import tempfile
from pathlib import Path

from llmtp.common.cluster.config import ClusterConfig
from llmtp.common.errors import ConfigError
from llmtp.common.formats.manifest import MANIFEST_NAME, Manifest, load_manifest
from llmtp.common.cluster.keys import load_coordinator_keys
from llmtp.common.formats.shard_file import EMBEDDING_NAME, load_embedding, shard_file_name, write_shards

from .cluster_engine import ClusterEngine


def shard_for_config(config: ClusterConfig, progress: bool = True) -> dict[str, list[Path]]:
    """Write <shards>/<host>/ for every host: shard-S-of-N.bin of each worker there, and on
    the coordinator's host embedding.bin, and on every host manifest.json (the coordinator's
    written last: its folder is complete once it exists). Returns host -> files written."""
    from llmtp.common.formats.load import load_model
    if not config.model.exists():
        raise ConfigError(f"{config.path}: model: {config.model} does not exist")
    checkpoint = load_model(config.model)
    config.shards.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=config.shards))
    placed: dict[str, list[Path]] = {}

    def place(name: str, host: str) -> None:
        folder = config.host_folder(host)
        folder.mkdir(exist_ok=True)
        (staging / name).replace(folder / name)
        placed.setdefault(host, []).append(folder / name)

    try:
        write_shards(checkpoint, config.n_workers, staging, progress=progress)
        for worker in config.by_shard():
            place(shard_file_name(worker.shard, config.n_workers), worker.host)
        place(EMBEDDING_NAME, config.coordinator.host)
        # Every host gets the manifest: a worker checks its shard's sha256 against it at start.
        for host in sorted({worker.host for worker in config.by_shard()} - {config.coordinator.host}):
            config.host_folder(host).mkdir(exist_ok=True)
            shutil.copyfile(staging / MANIFEST_NAME, config.host_folder(host) / MANIFEST_NAME)
            placed[host].append(config.host_folder(host) / MANIFEST_NAME)
        place(MANIFEST_NAME, config.coordinator.host)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return placed


def coordinator_manifest(config: ClusterConfig) -> Manifest:
    """The manifest in the coordinator's folder, checked against the config's worker count."""
    folder = config.coordinator_folder
    if not (folder / MANIFEST_NAME).is_file():
        raise ConfigError(f"{config.path}: {folder / MANIFEST_NAME} does not exist; run "
                          f"`llmtp shard --config {config.path}` first (on a host that has the model)")
    manifest = load_manifest(folder)
    if manifest.n_workers != config.n_workers:
        raise ConfigError(f"{config.path}: the shards in {folder} are cut for {manifest.n_workers} workers, the "
                          f"config lists {config.n_workers}; run `llmtp shard --config` again")
    return manifest


def open_config_engine(config: ClusterConfig, manifest: Manifest | None = None, n_slots: int = 1,
                       timeout: float | None = None) -> ClusterEngine:
    """Connect to the config's workers (in shard order) as its coordinator. Maps only embedding.bin."""
    manifest = manifest or coordinator_manifest(config)
    keys = load_coordinator_keys(config)
    if config.plaintext_notice():
        print(config.plaintext_notice(), file=sys.stderr)
    return ClusterEngine(manifest.config, load_embedding(manifest), [w.endpoint for w in config.by_shard()],
                         manifest.source_sha256, n_slots=n_slots, timeout=timeout or config.timeouts.reply,
                         reduce=config.reduce, keys=keys, liveness=config.timeouts.liveness)
