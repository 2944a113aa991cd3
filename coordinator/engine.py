"""The Engine interface: what the generation loop, the CLI, bench and the server may ask of
any engine (in-process, local workers, a cluster from YAML). Callers never probe with
hasattr; an opener returns a complete engine (recovery included where it applies)."""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from llmtp.common.model.config import ModelConfig
from llmtp.common.model.transformer import StepSequence


@dataclass(frozen=True)
class StepTiming:
    """How one worker's last step went: all of it, and the part spent inside all-reduces."""

    forward_s: float
    reduce_s: float


@dataclass(frozen=True)
class WorkerStats:
    """Memory of one worker process (PONG), for bench and the server's metrics."""

    pid: int
    rss_bytes: int
    peak_rss_bytes: int
    shard_bytes: int
    kv_cache_bytes: int


class Engine(ABC):
    """Runs steps: each step feeds tokens of several sequences (their own KV slots) and returns logits.

    config: the model's; n_slots: how many sequences can be cached at once."""

    config: ModelConfig
    n_slots: int

    @abstractmethod
    def step(self, tokens: np.ndarray, sequences: Sequence[StepSequence], all_logits: bool = False) -> np.ndarray:
        """tokens: (T,) ids of every sequence in order -> logits (n_sequences, vocab), or (T, vocab)."""

    def stats(self) -> list[WorkerStats]:
        """One entry per worker process; none for an engine without workers."""
        return []

    def timing(self) -> list[StepTiming]:
        """One entry per worker for the last step; none for an engine without workers."""
        return []

    @abstractmethod
    def close(self) -> None:
        """Release everything the engine started or opened; safe to call twice."""

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
