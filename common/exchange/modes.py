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
