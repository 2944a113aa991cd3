"""Anything a network can carry, thrown at a worker: it logs a line, answers at most an
ERROR, and afterwards still serves a real coordinator exactly."""

import msgpack
import numpy as np
import pytest
import zmq

from llmtp.common.wire import protocol
from llmtp.common.formats.checkpoint import load_checkpoint
from llmtp.coordinator.local_engine import LocalEngine
from llmtp.common.formats.manifest import load_manifest
from llmtp.common.formats.shard_file import load_embedding, write_shards
from llmtp.common.model.transformer import StepSequence
from llmtp.coordinator.cluster_engine import ClusterEngine
from llmtp.coordinator.local_cluster import start_workers, stop_processes


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


def connect(folder, endpoints, timeout=10.0):
    manifest = load_manifest(folder)
    return ClusterEngine(manifest.config, load_embedding(folder), endpoints, manifest.source_sha256,
                         timeout=timeout)


def assert_still_serves_exactly(shards, workers, stories260k):
    assert all(w.process.poll() is None for w in workers)
    checkpoint = load_checkpoint(stories260k["model"])
    local = LocalEngine(checkpoint.config, checkpoint.weights)
    engine = connect(shards, [w.endpoint for w in workers])
    try:
        tokens = np.array([1, 403, 407, 261, 378])
        np.testing.assert_allclose(engine.step(tokens, [StepSequence(0, 0, 5)]),
                                   local.step(tokens, [StepSequence(0, 0, 5)]), atol=1e-5, rtol=1e-6)
        np.testing.assert_allclose(engine.step(np.array([432]), [StepSequence(0, 5, 1)]),
                                   local.step(np.array([432]), [StepSequence(0, 5, 1)]), atol=1e-5, rtol=1e-6)
    finally:
        engine.close()


def junk_messages(rng, count):
    """Random bytes, truncated msgpack, wrong types, huge declared sizes, real types with bad fields."""
    kinds = sorted(protocol.MESSAGE_TYPES - {protocol.PING})  # a well-formed PING is no junk: it gets a PONG
    good_header = msgpack.packb({"step_id": 1, "sequences": [[0, 0, 1]], "arrays": [["float32", [1, 64]]]})
    for index in range(count):
        style = index % 6
        if style == 0:
            yield [rng.bytes(int(rng.integers(0, 64))) for _ in range(int(rng.integers(1, 5)))]
        elif style == 1:
            yield [kinds[int(rng.integers(len(kinds)))], good_header[: int(rng.integers(0, len(good_header)))]]
        elif style == 2:
            yield [b"STEP", msgpack.packb({"step_id": "one", "sequences": {"a": 1}, "arrays": []})]
        elif style == 3:
            yield [b"STEP", msgpack.packb({"step_id": 1, "sequences": [[0, 0, 1]],
                                           "arrays": [["float32", [2**31, 2**31]]]}), b"\x00" * 16]
        elif style == 4:
            yield [b"HELLO", msgpack.packb({"protocol_version": int(rng.integers(0, 9)), "n_slots": -1,
                                            "model_sha256": rng.bytes(8).hex(), "arrays": []})]
        else:
            yield [kinds[int(rng.integers(len(kinds)))], good_header, rng.bytes(256)]


def test_thousands_of_junk_frames_then_a_normal_generation(shards, workers, stories260k):
    rng = np.random.default_rng(11)
    with zmq.Context() as context:
        for worker in workers:
            junk = context.socket(zmq.DEALER)
            junk.setsockopt(zmq.LINGER, 0)
            junk.setsockopt(zmq.SNDHWM, 0)
            junk.connect(worker.endpoint)
            for frames in junk_messages(rng, 2000):
                junk.send_multipart(frames)
            # a PONG after all the ERROR replies means the worker chewed through the whole queue
            protocol.send(junk, protocol.PING)
            replies = []
            while not replies or replies[-1] != protocol.PONG:
                assert junk.poll(20000), "worker stopped answering"
                replies.append(junk.recv_multipart()[0])
            assert protocol.ERROR in replies  # it said no to some, and lived
            junk.close()
    assert_still_serves_exactly(shards, workers, stories260k)


def test_oversized_message_is_cut_off_by_maxmsgsize(shards, workers, stories260k):
    with zmq.Context() as context:
        big = context.socket(zmq.DEALER)
        big.setsockopt(zmq.LINGER, 0)
        big.connect(workers[0].endpoint)
        big.send_multipart([b"STEP", msgpack.packb({}), b"\x00" * (64 << 20)])  # 64 MiB > the worker's cap
        big.close()
    assert_still_serves_exactly(shards, workers, stories260k)


def session_socket(context, shards, endpoint, index):
    """A DEALER that completed a valid handshake as coordinator of a 2-worker star session."""
    manifest = load_manifest(shards)
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    protocol.send(socket, protocol.HELLO, {
        "protocol_version": protocol.PROTOCOL_VERSION, "model_sha256": manifest.source_sha256,
        "shard_index": index, "n_shards": 2, "n_slots": 2, "session": "fuzz", "reduce": "star"})
    assert socket.poll(10000)
    assert protocol.decode(socket.recv_multipart()).kind == protocol.READY
    return socket


@pytest.mark.parametrize("sequences, rows, complaint", [
    ([[5, 0, 1]], 1, "slot 5"),
    ([[0, 510, 4]], 4, "outside the context"),
    ([[0, -3, 1]], 1, "outside the context"),
    ([[0, 0, 2]], 1, "cover 2 tokens"),
    ([["x", 0, 1]], 1, "sequences"),
    ([[0, 0]], 1, "sequences"),
])
def test_out_of_range_step_from_a_session_is_refused(shards, workers, stories260k, sequences, rows, complaint):
    with zmq.Context() as context:
        socket = session_socket(context, shards, workers[0].endpoint, 0)
        x = np.zeros((rows, 64), dtype=np.float32)
        protocol.send(socket, protocol.STEP, {"step_id": 1, "sequences": sequences}, [x])
        assert socket.poll(10000)
        reply = protocol.decode(socket.recv_multipart())
        assert reply.kind == protocol.ERROR
        assert complaint in reply.header["message"]
        socket.close()
    assert_still_serves_exactly(shards, workers, stories260k)


def test_other_protocol_version_is_refused_naming_it(shards, workers):
    manifest = load_manifest(shards)
    with zmq.Context() as context:
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(workers[0].endpoint)
        protocol.send(socket, protocol.HELLO, {
            "protocol_version": protocol.PROTOCOL_VERSION + 1, "model_sha256": manifest.source_sha256,
            "shard_index": 0, "n_shards": 2, "n_slots": 1})
        assert socket.poll(10000)
        reply = protocol.decode(socket.recv_multipart())
        assert reply.kind == protocol.ERROR and "protocol_version" in reply.header["message"]
        socket.close()


def test_standalone_worker_serves_the_next_coordinator_after_one_vanishes(shards, workers, stories260k):
    gone = connect(shards, [w.endpoint for w in workers])
    gone.step(np.array([1, 403]), [StepSequence(0, 0, 2)])
    gone.close_links()  # vanishes without BYE, as a killed process would
    gone.context.term()
    assert_still_serves_exactly(shards, workers, stories260k)
