"""The ways workers can sum their partial results (reduce modes), defined once.

Imports nothing heavy, so the cluster config and the CLI can name the modes before numpy
or zmq load."""

from enum import Enum


class ReduceMode(str, Enum):
    PEERS = "peers"  # workers exchange partials directly over ZeroMQ (one hop per sync)
    STAR = "star"  # every partial goes through the coordinator, which answers the sum
    SHM = "shm"  # a shared-memory segment the coordinator creates (one machine only)


REDUCE_MODES = tuple(mode.value for mode in ReduceMode)
# A cluster YAML spans hosts: shared memory is chosen by local clusters only.
CONFIG_REDUCE_MODES = (ReduceMode.PEERS.value, ReduceMode.STAR.value)


def choose_reduce_mode(n_workers: int, requested: ReduceMode | None = None, local: bool = False) -> ReduceMode:
    """The one policy. One worker: nothing to sum (star, which never relays). Asked for: that.
    A local cluster: shared memory when every worker has a core of its own to spin on and
    stores are seen in program order (x86-64); otherwise the ZeroMQ peer exchange."""
    import os
    import platform
    if n_workers < 2:
        return ReduceMode.STAR
    if requested is not None:
        return ReduceMode(requested)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if local and n_workers <= cores and platform.machine().lower() in ("x86_64", "amd64"):
        return ReduceMode.SHM
    return ReduceMode.PEERS
