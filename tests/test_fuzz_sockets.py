"""Issue 12's long fuzz run, through real sockets: 10,000 generated messages per socket kind
(the control socket, the peer inbox), with and without a session, to workers running in
processes of their own (so their memory is theirs, not the fuzzer's). Every worker must
answer or drop each message, never stop, stay within a bounded resident size, and the
control-socket one must afterwards compute exactly what a single process does. Minutes of
work: marked slow (CI's second pass)."""

import multiprocessing
import os

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings, strategies as st

from llmtp.common.formats.shard_file import load_shard, shard_file_name
from llmtp.common.wire import protocol
from llmtp.common.wire.messages import Bye, Logits, Ping, Pong, Ready, Step
from test_worker_states import hello, model, reference_logits  # noqa: F401 (model is a fixture)
from wire_strategies import hostile_frames

pytestmark = pytest.mark.slow
PER_KIND = settings(max_examples=10_000, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
RSS_GROWTH_LIMIT = 64 << 20  # frames are at most a few hundred bytes; a worker keeps none of them
REPLY_MS = 2000


def serve(shard_path, endpoints) -> None:
    """The child: one worker on a free loopback port, serving until terminated."""
    from llmtp.worker.server import Worker, WorkerOptions
    worker = Worker(load_shard(shard_path), WorkerOptions(bind="tcp://127.0.0.1:*", reduce_timeout=5.0))
    endpoints.put((worker.endpoint, worker.peers.port if worker.peers else None))
    worker.serve_forever()


class WorkerProcess:
    def __init__(self, shard_path):
        self.endpoints = multiprocessing.Queue()
        self.process = multiprocessing.Process(target=serve, args=(shard_path, self.endpoints), daemon=True)
        self.process.start()
        self.endpoint, self.peer_port = self.endpoints.get(timeout=60)
        self.shard = load_shard(shard_path)  # for hello(): its sha256 and spec
        self.context = zmq.Context()
        self.control = self.socket(zmq.DEALER, self.endpoint)
        self.push = self.socket(zmq.PUSH, f"tcp://127.0.0.1:{self.peer_port}") if self.peer_port else None
        self.in_session = False
        self.sent = 0

    def socket(self, kind, endpoint):
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, REPLY_MS)
        sock.connect(endpoint)
        return sock

    def ask(self, message, expected: type):
        """Send `message` and read replies until one of the expected type: replies still owed
        for fuzzed messages (errors, a PONG for a valid PING) may come first."""
        self.control.send_multipart(protocol.pack(message))
        while True:
            assert self.control.poll(REPLY_MS), f"no {expected.__name__}: the worker stopped answering"
            reply = protocol.unpack(self.control.recv_multipart())
            if type(reply) is expected:
                return reply

    def set_session(self, wanted: bool) -> None:
        """in_session None: unknown (a fuzzed HELLO or BYE may have been valid)."""
        if self.in_session == wanted:
            return
        if self.in_session is not False:
            self.control.send_multipart(protocol.pack(Bye()))
        if wanted:
            self.ask(hello(self, n_slots=2), Ready)
        self.in_session = wanted

    def settle(self) -> None:
        """Until nothing more arrives for a while: every owed reply has been read."""
        while self.control.poll(500):
            self.control.recv_multipart()

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.process.pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def close(self) -> None:
        self.control.close()
        if self.push is not None:
            self.push.close()
        self.context.term()
        self.process.terminate()
        self.process.join(10)


@pytest.fixture(scope="module")
def workers(model):
    folder, _ = model
    started = {"control": WorkerProcess(folder / "1w" / shard_file_name(0, 1)),
               "peers": WorkerProcess(folder / "2w" / shard_file_name(0, 2))}
    for worker in started.values():
        worker.in_session = None
        worker.set_session(True)  # warm: the KV cache is allocated once
        worker.rss_before = worker.rss_bytes()
    yield started
    for worker in started.values():
        worker.close()


@PER_KIND
@given(frames=hostile_frames(), in_session=st.booleans())
def test_control_socket(workers, frames, in_session):
    worker = workers["control"]
    if frames[0] == b"SHUTDOWN":
        return  # a valid SHUTDOWN from the session's coordinator ends the worker by design
    worker.set_session(in_session)
    if frames[0] in (b"BYE", b"HELLO"):
        worker.in_session = None  # a valid one ends or opens a session
    worker.control.send_multipart(frames)
    worker.sent += 1
    if worker.sent % 500 == 0:
        assert worker.process.is_alive()


@PER_KIND
@given(frames=hostile_frames(), in_session=st.booleans())
def test_peer_inbox(workers, frames, in_session):
    worker = workers["peers"]
    worker.set_session(in_session)
    worker.push.send_multipart(frames)
    worker.sent += 1
    if worker.sent % 500 == 0:
        assert worker.process.is_alive()


def test_after_the_fuzzing_every_worker_serves_exactly_within_bounded_memory(workers, model):
    for name, worker in workers.items():
        assert worker.sent >= 9_000, name  # the run above really ran (SHUTDOWN frames are skipped)
        assert worker.process.is_alive(), name
        worker.in_session = None
        worker.set_session(False)
        worker.settle()
        worker.set_session(True)  # a fresh session
        worker.ask(Ping(), Pong)
        assert worker.rss_bytes() - worker.rss_before < RSS_GROWTH_LIMIT, name
    _, checkpoint = model
    tokens = np.array([1, 5, 9])
    reply = workers["control"].ask(Step(1, ((0, 0, 3),), checkpoint.weights.embed(tokens)), Logits)
    np.testing.assert_array_equal(reply.logits, reference_logits(model, tokens))
