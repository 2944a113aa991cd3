"""The tensor-parallel runtime against the single-process engine, for every worker count:
in-process threads (fast, many models) and real worker processes over ZeroMQ."""

import re

import numpy as np
import pytest

from llmtp.common.formats.checkpoint import load_checkpoint
from llmtp.coordinator.local_engine import LocalEngine
from llmtp.common.model.sampler import Sampler, SamplerConfig
from llmtp.common.formats.shard_file import write_shards
from llmtp.common.model.transformer import StepSequence
from llmtp.coordinator.generate import generate
from llmtp.coordinator.local_cluster import open_local_engine
from inproc_cluster import ThreadedCluster
from model_factory import make_config, write_random_checkpoint

PROMPT = [1, 5, 9, 13, 2 + 7, 11]
# Sums of partials run in another order than one big matmul: float32 rounding differs by a
# few ULPs, and an ULP of a logit near 20 is 1.9e-6. So 1e-5 absolute, plus 1e-6 relative.
LOGITS_TOLERANCE = dict(atol=1e-5, rtol=1e-6)


def logits_trace(engine, tokens, n_prefill):
    """All logits of a batched prefill of tokens[:n_prefill], then one step per remaining token."""
    trace = [engine.step(np.asarray(tokens[:n_prefill]), [StepSequence(0, 0, n_prefill)], all_logits=True)]
    for position in range(n_prefill, len(tokens)):
        trace.append(engine.step(np.asarray([tokens[position]]), [StepSequence(0, position, 1)]))
    return np.concatenate(trace)


def sampled_tokens(engine, prompt, steps, temperature, seed):
    sampler = Sampler(SamplerConfig(temperature=temperature, topp=0.9, seed=seed))
    return generate(engine, sampler, prompt, steps).generated_ids


def assert_same_as_single_process(engine, reference, prompt, steps, vocab_size):
    tokens = [t % vocab_size for t in prompt + list(range(3, 3 + 6))]
    np.testing.assert_allclose(logits_trace(engine, tokens, len(prompt)),
                               logits_trace(reference, tokens, len(prompt)), **LOGITS_TOLERANCE)
    for temperature, seed in ((0.0, 1), (1.0, 133742)):
        # a fresh cache position range: generation overwrites positions 0.. again
        assert sampled_tokens(engine, prompt, steps, temperature, seed) == \
            sampled_tokens(reference, prompt, steps, temperature, seed)


RANDOM_MODELS = {
    "gqa-separate": (make_config(dim=48, hidden_dim=100, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=67,
                                 seq_len=32, shared_classifier=False), 1, None),
    "odd-mqa-shared": (make_config(dim=40, hidden_dim=37, n_layers=2, n_heads=5, n_kv_heads=1, vocab_size=53,
                                   seq_len=24, shared_classifier=True), 1, None),
    "int8-gqa": (make_config(dim=64, hidden_dim=96, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=71,
                             seq_len=32, shared_classifier=False), 2, 8),
}


@pytest.fixture(scope="module", params=sorted(RANDOM_MODELS))
def random_checkpoint(request, tmp_path_factory):
    config, version, group_size = RANDOM_MODELS[request.param]
    path = write_random_checkpoint(tmp_path_factory.mktemp(request.param) / "model.bin", config, seed=11,
                                   version=version, group_size=group_size)
    return load_checkpoint(path)


def test_threaded_cluster_matches_single_process_for_every_worker_count(random_checkpoint):
    config = random_checkpoint.config
    reference = LocalEngine(config, random_checkpoint.weights)
    prompt = [t % config.vocab_size for t in PROMPT]
    for n_workers in range(1, config.n_heads + 1):
        cluster = ThreadedCluster(config, random_checkpoint.weights, n_workers,
                                  group_size=random_checkpoint.group_size or 1)
        assert_same_as_single_process(cluster, reference, prompt, 16, config.vocab_size)


# Real processes are slow to start on 2 cores: every count for one GQA model (and for
# stories260K below), the edges for the others; the threaded test covers every count of all.
ZMQ_WORKER_COUNTS = {"gqa-separate": range(1, 7), "odd-mqa-shared": (1, 5), "int8-gqa": (2, 3, 8)}


