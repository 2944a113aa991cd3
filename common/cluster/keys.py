"""The CURVE keys a cluster YAML names, loaded for the host that needs them.

Beside the config schema so that the wire (common/wire/security.py) takes plain paths and
never imports the schema."""

from llmtp.common.wire.security import CoordinatorKeys, WorkerKeys, load_key_pair, load_public_key

from .config import ClusterConfig


def load_worker_keys(config: ClusterConfig) -> WorkerKeys | None:
    """What a worker host needs: the worker pair and the coordinator's public key (None without keys)."""
    if config.keys is None:
        return None
    return WorkerKeys(worker=load_key_pair(config.keys.worker_secret, f"{config.path}: keys.worker_secret"),
                      coordinator_public=load_public_key(config.keys.coordinator_public,
                                                         f"{config.path}: keys.coordinator_public"))


def load_coordinator_keys(config: ClusterConfig) -> CoordinatorKeys | None:
    """What the coordinator's host needs: its pair and the workers' public key (None without keys)."""
    if config.keys is None:
        return None
    return CoordinatorKeys(
        coordinator=load_key_pair(config.keys.coordinator_secret, f"{config.path}: keys.coordinator_secret"),
        worker_public=load_public_key(config.keys.worker_public, f"{config.path}: keys.worker_public"))
