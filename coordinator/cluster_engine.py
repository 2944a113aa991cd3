"""The coordinator's side of a step: embed, broadcast, (sum partials), gather logits.

Same `step` signature as common.engine.LocalEngine. Every wait polls the worker's
socket together with every link's connection monitor and the local workers' exit fds
(when this process started them), so a crash or a dropped connection shows at once as
WorkerLost naming the worker, and every wait has a deadline. ZeroMQ heartbeats run in
libzmq's own threads, so a worker busy with a long matmul still answers them, and a
silent host is noticed within `liveness` seconds.
"""

import os
import time
import uuid
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import zmq

from llmtp.common.exchange.modes import ReduceMode, choose_reduce_mode
from llmtp.common.exchange.relay import relay_step
from llmtp.common.exchange.shm import SharedSegment
from llmtp.common.wire import protocol, security
from llmtp.common.wire.messages import (Bye, Connected, Error, Hello, Logits, Partial, Peers, Ping, Pong, Ready,
                                        Shutdown, Step, WireMessage)
from llmtp.common.model.config import ModelConfig
from llmtp.common.errors import ProtocolError, WorkerError, WorkerLost  # noqa: F401 (WorkerLost re-exported)
from llmtp.common.model.transformer import StepSequence, syncs_per_step
from llmtp.common.model.weights import Matrix, embed_tokens

from .engine import Engine, StepTiming, WorkerStats

HEARTBEAT_INTERVAL_MS = 1000
SHM_CAPACITY_ROWS = 512  # rows per worker slot in a shared-memory segment; longer steps use peers


@dataclass
class WorkerLink:
    index: int
    endpoint: str
    process: object | None = None  # subprocess.Popen when this coordinator started the worker
    socket: zmq.Socket | None = None
    monitor: zmq.Socket | None = None  # connection events of `socket`
    exit_fd: int | None = None  # pidfd that becomes readable when `process` exits
    info: Ready | None = None  # the handshake's answer
    poller: zmq.Poller | None = None  # this socket, plus every link's monitor and exit fd

    @property
    def name(self) -> str:
        return f"worker {self.index} ({self.endpoint})"


