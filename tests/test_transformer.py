"""One step can carry several sequences in their own KV-cache slots."""

import numpy as np

from llmtp.coordinator.local_engine import LocalEngine
from llmtp.common.errors import ProtocolError
from llmtp.common.model.transformer import StepSequence
from model_factory import make_config, random_weights

import pytest


def test_two_sequences_in_one_step_equal_separate_runs():
    config = make_config(dim=48, hidden_dim=100, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=67, seq_len=32)
    weights = random_weights(config, seed=5)
    batched = LocalEngine(config, weights, n_slots=2)
    alone_a, alone_b = LocalEngine(config, weights), LocalEngine(config, weights)
    prompt_a, prompt_b = [1, 7, 9, 11, 13], [1, 40, 2 + 3]

    logits = batched.step(np.array(prompt_a + prompt_b), [StepSequence(0, 0, 5), StepSequence(1, 0, 3)])
    np.testing.assert_allclose(logits[0], alone_a.step(np.array(prompt_a), [StepSequence(0, 0, 5)])[0], atol=1e-5)
    np.testing.assert_allclose(logits[1], alone_b.step(np.array(prompt_b), [StepSequence(0, 0, 3)])[0], atol=1e-5)

    # decode: sequence b advances while a sits still, then both advance together
    step_b = batched.step(np.array([20]), [StepSequence(1, 3, 1)])
    np.testing.assert_allclose(step_b[0], alone_b.step(np.array([20]), [StepSequence(0, 3, 1)])[0], atol=1e-5)
    both = batched.step(np.array([30, 31]), [StepSequence(0, 5, 1), StepSequence(1, 4, 1)])
    np.testing.assert_allclose(both[0], alone_a.step(np.array([30]), [StepSequence(0, 5, 1)])[0], atol=1e-5)
    np.testing.assert_allclose(both[1], alone_b.step(np.array([31]), [StepSequence(0, 4, 1)])[0], atol=1e-5)


@pytest.mark.parametrize("sequences, rows, complaint", [
    ([StepSequence(2, 0, 1)], 1, "slot 2"),
    ([StepSequence(0, 31, 2)], 2, "outside the context"),
    ([StepSequence(0, -1, 1)], 1, "outside the context"),
    ([StepSequence(0, 0, 2)], 3, "cover 2 tokens"),
    ([], 0, "no sequences"),
])
def test_out_of_range_steps_are_refused(sequences, rows, complaint):
    config = make_config(seq_len=32)
    engine = LocalEngine(config, random_weights(config, seed=1), n_slots=2)
    with pytest.raises(ProtocolError, match=complaint):
        engine.step(np.ones(rows, dtype=np.int64), sequences)


def test_stacked_view_only_over_back_to_back_matrices():
    from llmtp.common.model.weights import stacked_view
    block = np.arange(5 * 4, dtype=np.float32).reshape(5, 4)
    top, bottom = block[:2], block[2:]
    np.testing.assert_array_equal(stacked_view([top, bottom]), block)
    assert stacked_view([bottom, top]) is None  # not in memory order
    assert stacked_view([top, np.ones((3, 4), np.float32)]) is None  # elsewhere in memory
    assert stacked_view([top, block[2:, :2]]) is None  # other width


def test_a_loaded_shard_multiplies_qkv_and_w13_as_stacked_matrices(tmp_path):
    from llmtp.common.formats.checkpoint import load_checkpoint
    from llmtp.common.formats.shard_file import load_shard, write_shards
    from llmtp.common.model.transformer import SliceModel
    from model_factory import write_random_checkpoint
    config = make_config(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, seq_len=16)
    checkpoint = load_checkpoint(write_random_checkpoint(tmp_path / "m.bin", config, seed=9))
    write_shards(checkpoint, 2, tmp_path / "shards", progress=False)
    shard = load_shard(tmp_path / "shards" / "shard-1-of-2.bin")
    model = SliceModel(shard.config, shard.spec, shard.weights)
    assert all(view is not None for view in model.stacked_qkv + model.stacked_w13)
    layer = shard.weights.layers[0]
    np.testing.assert_array_equal(model.stacked_w13[0], np.vstack([layer.w1, layer.w3]))


def test_generation_stops_on_the_ids_it_is_given():
    from llmtp.common.model.sampler import Sampler, SamplerConfig
    from llmtp.coordinator.generate import generate
    config = make_config(seq_len=32)
    weights = random_weights(config, seed=3)

    def run(**options):
        engine = LocalEngine(config, weights)
        return generate(engine, Sampler(SamplerConfig(temperature=0.0)), [1, 5, 9], 12, **options).generated_ids

    free = run(stop_ids=())
    assert len(free) == 12 - 3 + 1  # every position after the prompt, and the last sampled token
    assert run(stop_ids=(free[0],)) == []
    assert run(stop_ids=(free[3],)) == free[:free.index(free[3])]
