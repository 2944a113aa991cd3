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
from zmq.utils.monitor import recv_monitor_message

from llmtp.common.wire import protocol, security
from llmtp.common.model.config import ModelConfig
from llmtp.common.errors import ProtocolError, WorkerError
from llmtp.common.wire.protocol import Message
from llmtp.common.model.transformer import StepSequence
from llmtp.common.model.weights import Matrix, embed_tokens

from .engine import Engine, StepTiming, WorkerStats

HEARTBEAT_INTERVAL_MS = 1000
SHM_CAPACITY_ROWS = 512  # rows per worker slot in a shared-memory segment; longer steps use peers


class WorkerLost(WorkerError):
    """A worker died, dropped its connection, or stopped answering: `index` says which."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


@dataclass
class WorkerLink:
    index: int
    endpoint: str
    process: object | None = None  # subprocess.Popen when this coordinator started the worker
    socket: zmq.Socket | None = None
    monitor: zmq.Socket | None = None  # connection events of `socket`
    exit_fd: int | None = None  # pidfd that becomes readable when `process` exits
    info: dict | None = None  # the READY header
    poller: zmq.Poller | None = None  # this socket, plus every link's monitor and exit fd

    @property
    def name(self) -> str:
        return f"worker {self.index} ({self.endpoint})"


class ClusterEngine(Engine):
    def __init__(self, config: ModelConfig, embedding: Matrix, endpoints: Sequence[str], model_sha256: str,
                 n_slots: int = 1, timeout: float = 30.0, processes: Sequence | None = None,
                 reduce: str = "peers", liveness: float = 5.0, keys: security.CoordinatorKeys | None = None):
        """reduce: "peers" (workers exchange partials directly; the default, measured faster)
        or "star" (through this coordinator). timeout bounds every wait for a reply;
        liveness bounds how long a silent connection counts as alive. keys: CURVE on every
        link (the workers must hold the matching worker key pair and allow our public key)."""
        assert reduce in protocol.REDUCE_MODES, reduce
        self.config = config
        self.embedding = embedding
        self.model_sha256 = model_sha256
        self.n_slots = n_slots
        self.timeout = timeout
        self.liveness = liveness
        self.keys = keys
        self.shared_memory = None  # the "shm" reduce mode's segment of the current session
        self.reduce_mode = reduce if len(endpoints) > 1 else "star"
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

    def close_links(self, last_word: bytes | None = None) -> None:
        for link in self.links:
            if link.socket is None:
                continue
            if last_word:
                try:
                    protocol.send(link.socket, last_word)
                except zmq.ZMQError:
                    pass
        if last_word:
            time.sleep(0.01)  # let the final frames leave before the sockets close
        for link in self.links:
            if link.socket is not None:
                link.socket.disable_monitor()
                link.monitor.close(linger=0)
                link.socket.close(linger=100 if last_word else 0)
            if link.exit_fd is not None:
                os.close(link.exit_fd)
            link.socket = link.monitor = link.exit_fd = link.poller = None

    def handshake(self, timeout: float) -> None:
        session = uuid.uuid4().hex
        hello = {"protocol_version": protocol.PROTOCOL_VERSION, "model_sha256": self.model_sha256,
                 "n_shards": len(self.links), "n_slots": self.n_slots, "session": session,
                 "reduce": self.reduce_mode}
        if self.reduce_mode == "shm":
            hello.update(self.new_shared_memory())
        for link in self.links:
            protocol.send(link.socket, protocol.HELLO, {**hello, "shard_index": link.index})
        deadline = time.monotonic() + timeout
        for link in self.links:
            link.info = self.receive(link, protocol.READY, deadline, "handshake").header
        if self.reduce_mode in ("peers", "shm"):  # shm falls back to the peers for long prefills
            self.connect_peers(session, deadline)

    def new_shared_memory(self) -> dict:
        """A fresh, zeroed segment for this session's shared-memory all-reduce (the old one,
        if any, is released: a restarted worker must not see stale counters)."""
        from multiprocessing import shared_memory

        from llmtp.common.exchange.shm import segment_bytes
        self.release_shared_memory()
        rows = min(self.config.seq_len, SHM_CAPACITY_ROWS)
        self.shared_memory = shared_memory.SharedMemory(
            create=True, size=segment_bytes(len(self.links), rows, self.config.dim))
        self.shared_memory.buf[:] = bytes(self.shared_memory.size)
        return {"shm_name": self.shared_memory.name, "shm_rows": rows}

    def release_shared_memory(self) -> None:
        if self.shared_memory is not None:
            self.shared_memory.close()
            self.shared_memory.unlink()
            self.shared_memory = None

    def connect_peers(self, session: str, deadline: float) -> None:
        """Tell every worker where the others' peer inboxes are (at the host we reached it on)."""
        endpoints = []
        for link in self.links:
            host = link.endpoint[len("tcp://"):].rsplit(":", 1)[0]
            endpoints.append(f"tcp://{host}:{link.info['peer_port']}")
        for link in self.links:
            protocol.send(link.socket, protocol.PEERS, {"session": session, "endpoints": endpoints})
        for link in self.links:
            self.receive(link, protocol.CONNECTED, deadline, "peer connection")

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
        header = {"step_id": self.step_id, "all_logits": all_logits,
                  "sequences": [[s.slot, s.start_position, s.n_tokens] for s in sequences]}
        for link in self.links:
            protocol.send(link.socket, protocol.STEP, header, [x])
        if self.reduce_mode == "star" and len(self.links) > 1:
            for sync in range(2 * self.config.n_layers):
                self.reduce(sync, np.empty_like(x))
        deadline = time.monotonic() + self.timeout
        replies = [self.receive(link, protocol.LOGITS, deadline, f"step {self.step_id}") for link in self.links]
        self.last_step_timing = [{key: reply.header.get(key, 0.0) for key in ("forward_s", "reduce_s")}
                                 for reply in replies]
        return np.concatenate([reply.arrays[0] for reply in replies], axis=1)

    def reduce(self, sync: int, total: np.ndarray) -> None:
        """Sum every worker's partial for this sync into `total` and send it back to all.

        `total` must be fresh each sync: a zero-copy send may still be reading it."""
        deadline = time.monotonic() + self.timeout
        state = f"step {self.step_id} sync {sync}"
        for position, link in enumerate(self.links):
            message = self.receive(link, protocol.PARTIAL, deadline, state)
            if message.header.get("step_id") != self.step_id or message.header.get("sync") != sync \
                    or len(message.arrays) != 1 or message.arrays[0].shape != total.shape:
                raise ProtocolError(f"{link.name} sent a PARTIAL that does not match {state}")
            if position == 0:
                np.copyto(total, message.arrays[0])
            else:
                np.add(total, message.arrays[0], out=total)
        header = {"step_id": self.step_id, "sync": sync}
        for link in self.links:
            protocol.send(link.socket, protocol.REDUCED, header, [total])

    def receive(self, link: WorkerLink, kind: bytes, deadline: float, state: str) -> Message:
        """The next message from `link`, which must be `kind`. WorkerLost when any worker dies or
        drops its connection, or this one stays silent past the deadline; WorkerError on an
        ERROR reply. Each names the worker and what we were waiting for."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerLost(link.index, f"{link.name} sent no {kind.decode()} within "
                                             f"{self.timeout:g} s ({state})")
            ready = dict(link.poller.poll(min(remaining, 1.0) * 1000))
            if link.socket not in ready:
                self.check_alarms(state)  # an exit fd or monitor fired, or a quiet second passed
                continue
            message = protocol.decode(link.socket.recv_multipart(copy=False))
            if message.kind == protocol.ERROR:
                raise WorkerError(f"{link.name}: {message.header.get('message', 'error')}")
            if message.kind != kind:
                raise ProtocolError(f"{link.name} sent {message.kind.decode()} during {state}, "
                                    f"expected {kind.decode()}")
            return message

    def check_alarms(self, state: str) -> None:
        for link in self.links:
            if link.process is not None and link.process.poll() is not None:
                raise WorkerLost(link.index, f"{link.name} exited with code {link.process.returncode} "
                                             f"({state})")
            while link.monitor.poll(0):
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
        for link in self.links:
            protocol.send(link.socket, protocol.PING)
        deadline = time.monotonic() + self.timeout
        return [self.receive(link, protocol.PONG, deadline, "ping").header for link in self.links]

    def stats(self) -> list[WorkerStats]:
        return [WorkerStats(pid=pong.get("pid", 0), rss_bytes=pong["rss_bytes"], peak_rss_bytes=pong["peak_rss_bytes"],
                            shard_bytes=pong["shard_bytes"], kv_cache_bytes=pong["kv_cache_bytes"])
                for pong in self.worker_stats()]

    def timing(self) -> list[StepTiming]:
        return [StepTiming(**entry) for entry in self.last_step_timing]

    def close(self, shutdown_workers: bool = False) -> None:
        """End the session (BYE), or stop the workers too (SHUTDOWN). Never blocks."""
        self.close_links(protocol.SHUTDOWN if shutdown_workers else protocol.BYE)
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