class ClusterEngine(Engine):
    def __init__(self, config: ModelConfig, embedding: Matrix, endpoints: Sequence[str], model_sha256: str,
                 n_slots: int = 1, timeout: float = 30.0, processes: Sequence | None = None,
                 reduce: str = "peers", liveness: float = 5.0, keys: security.CoordinatorKeys | None = None,
                 secret: str | None = None):
        """reduce: a ReduceMode ("peers": workers exchange partials directly, the default,
        measured faster; "star": through this coordinator; "shm": shared memory, local only).
        timeout bounds every wait for a reply; liveness bounds how long a silent connection
        counts as alive. keys: CURVE on every link (the workers must hold the matching worker
        key pair and allow our public key). secret: what unkeyed workers started with one expect."""
        self.config = config
        self.embedding = embedding
        self.model_sha256 = model_sha256
        self.n_slots = n_slots
        self.timeout = timeout
        self.liveness = liveness
        self.keys = keys
        self.secret = secret
        self.shared_memory: SharedSegment | None = None  # the "shm" reduce mode's segment of the current session
        self.reduce_mode = choose_reduce_mode(len(endpoints), ReduceMode(reduce))
        self.step_id = 0
        self.last_step_timing: list[dict] = []  # per worker: forward_s, reduce_s of the last step
        self.context = zmq.Context()
        self.links = [WorkerLink(index, endpoint, processes[index] if processes else None)
                      for index, endpoint in enumerate(endpoints)]
        try:
            self.open_links()
            self.handshake(self.timeout)
        except BaseException:  # leave no sockets, threads or shared memory behind
            self.close_links()
            self.context.term()
            self.release_shared_memory()
            raise

    def open_links(self) -> None:
        for link in self.links:
            link.socket = self.context.socket(zmq.DEALER)
            link.socket.setsockopt(zmq.LINGER, 0)
            link.socket.setsockopt(zmq.IDENTITY, f"coordinator-{uuid.uuid4().hex[:12]}-{link.index}".encode())
            if self.keys:
                security.connect_curve(link.socket, self.keys.coordinator, self.keys.worker_public)
            link.socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_INTERVAL_MS)
            link.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self.liveness * 1000))
            link.socket.setsockopt(zmq.HEARTBEAT_TTL, int(self.liveness * 1000))
            link.monitor = link.socket.get_monitor_socket(
                zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
            link.socket.connect(link.endpoint)
            link.exit_fd = _exit_fd(link.process)
        for link in self.links:
            # Wait on one socket at a time (others may hold ready messages we are not
            # reading yet, which would make a shared poller spin), but on every alarm.
            link.poller = zmq.Poller()
            link.poller.register(link.socket, zmq.POLLIN)
            for other in self.links:
                link.poller.register(other.monitor, zmq.POLLIN)
                if other.exit_fd is not None:
                    link.poller.register(other.exit_fd, zmq.POLLIN)

    def close_links(self, last_word: WireMessage | None = None) -> None:
        for link in self.links:
            if link.socket is None:
                continue
            if last_word:
                try:
                    self.send(link, last_word)
                except zmq.ZMQError:
                    pass
        for link in self.links:
            if link.socket is not None:
                link.socket.disable_monitor()
                link.monitor.close(linger=0)
                # close() then context.term() waits (up to the linger) until the last word has left
                link.socket.close(linger=100 if last_word else 0)
            if link.exit_fd is not None:
                os.close(link.exit_fd)
            link.socket = link.monitor = link.exit_fd = link.poller = None

    def handshake(self, timeout: float) -> None:
        session = uuid.uuid4().hex
        shm_name = shm_rows = None
        if self.reduce_mode is ReduceMode.SHM:
            # A fresh, zeroed segment each session: a restarted worker must not see stale counters.
            self.release_shared_memory()
            shm_rows = min(self.config.seq_len, SHM_CAPACITY_ROWS)
            self.shared_memory = SharedSegment(len(self.links), shm_rows, self.config.dim)
            shm_name = self.shared_memory.name
        for link in self.links:
            self.send(link, Hello(protocol.PROTOCOL_VERSION, self.model_sha256, link.index, len(self.links),
                                  self.n_slots, session, self.reduce_mode.value, shm_name, shm_rows, self.secret))
        deadline = time.monotonic() + timeout
        for link in self.links:
            link.info = self.receive(link, Ready, deadline, "handshake")
        self.syncs_per_step = self.agreed_syncs_per_step()
        if self.shared_memory is not None:
            self.shared_memory.unlink()  # every worker has mapped it (before its READY): nothing can leak now
        if self.reduce_mode in (ReduceMode.PEERS, ReduceMode.SHM):  # shm falls back to the peers for long prefills
            self.connect_peers(session, deadline)

    def agreed_syncs_per_step(self) -> int:
        """The all-reduces of a step, as every READY says (a v2 file's op set makes more than two
        per layer); the star relay must answer each one."""
        said = {link.info.syncs_per_step or syncs_per_step(self.config.n_layers) for link in self.links}
        if len(said) != 1:
            raise ProtocolError(f"the workers disagree on the all-reduces of a step: {sorted(said)}")
        return said.pop()

    def release_shared_memory(self) -> None:
        if self.shared_memory is not None:
            self.shared_memory.release()
            self.shared_memory = None

    def connect_peers(self, session: str, deadline: float) -> None:
        """Tell every worker where the others' peer inboxes are (at the host we reached it on)."""
        endpoints = []
        for link in self.links:
            host = link.endpoint[len("tcp://"):].rsplit(":", 1)[0]
            if link.info.peer_port is None:
                raise ProtocolError(f"{link.name} has no peer inbox for reduce {self.reduce_mode.value!r}")
            endpoints.append(f"tcp://{host}:{link.info.peer_port}")
        for link in self.links:
            self.send(link, Peers(session, tuple(endpoints)))
        for link in self.links:
            self.receive(link, Connected, deadline, "peer connection")

    def recover(self, wait_seconds: float, lost: set[int] = frozenset()) -> None:
        """Reconnect to every worker and open a new session, retrying until wait_seconds
        pass (a worker restarted by systemd may take a while to come back). `lost` names
        the workers known to be gone; a local cluster restarts them first."""
        deadline = time.monotonic() + wait_seconds
        while True:
            self.close_links()
            self.open_links()
            try:
                self.handshake(max(1.0, min(self.timeout, deadline - time.monotonic())))
                return
            except WorkerError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    def step(self, tokens: np.ndarray, sequences: Sequence[StepSequence], all_logits: bool = False) -> np.ndarray:
        self.step_id += 1
        x = embed_tokens(self.embedding, np.asarray(tokens, dtype=np.int64))
        step = Step(self.step_id, tuple((s.slot, s.start_position, s.n_tokens) for s in sequences), x, all_logits)
        for link in self.links:
            self.send(link, step)
        if self.reduce_mode is ReduceMode.STAR and len(self.links) > 1:
            relay_step(len(self.links), self.syncs_per_step, x.shape[0], x.shape[1],
                       self.receive_partial, self.send_to_all, self.step_id)
        deadline = time.monotonic() + self.timeout
        replies = [self.receive(link, Logits, deadline, f"step {self.step_id}") for link in self.links]
        self.last_step_timing = [{"forward_s": reply.forward_s, "reduce_s": reply.reduce_s} for reply in replies]
        return np.concatenate([reply.logits for reply in replies], axis=1)

    def receive_partial(self, index: int, sync: int) -> Partial:
        """Worker `index`'s PARTIAL for this step's `sync` (reduce "star")."""
        link, state = self.links[index], f"step {self.step_id} sync {sync}"
        partial = self.receive(link, Partial, time.monotonic() + self.timeout, state)
        if partial.step_id != self.step_id or partial.sync != sync or partial.partial.shape[1] != self.config.dim:
            raise ProtocolError(f"{link.name} sent a PARTIAL that does not match {state}")
        return partial

    def send_to_all(self, message: WireMessage) -> None:
        for link in self.links:
            self.send(link, message)

    @staticmethod
    def send(link: WorkerLink, message: WireMessage) -> None:
        protocol.send_message(link.socket, message)

    def receive(self, link: WorkerLink, kind: type, deadline: float, state: str) -> WireMessage:
        """The next message from `link`, which must be `kind`. WorkerLost when any worker dies or
        drops its connection, or this one stays silent past the deadline; WorkerError on an
        ERROR reply. Each names the worker and what we were waiting for."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerLost(link.index, f"{link.name} sent no {kind.KIND.decode()} within "
                                             f"{self.timeout:g} s ({state})")
            ready = dict(link.poller.poll(min(remaining, 1.0) * 1000))
            if link.socket not in ready:
                self.check_alarms(state)  # an exit fd or monitor fired, or a quiet second passed
                continue
            message = protocol.unpack(link.socket.recv_multipart(copy=False))
            if type(message) is Error:
                raise WorkerError(f"{link.name}: {message.message}")
            if type(message) is not kind:
                raise ProtocolError(f"{link.name} sent {message.KIND.decode()} during {state}, "
                                    f"expected {kind.KIND.decode()}")
            return message

    def check_alarms(self, state: str) -> None:
        for link in self.links:
            if link.process is not None and link.process.poll() is not None:
                raise WorkerLost(link.index, f"{link.name} exited with code {link.process.returncode} "
                                             f"({state})")
            while link.monitor.poll(0):
                # imported here: zmq.utils.monitor brings in asyncio (~25 ms of every start)
                from zmq.utils.monitor import recv_monitor_message
                event = recv_monitor_message(link.monitor)
                if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    raise WorkerError(f"{link.name} refused our CURVE key ({state}): it admits only its "
                                      f"config's keys.coordinator_public")
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    raise WorkerLost(link.index, f"{link.name} dropped its connection ({state})"
                                                 f"{self.key_hint(state)}")

    def key_hint(self, state: str) -> str:
        """A CURVE mismatch looks like a dropped connection from this side; say so in a handshake."""
        if state != "handshake":
            return ""
        return "; is keys.worker_public the workers' key?" if self.keys else "; does the worker expect CURVE keys?"

    def worker_stats(self) -> list[dict]:
        """RSS, shard and KV-cache bytes of every worker (PING/PONG)."""
        return [pong.header() for pong in self.pongs()]

    def pongs(self) -> list[Pong]:
        self.send_to_all(Ping())
        deadline = time.monotonic() + self.timeout
        return [self.receive(link, Pong, deadline, "ping") for link in self.links]

    def stats(self) -> list[WorkerStats]:
        return [WorkerStats(pid=pong.pid, rss_bytes=pong.rss_bytes, peak_rss_bytes=pong.peak_rss_bytes,
                            shard_bytes=pong.shard_bytes, kv_cache_bytes=pong.kv_cache_bytes)
                for pong in self.pongs()]

    def timing(self) -> list[StepTiming]:
        return [StepTiming(**entry) for entry in self.last_step_timing]

    def close(self, shutdown_workers: bool = False) -> None:
        """End the session (BYE), or stop the workers too (SHUTDOWN). Never blocks."""
        self.close_links(Shutdown() if shutdown_workers else Bye())
        self.links = []
        self.context.term()
        self.release_shared_memory()


def _exit_fd(process) -> int | None:
    if process is None or not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(process.pid)
    except OSError:
        return None