def test_zmq_workers_match_single_process(random_checkpoint, tmp_path, request):
    config = random_checkpoint.config
    reference = LocalEngine(config, random_checkpoint.weights)
    prompt = [t % config.vocab_size for t in PROMPT]
    model_name = request.node.callspec.params["random_checkpoint"]
    for n_workers in ZMQ_WORKER_COUNTS[model_name]:
        folder = tmp_path / f"{n_workers}w"
        write_shards(random_checkpoint, n_workers, folder, progress=False)
        engine = open_local_engine(folder, n_workers)
        try:
            assert_same_as_single_process(engine, reference, prompt, 12, config.vocab_size)
        finally:
            engine.close()


def reference_ids(reference_md, case):
    section = reference_md.split(f"## {case}")[1]
    return [int(t) for t in re.search(r"ALL_IDS: `([^`]*)`", section).group(1).split()]


# stories260K has 8 heads: every count from 1 to 8. Above the 2 cores here the workers share
# cores and each count takes ~20 s, so those run in CI's slow pass (-m slow).
STORIES_WORKER_COUNTS = [1, 2, 3, 4] + [pytest.param(n, marks=pytest.mark.slow) for n in range(5, 9)]


@pytest.mark.parametrize("n_workers", STORIES_WORKER_COUNTS)
def test_stories260k_every_worker_count_gives_runc_tokens(stories260k, tmp_path, n_workers):
    checkpoint = load_checkpoint(stories260k["model"])
    assert checkpoint.config.n_heads == 8  # the counts above are every count this model allows
    reference_md = stories260k["reference"].read_text()
    greedy = reference_ids(reference_md, "s260_once_t0_n64")
    seeded = reference_ids(reference_md, "s260_t1_p09_s133742")
    local = LocalEngine(checkpoint.config, checkpoint.weights)
    prompt = [1, 403, 407, 261, 378]
    folder = tmp_path / f"{n_workers}w"
    write_shards(checkpoint, n_workers, folder, progress=False)
    engine = open_local_engine(folder, n_workers)
    try:
        np.testing.assert_allclose(logits_trace(engine, greedy[:20], 8), logits_trace(local, greedy[:20], 8),
                                   **LOGITS_TOLERANCE)
        assert prompt[1:] + sampled_tokens(engine, prompt, 64, 0.0, 1) == greedy
        assert sampled_tokens(engine, [1], 256, 1.0, 133742) == seeded
    finally:
        engine.close()


@pytest.mark.parametrize("n_workers", [2, 5])
def test_reduce_through_the_coordinator_matches_too(random_checkpoint, tmp_path, n_workers):
    """The star reduction (coordinator sums) is kept as a fallback; it must agree as well."""
    config = random_checkpoint.config
    if n_workers > config.n_heads:
        pytest.skip("more workers than heads")
    assert_reduce_mode_matches(random_checkpoint, tmp_path, n_workers, "star")


@pytest.mark.parametrize("capacity_rows", [512, 4])
def test_shared_memory_reduce_matches_and_falls_back_for_long_steps(random_checkpoint, tmp_path, monkeypatch,
                                                                   capacity_rows):
    """reduce "shm" (local default when every worker has a core); with 4-row slots the
    6-token prefill goes through the ZeroMQ peers instead, decode through shared memory."""
    import llmtp.coordinator.cluster_engine as cluster_engine
    monkeypatch.setattr(cluster_engine, "SHM_CAPACITY_ROWS", capacity_rows)
    assert_reduce_mode_matches(random_checkpoint, tmp_path, 3, "shm")


def assert_reduce_mode_matches(checkpoint, folder, n_workers, reduce):
    config = checkpoint.config
    reference = LocalEngine(config, checkpoint.weights)
    write_shards(checkpoint, n_workers, folder, progress=False)
    engine = open_local_engine(folder, n_workers, reduce=reduce)
    try:
        assert engine.reduce_mode == reduce
        prompt = [t % config.vocab_size for t in PROMPT]
        assert_same_as_single_process(engine, reference, prompt, 10, config.vocab_size)
    finally:
        engine.close()
