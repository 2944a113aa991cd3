"""Surviving the loss of a worker mid-generation.

RecoveringEngine remembers every token fed to each KV-cache slot. When a step fails
with WorkerLost it has the engine recover (a local cluster restarts the worker; a
configured cluster waits for it to come back), rebuilds every slot's KV cache by one
prefill over its tokens so far, and returns the logits the failed step would have
given. The generation loop never notices, so the text is that of an uninterrupted run
(up to float rounding: a batched prefill sums in another order than step-by-step decode).
"""

import sys
from typing import Sequence

import numpy as np

from llmtp.common.model.transformer import StepSequence

from .cluster_engine import WorkerLost
from .engine import Engine


class RecoveringEngine(Engine):
    def __init__(self, engine, wait_seconds: float = 30.0, max_recoveries: int = 3, log=sys.stderr):
        self.engine = engine
        self.wait_seconds = wait_seconds
        self.max_recoveries = max_recoveries
        self.log = log
        self.history: dict[int, list[int]] = {}  # slot -> token ids at positions 0..
        self.recoveries = 0

    @property
    def config(self):
        return self.engine.config

    @property
    def n_slots(self) -> int:
        return self.engine.n_slots

    def step(self, tokens: np.ndarray, sequences: Sequence[StepSequence], all_logits: bool = False) -> np.ndarray:
        tokens = np.asarray(tokens)
        try:
            logits = self.engine.step(tokens, sequences, all_logits)
        except WorkerLost as lost:
            logits = self.recover_and_replay(lost, tokens, sequences, all_logits)
        self.remember(tokens, sequences)
        return logits

    def recover_and_replay(self, lost: WorkerLost, tokens, sequences, all_logits: bool) -> np.ndarray:
        while True:
            if self.recoveries >= self.max_recoveries:
                raise lost
            self.recoveries += 1
            print(f"llmtp: {lost}; recovering (attempt {self.recoveries} of {self.max_recoveries})",
                  file=self.log, flush=True)
            try:
                self.engine.recover(self.wait_seconds, {lost.index})
                return self.replay(tokens, sequences, all_logits)
            except WorkerLost as again:
                lost = again

    def replay(self, tokens, sequences: Sequence[StepSequence], all_logits: bool) -> np.ndarray:
        """One step that refills every slot from position 0 and ends with the failed step's tokens."""
        blocks, replay_sequences, wanted_rows = [], [], []
        row, offset = 0, 0
        for seq in sequences:
            history = self.history.get(seq.slot, [])[: seq.start_position]
            assert len(history) == seq.start_position, f"slot {seq.slot} has a gap before {seq.start_position}"
            block = np.concatenate([np.asarray(history, dtype=tokens.dtype), tokens[offset: offset + seq.n_tokens]])
            offset += seq.n_tokens
            blocks.append(block)
            replay_sequences.append(StepSequence(seq.slot, 0, len(block)))
            first = row + len(block) - seq.n_tokens if all_logits else len(replay_sequences) - 1
            wanted_rows.extend(range(first, row + len(block)) if all_logits else [first])
            row += len(block)
        stepping = {seq.slot for seq in sequences}
        for slot, history in self.history.items():  # idle slots lost their caches too
            if slot not in stepping and history:
                blocks.append(np.asarray(history, dtype=tokens.dtype))
                replay_sequences.append(StepSequence(slot, 0, len(history)))
                row += len(history)
        print(f"llmtp: rebuilding {row} cached positions", file=self.log, flush=True)
        logits = self.engine.step(np.concatenate(blocks), replay_sequences, all_logits)
        return logits[wanted_rows]

    def remember(self, tokens, sequences: Sequence[StepSequence]) -> None:
        offset = 0
        for seq in sequences:
            history = self.history.setdefault(seq.slot, [])
            assert seq.start_position <= len(history), f"slot {seq.slot} skips to {seq.start_position}"
            del history[seq.start_position:]
            history.extend(int(t) for t in tokens[offset: offset + seq.n_tokens])
            offset += seq.n_tokens

    def worker_stats(self):
        return self.engine.worker_stats()

    def stats(self):
        return self.engine.stats()

    def timing(self):
        return self.engine.timing()

    def close(self) -> None:
        self.engine.close()
