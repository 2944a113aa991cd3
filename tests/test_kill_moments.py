"""Issue 12's must-show: kill -9 of a worker at 10 random moments of a seeded `-t 1 -p 0.9` run
of the 15M shape (32,000-token vocabulary), with 2 and 3 workers: every text equals the
uninterrupted run's on the same worker count. Real processes, minutes: the slow pass."""

import os
import random
import signal

import pytest

from llmtp.common.formats.checkpoint import load_checkpoint, write_checkpoint
from llmtp.common.formats.shard_file import write_shards
from llmtp.common.model.sampler import Sampler, SamplerConfig
from llmtp.coordinator.bench.presets import PRESETS
from llmtp.coordinator.generate import generate
from llmtp.coordinator.local_cluster import open_local_engine
from llmtp.coordinator.recovery import RecoveringEngine
from model_factory import random_weights

pytestmark = pytest.mark.slow
PROMPT = [1, 450, 4996, 17354, 1701, 432, 17204, 975]  # 8 tokens: a real prefill before the decode
STEPS = 48
MOMENTS = 10


@pytest.fixture(scope="module")
def model_15m(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kill-15m")
    config = PRESETS["15M"]
    assert config.vocab_size == 32000
    checkpoint = load_checkpoint(write_checkpoint(folder / "15m.bin", config, random_weights(config, seed=3), 1))
    for n_workers in (2, 3):
        write_shards(checkpoint, n_workers, folder / f"{n_workers}w", progress=False)
    return folder


def run(folder, n_workers: int, kill_at: tuple[int, int] | None = None) -> tuple[list[int], int]:
    """(generated ids, recoveries); kill_at = (token count, worker index) kills that worker then."""
    engine = RecoveringEngine(open_local_engine(folder / f"{n_workers}w", n_workers), wait_seconds=60,
                              log=open(os.devnull, "w"))
    fed = []

    def maybe_kill(token):
        fed.append(token)
        if kill_at is not None and len(fed) == kill_at[0]:
            os.kill(engine.engine.processes[kill_at[1]].pid, signal.SIGKILL)

    try:
        result = generate(engine, Sampler(SamplerConfig(temperature=1.0, topp=0.9, seed=20261202)), PROMPT, STEPS,
                          on_token=maybe_kill)
        return result.generated_ids, engine.recoveries
    finally:
        engine.close()


@pytest.mark.parametrize("n_workers", [2, 3])
def test_ten_random_kills_leave_the_seeded_text_unchanged(model_15m, n_workers):
    expected, recoveries = run(model_15m, n_workers)
    assert recoveries == 0 and len(expected) >= 10
    # on_token sees the prompt after BOS, then each generated id: a kill at count c <= 7 lands
    # before the prefill, later ones mid-decode; after the last id no step follows, so not then.
    n_callbacks = len(PROMPT) - 1 + len(expected)
    chooser = random.Random(n_workers)
    for _ in range(MOMENTS):
        moment = (chooser.randrange(1, n_callbacks), chooser.randrange(n_workers))
        ids, recoveries = run(model_15m, n_workers, kill_at=moment)
        assert recoveries == 1, moment
        assert ids == expected, moment
