"""The worker's states and dispatch, in-process: a message wrong for the state is refused at
once naming it; hostile frames (issue 12's probes, then property-based fuzzing with and
without a session) never stop it, and afterwards it computes exactly what a single process does."""

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings, strategies as st

from llmtp.common.errors import ProtocolError
from llmtp.common.formats.checkpoint import load_checkpoint
from llmtp.common.formats.shard_file import load_shard, shard_file_name, write_shards
from llmtp.common.model.transformer import StepSequence
from llmtp.common.wire import protocol
from llmtp.common.wire.messages import Error, Hello, Logits, Pong, Ready, Step
from llmtp.coordinator.local_engine import LocalEngine
from llmtp.worker.limits import check_cache_fits
from llmtp.worker.server import Worker, WorkerOptions
from llmtp.worker.session import WorkerState
from model_factory import make_config, write_random_checkpoint
from wire_strategies import hostile_frames

COORDINATOR = b"coordinator"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("worker-states")
    checkpoint = load_checkpoint(write_random_checkpoint(folder / "m.bin", make_config(), seed=5))
    for n in (1, 2):
        write_shards(checkpoint, n, folder / f"{n}w", progress=False)
    return folder, checkpoint


def open_worker(model, n_workers: int, index: int = 0) -> Worker:
    folder, _ = model
    shard = load_shard(folder / f"{n_workers}w" / shard_file_name(index, n_workers))
    return Worker(shard, WorkerOptions(bind="tcp://127.0.0.1:*", reduce_timeout=5.0))


def hello(worker: Worker, reduce: str = "star", **change) -> Hello:
    fields = dict(protocol_version=protocol.PROTOCOL_VERSION, model_sha256=worker.shard.model_sha256,
                  shard_index=worker.shard.spec.index, n_shards=worker.shard.spec.count, n_slots=1,
                  session="s", reduce=reduce)
    return Hello(**{**fields, **change})


