"""Junk pushed into a worker's peer inbox (issue 12.4: 300 x 2 MB once took an idle worker from 54
to 637 MB): whatever a stranger pushes, in a session or without one, the worker's memory stays
bounded (the inbox queues at most a few messages of at most a sync's size, and what is not a
partial of the current session is dropped as it arrives), and the next steps are exact."""

import numpy as np
import pytest
import zmq

from llmtp.common.formats.checkpoint import load_checkpoint
from llmtp.common.formats.manifest import load_manifest
from llmtp.common.formats.shard_file import load_embedding, write_shards
from llmtp.common.model.transformer import StepSequence
from llmtp.common.wire import protocol
from llmtp.common.wire.messages import Partial
from llmtp.coordinator.cluster_engine import ClusterEngine
from llmtp.coordinator.local_cluster import start_workers, stop_processes
from llmtp.coordinator.local_engine import LocalEngine

FLOOD_MESSAGES = 300
FLOOD_BYTES = 2 << 20
ALLOWED_GROWTH = 64 << 20  # the inbox's few queued messages, with room for the allocator


@pytest.fixture(scope="module")
def shards(stories260k, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stories-2w")
    write_shards(load_checkpoint(stories260k["model"]), 2, folder, progress=False)
    return folder


@pytest.fixture
def workers(shards, tmp_path):
    started = start_workers(shards, 2, tmp_path, tied_to_us=True)
    yield started
    stop_processes([w.process for w in started])


def connect(folder, workers):
    manifest = load_manifest(folder)
    return ClusterEngine(manifest.config, load_embedding(folder), [w.endpoint for w in workers],
                         manifest.source_sha256, timeout=30.0, reduce="peers")


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def flood(port: int, style: str) -> None:
    """FLOOD_MESSAGES of FLOOD_BYTES each, sent whole before this returns (linger)."""
    rng = np.random.default_rng(5)
    with zmq.Context() as context:
        push = context.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDTIMEO, 60_000)
        push.connect(f"tcp://127.0.0.1:{port}")
        rows = FLOOD_BYTES // (64 * 4)
        for index in range(FLOOD_MESSAGES):
            if style == "bytes":
                push.send_multipart([rng.bytes(FLOOD_BYTES)])
            else:  # a well-formed PARTIAL of a session this worker never had
                partial = np.zeros((rows, 64), dtype=np.float32)
                protocol.send_message(push, Partial(1, 0, partial, session="f" * 32, index=1))
        push.close(linger=60_000)


def assert_exact(engine, stories260k):
    checkpoint = load_checkpoint(stories260k["model"])
    local = LocalEngine(checkpoint.config, checkpoint.weights)
    tokens = np.array([1, 403, 407, 261, 378])
    np.testing.assert_allclose(engine.step(tokens, [StepSequence(0, 0, 5)]),
                               local.step(tokens, [StepSequence(0, 0, 5)]), atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(engine.step(np.array([432]), [StepSequence(0, 5, 1)]),
                               local.step(np.array([432]), [StepSequence(0, 5, 1)]), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("style", ["bytes", "partials"])
@pytest.mark.parametrize("in_session", [True, False])
def test_a_peer_inbox_flood_leaves_memory_bounded(shards, workers, stories260k, style, in_session):
    engine = connect(shards, workers)
    peer_port = engine.links[0].info.peer_port
    if not in_session:
        engine.close()
    before = peak_rss(workers[0].process.pid)
    flood(peer_port, style)
    if in_session:
        assert_exact(engine, stories260k)
        engine.close()
    growth = peak_rss(workers[0].process.pid) - before
    assert growth < ALLOWED_GROWTH, f"peak RSS grew {growth / 2**20:.0f} MiB"
    assert all(w.process.poll() is None for w in workers)
    engine = connect(shards, workers)
    try:
        assert_exact(engine, stories260k)
    finally:
        engine.close()
