"""Surviving the loss of a worker mid-generation.

RecoveringEngine logs every step it runs (its tokens and its sequences). When a step fails
with WorkerLost it has the engine recover (a local cluster restarts the worker; a configured
cluster waits for it to come back), replays the logged steps that built the KV caches still in
use, in the same order and the same shapes, and then runs the failed step. A matrix product
row, an attention over a sequence and the all-reduce in worker order give the same bits for
the same inputs in the same step shape, so the rebuilt caches and the logits are bit-identical
to an uninterrupted run's: sampled text does not change either (a single batched prefill would
sum in another order and flip a token near a sampling boundary).

Losses are counted per worker over a sliding window: a worker that dies again and again is
given up on, a long-running server that loses a worker once a day is not.
"""

import atexit
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from llmtp.common.model.transformer import StepSequence

from .cluster_engine import WorkerLost
from .engine import Engine

MAX_LOSSES_PER_WORKER = 3  # within LOSS_WINDOW_S; the fourth is fatal
LOSS_WINDOW_S = 600.0


@dataclass
class LoggedStep:
    """One step as it ran; `live[i]` is False once sequence i's positions were cut from its slot."""

    tokens: np.ndarray
    sequences: tuple[StepSequence, ...]
    live: list[bool] = field(default_factory=list)


@dataclass
class LossBudget:
    """At most `max_losses` recoveries of one worker within `window_s` seconds."""

    max_losses: int = MAX_LOSSES_PER_WORKER
    window_s: float = LOSS_WINDOW_S
    clock: object = time.monotonic
    losses: dict[int, deque] = field(default_factory=dict)

    def spend(self, worker: int) -> int | None:
        """Record a loss of `worker`: how many it has had in the window, or None if over budget."""
        now = self.clock()
        recent = self.losses.setdefault(worker, deque())
        while recent and now - recent[0] > self.window_s:
            recent.popleft()
        if len(recent) >= self.max_losses:
            return None
        recent.append(now)
        return len(recent)


class RecoveringEngine(Engine):
    def __init__(self, engine, wait_seconds: float = 30.0, budget: LossBudget | None = None, log=sys.stderr):
        self.engine = engine
        self.wait_seconds = wait_seconds
        self.budget = budget or LossBudget()
        self.log = log
        self.steps: list[LoggedStep] = []
        self.lengths: dict[int, int] = {}  # slot -> positions cached
        self.recoveries = 0
        # A caller cut short (`generate | head`: BrokenPipeError in its own cleanup) may never
        # call close(): the workers, the shared memory and the run folder still go at exit.
        atexit.register(self.close)

    @property
    def config(self):
        return self.engine.config

    @property
    def n_slots(self) -> int:
        return self.engine.n_slots

    def step(self, tokens: np.ndarray, sequences: Sequence[StepSequence], all_logits: bool = False) -> np.ndarray:
        tokens = np.asarray(tokens)
        self.forget_overwritten(sequences)
        try:
            logits = self.engine.step(tokens, sequences, all_logits)
        except WorkerLost as lost:
            logits = self.recover_and_replay(lost, tokens, sequences, all_logits)
        self.remember(tokens, sequences)
        return logits

    def recover_and_replay(self, lost: WorkerLost, tokens, sequences, all_logits: bool) -> np.ndarray:
        while True:
            count = self.budget.spend(lost.index)
            if count is None:
                raise WorkerLost(lost.index, f"{lost} (lost {self.budget.max_losses + 1} times within "
                                             f"{self.budget.window_s:.0f} s: giving up on it)")
            self.recoveries += 1
            print(f"llmtp: {lost}; recovering (loss {count} of {self.budget.max_losses} allowed for this "
                  f"worker in {self.budget.window_s:.0f} s)", file=self.log, flush=True)
            try:
                self.engine.recover(self.wait_seconds, {lost.index})
                self.replay()
                return self.engine.step(tokens, sequences, all_logits)
            except WorkerLost as again:
                lost = again

    def replay(self) -> None:
        """Run every logged step again, as it ran; their logits were already used."""
        positions = sum(int(len(logged.tokens)) for logged in self.steps)
        print(f"llmtp: rebuilding the caches: {len(self.steps)} steps, {positions} positions", file=self.log,
              flush=True)
        for logged in self.steps:
            self.engine.step(logged.tokens, logged.sequences)

    def forget_overwritten(self, sequences: Sequence[StepSequence]) -> None:
        """A sequence that starts before its slot's end cuts positions off: a step that wrote only
        cut positions no longer matters to any cache (a step that wrote some kept ones does)."""
        cuts = {seq.slot: seq.start_position for seq in sequences
                if seq.start_position < self.lengths.get(seq.slot, 0)}
        if not cuts:
            return
        for logged in self.steps:
            for i, seq in enumerate(logged.sequences):
                if seq.slot in cuts and seq.start_position >= cuts[seq.slot]:
                    logged.live[i] = False
        # Kept whole while any part is live: the step's shape is part of its numbers.
        self.steps = [logged for logged in self.steps if any(logged.live)]

    def remember(self, tokens, sequences: Sequence[StepSequence]) -> None:
        for seq in sequences:
            assert seq.start_position <= self.lengths.get(seq.slot, 0), \
                f"slot {seq.slot} skips to {seq.start_position}"
            self.lengths[seq.slot] = seq.start_position + seq.n_tokens
        self.steps.append(LoggedStep(np.array(tokens, copy=True), tuple(sequences), [True] * len(sequences)))

    def worker_stats(self):  # bench.py's until it reads stats()
        return self.engine.worker_stats()

    def stats(self):
        return self.engine.stats()

    def timing(self):
        return self.engine.timing()

    def close(self) -> None:
        atexit.unregister(self.close)
        self.engine.close()