class Client:
    """A DEALER in front of an in-process worker, which serves one message per call."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(worker.endpoint)

    def ask(self, frames: list, serves: int = 1):
        self.socket.send_multipart(frames)
        for _ in range(serves):
            assert self.worker.serve_one(2000)
        assert self.socket.poll(2000), "no reply"
        return protocol.unpack(self.socket.recv_multipart())

    def close(self):
        self.socket.close(linger=0)
        self.context.term()


@pytest.fixture
def two_shard_client(model):
    worker = open_worker(model, 2)
    client = Client(worker)
    yield client
    client.close()
    worker.close()


def test_step_before_peers_is_refused_at_once_naming_the_state(two_shard_client, model):
    client = two_shard_client
    assert type(client.ask(protocol.pack(hello(client.worker, "peers")))) is Ready
    assert client.worker.state is WorkerState.IN_SESSION
    x = np.zeros((1, model[1].config.dim), dtype=np.float32)
    reply = client.ask(protocol.pack(Step(1, ((0, 0, 1),), x)))
    assert type(reply) is Error
    assert "in session" in reply.message and "PEERS" in reply.message
    assert client.worker.state is WorkerState.IN_SESSION


def test_ping_with_an_array_of_shape_true_is_refused_and_the_worker_serves_on(two_shard_client):
    client = two_shard_client
    reply = client.ask([b"PING", msgpack.packb({"arrays": [["float32", [True]]]}), b"\x00" * 4])
    assert type(reply) is Error and "bad array descriptor" in reply.message
    assert type(client.ask([b"PING", msgpack.packb({})])) is Pong


def test_the_same_frame_in_a_peer_inbox_is_dropped(two_shard_client):
    client = two_shard_client
    push = client.context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(f"tcp://127.0.0.1:{client.worker.peers.port}")
    for _ in range(20):
        push.send_multipart([b"PARTIAL", msgpack.packb({"arrays": [["float32", [True]]]}), b"\x00" * 4])
    push.close()
    for _ in range(5):
        client.worker.serve_one(200)
    assert not client.worker.peers.inbox.poll(0) and not client.worker.peers.next_step
    assert type(client.ask([b"PING", msgpack.packb({})])) is Pong


def test_a_refused_hello_does_not_reveal_the_expected_sha256(two_shard_client):
    client = two_shard_client
    reply = client.ask(protocol.pack(hello(client.worker, model_sha256="0" * 64)))
    assert type(reply) is Error and "model_sha256" in reply.message
    assert client.worker.shard.model_sha256 not in reply.message


def test_a_worker_with_a_secret_refuses_a_hello_without_it(model):
    folder, _ = model
    shard = load_shard(folder / "1w" / shard_file_name(0, 1))
    worker = Worker(shard, WorkerOptions(bind="tcp://127.0.0.1:*", secret="s3cret"))
    client = Client(worker)
    try:
        refused = client.ask(protocol.pack(hello(worker)))
        assert type(refused) is Error and refused.message.endswith("handshake refused")
        assert worker.state is WorkerState.IDLE
        assert type(client.ask(protocol.pack(hello(worker, secret="s3cret")))) is Ready
    finally:
        client.close()
        worker.close()


def test_kv_cache_beyond_memory_is_refused_before_allocating():
    config = make_config(seq_len=1 << 20)
    from llmtp.common.model.split import plan_split
    with pytest.raises(ProtocolError, match="n_slots 1024 needs"):
        check_cache_fits(config, plan_split(config, 1)[0], 1024)


# --- property-based fuzzing of the dispatch ------------------------------------------------

@pytest.fixture(scope="module")
def fuzzed_worker(model):
    worker = open_worker(model, 1)
    yield worker
    worker.close()


def reference_logits(model, tokens):
    _, checkpoint = model
    local = LocalEngine(checkpoint.config, checkpoint.weights)
    return local.step(tokens, [StepSequence(0, 0, len(tokens))])


def assert_serves_exactly(worker: Worker, model):
    """A fresh session from a real coordinator identity gets the single-process logits."""
    _, checkpoint = model
    client = Client(worker)
    try:
        assert type(client.ask(protocol.pack(hello(worker)))) is Ready
        tokens = np.array([1, 5, 9])
        x = checkpoint.weights.embed(tokens)
        reply = client.ask(protocol.pack(Step(1, ((0, 0, 3),), x)))
        assert type(reply) is Logits
        np.testing.assert_array_equal(reply.logits, reference_logits(model, tokens))
    finally:
        client.close()


FUZZ = settings(max_examples=1500, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(frames=hostile_frames(), sender=st.sampled_from([COORDINATOR, b"stranger"]), in_session=st.booleans())
def test_hostile_frames_never_stop_the_worker(fuzzed_worker, frames, sender, in_session):
    if in_session and fuzzed_worker.session is None:
        fuzzed_worker.handle(COORDINATOR, hello(fuzzed_worker, n_slots=2))
    assert fuzzed_worker.handle_frames(sender, frames) or frames[0] == b"SHUTDOWN"
    assert fuzzed_worker.state is not WorkerState.STEPPING


@FUZZ
@given(step_id=st.integers(0, 100), slot=st.integers(-1, 3), start=st.integers(0, 40), n_tokens=st.integers(1, 4),
       value=st.sampled_from([0.0, 1.0, float("inf"), float("nan")]), all_logits=st.booleans())
def test_near_valid_steps_are_served_or_refused(fuzzed_worker, step_id, slot, start, n_tokens, value, all_logits):
    fuzzed_worker.handle(COORDINATOR, hello(fuzzed_worker, n_slots=2))
    x = np.full((n_tokens, fuzzed_worker.shard.config.dim), value, dtype=np.float32)
    frames = protocol.encode(protocol.STEP, {"step_id": step_id, "sequences": [[slot, start, n_tokens]],
                                             "all_logits": all_logits}, [x])
    assert fuzzed_worker.handle_frames(COORDINATOR, [bytes(f) for f in frames])
    assert fuzzed_worker.state is WorkerState.CONNECTED


def test_after_the_fuzzing_the_worker_computes_exactly(fuzzed_worker, model):
    assert_serves_exactly(fuzzed_worker, model)


def test_inf_in_a_step_sequence_is_refused(fuzzed_worker, model):
    client = Client(fuzzed_worker)
    try:
        assert type(client.ask(protocol.pack(hello(fuzzed_worker)))) is Ready
        x = np.zeros((1, fuzzed_worker.shard.config.dim), dtype=np.float32)
        frames = protocol.encode(protocol.STEP, {"step_id": 1, "sequences": [[0, float("inf"), 1]]}, [x])
        reply = client.ask([bytes(f) for f in frames])
        assert type(reply) is Error and "sequences" in reply.message
    finally:
        client.close()
    assert_serves_exactly(fuzzed_worker, model)
