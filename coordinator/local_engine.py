"""The single-process engine: the whole model as the one and only slice."""

import sys
from typing import Sequence

import numpy as np

from llmtp.common.model.config import ModelConfig
from llmtp.common.formats.mapping import settle_on_huge_pages
from llmtp.common.model.split import full_slice
from llmtp.common.model.transformer import SliceModel, StepSequence
from llmtp.common.model.weights import ModelWeights

from .engine import Engine


class LocalEngine(Engine):
    """Runs steps in this process. The cluster engine (coordinator/) has the same
    `step` signature, so the generation loop cannot tell them apart."""

    def __init__(self, config: ModelConfig, weights: ModelWeights, n_slots: int = 1):
        self.config = config
        self.weights = weights
        self.n_slots = n_slots
        self.model = SliceModel(config, full_slice(config), weights.as_shard(), n_slots)

    @classmethod
    def from_checkpoint(cls, checkpoint, n_slots: int = 1, config: ModelConfig | None = None) -> "LocalEngine":
        """An engine over a loaded checkpoint's map, first faulted in (onto 2 MiB pages where
        possible: see common/mapping.py). config: the checkpoint's with a shorter context."""
        if checkpoint.mapping is not None:
            note = settle_on_huge_pages(checkpoint.mapping, checkpoint.path)
            if note:
                print(f"llmtp: {note}", file=sys.stderr)
        return cls(config or checkpoint.config, checkpoint.weights, n_slots)

    def step(self, tokens: np.ndarray, sequences: Sequence[StepSequence], all_logits: bool = False) -> np.ndarray:
        """tokens: (T,) ids of all sequences in order -> logits (n_sequences or T, vocab_size)."""
        x = self.weights.embed(np.asarray(tokens, dtype=np.int64))
        return self.model.forward(x, sequences, all_logits=all_logits)

    def close(self) -> None:
        pass
