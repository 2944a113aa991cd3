"""Recovery replays the steps that built the caches, so the numbers after a loss are the
uninterrupted run's to the last bit (issue 12.10), on a 32,000-token vocabulary, greedy and
seeded; and losses are budgeted per worker over a time window (issue 12.9)."""

import io

import numpy as np
import pytest

from llmtp.common.model.sampler import Sampler, SamplerConfig
from llmtp.common.model.transformer import StepSequence
from llmtp.coordinator.cluster_engine import WorkerLost
from llmtp.coordinator.generate import generate
from llmtp.coordinator.local_engine import LocalEngine
from llmtp.coordinator.recovery import LossBudget, RecoveringEngine
from model_factory import make_config, random_weights


class FlakyEngine(LocalEngine):
    """An in-process engine that 'loses a worker' at chosen step numbers: the step fails and every
    KV cache is wiped, as a restarted worker's would be."""

    def __init__(self, config, weights, n_slots, fail_at: set[int]):
        super().__init__(config, weights, n_slots)
        self.fail_at, self.n_steps = set(fail_at), 0

    def step(self, tokens, sequences, all_logits=False):
        self.n_steps += 1
        if self.n_steps in self.fail_at:
            self.fail_at.discard(self.n_steps)
            raise WorkerLost(1, "worker 1 lost (test)")
        return super().step(tokens, sequences, all_logits)

    def recover(self, wait_seconds, lost):
        self.model.cache.keys[...] = np.nan  # anything not rebuilt poisons the logits
        self.model.cache.values[...] = np.nan


@pytest.fixture(scope="module")
def big_vocab_model():
    config = make_config(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, seq_len=96)
    return config, random_weights(config, seed=7)


def run(model, fail_at=(), temperature=1.0, seed=42, prompt=(1, 5, 9, 300, 7000)):
    config, weights = model
    inner = FlakyEngine(config, weights, 1, set(fail_at))
    engine = RecoveringEngine(inner, log=io.StringIO())
    logits_seen = []
    original_step = engine.step

    def recording_step(tokens, sequences, all_logits=False):
        logits = original_step(tokens, sequences, all_logits)
        logits_seen.append(logits.copy())
        return logits

    engine.step = recording_step
    sampler = Sampler(SamplerConfig(temperature=temperature, topp=0.9, seed=seed))
    result = generate(engine, sampler, list(prompt), 80)
    return result.generated_ids, logits_seen, engine.recoveries


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_text_and_logits_after_losses_are_bit_identical(big_vocab_model, temperature):
    expected_ids, expected_logits, _ = run(big_vocab_model, temperature=temperature)
    rng = np.random.default_rng(3)
    for fail_at in ([2], [40], sorted(rng.choice(np.arange(2, 70), size=3, replace=False).tolist())):
        ids, logits, recoveries = run(big_vocab_model, fail_at, temperature=temperature)
        assert recoveries == len(fail_at)
        assert ids == expected_ids
        assert len(logits) == len(expected_logits)
        assert all(np.array_equal(a, b) for a, b in zip(logits, expected_logits)), fail_at


def test_batched_steps_and_reused_slots_replay_exactly(big_vocab_model):
    config, weights = big_vocab_model

    def drive(fail_at):
        engine = RecoveringEngine(FlakyEngine(config, weights, 3, set(fail_at)), log=io.StringIO())
        out = [engine.step(np.array([1, 2, 3, 4, 5, 6]), [StepSequence(0, 0, 4), StepSequence(1, 0, 2)])]
        for position in range(8):
            out.append(engine.step(np.array([10 + position, 20 + position]),
                                   [StepSequence(0, 4 + position, 1), StepSequence(1, 2 + position, 1)]))
        # slot 1 restarts with a new prompt; slot 0 goes on; slot 2 joins
        out.append(engine.step(np.array([7, 8, 9, 11]), [StepSequence(1, 0, 3), StepSequence(2, 0, 1)]))
        for position in range(6):
            out.append(engine.step(np.array([30 + position, 40 + position, 50 + position]),
                                   [StepSequence(0, 12 + position, 1), StepSequence(1, 3 + position, 1),
                                    StepSequence(2, 1 + position, 1)]))
        return out, engine

    expected, _ = drive(())
    for fail_at in ([3], [10], [11, 14]):
        got, engine = drive(fail_at)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected)), fail_at
    # slot 1's first 8 decode steps were cut by its new prompt, but they wrote slot 0 too: kept
    assert len(engine.steps) == 1 + 8 + 1 + 6


def test_steps_that_wrote_only_cut_positions_are_forgotten(big_vocab_model):
    config, weights = big_vocab_model
    engine = RecoveringEngine(FlakyEngine(config, weights, 1, set()), log=io.StringIO())
    for _ in range(3):  # three prompts in one slot, each from position 0
        engine.step(np.array([1, 2, 3]), [StepSequence(0, 0, 3)])
        engine.step(np.array([4]), [StepSequence(0, 3, 1)])
    assert len(engine.steps) == 2


def test_losses_are_budgeted_per_worker_over_a_window():
    now = [0.0]
    budget = LossBudget(max_losses=3, window_s=100, clock=lambda: now[0])
    assert [budget.spend(1) for _ in range(3)] == [1, 2, 3]
    assert budget.spend(1) is None  # the fourth loss of worker 1 within the window
    assert budget.spend(0) == 1  # another worker has its own budget
    now[0] = 101.0
    assert budget.spend(1) == 1  # old losses leave the window


def test_a_worker_lost_too_often_is_given_up_on(big_vocab_model):
    config, weights = big_vocab_model
    engine = RecoveringEngine(FlakyEngine(config, weights, 1, {2, 3, 4, 5}), log=io.StringIO(),
                              budget=LossBudget(max_losses=2, window_s=1000))
    engine.step(np.array([1, 2]), [StepSequence(0, 0, 2)])
    with pytest.raises(WorkerLost, match="giving up"):
        engine.step(np.array([3]), [StepSequence(0, 2, 1)])
