"""The coordinator's side of a step: embed, broadcast, sum partials, gather logits.

Same `step` signature as common.engine.LocalEngine. Every wait polls the worker
sockets together with the local worker processes' exit fds (when it started them),
so a crash shows at once with its exit code, and every wait has a deadline.
"""

import os
import time
import uuid
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import zmq

from common import protocol
from common.config import ModelConfig
from common.errors import ProtocolError, WorkerError
from common.protocol import Message
from common.transformer import StepSequence
from common.weights import Matrix, embed_tokens


@dataclass
class WorkerLink:
    index: int
    endpoint: str
    socket: zmq.Socket
    process: object | None = None  # subprocess.Popen when this coordinator started the worker
    exit_fd: int | None = None  # pidfd that becomes readable when that process exits
    info: dict | None = None  # the READY header
    poller: zmq.Poller | None = None  # this socket plus every worker's exit fd

    @property
    def name(self) -> str:
        return f"worker {self.index} ({self.endpoint})"


class ClusterEngine:
    def __init__(self, config: ModelConfig, embedding: Matrix, endpoints: Sequence[str], model_sha256: str,
                 n_slots: int = 1, timeout: float = 30.0, processes: Sequence | None = None,
                 reduce: str = "peers"):
        """reduce: "peers" (workers exchange partials directly; the default, measured faster)
        or "star" (through this coordinator). Falls back to star where peers cannot connect."""
        assert reduce in protocol.REDUCE_MODES, reduce
        self.config = config
        self.embedding = embedding
        self.timeout = timeout
        self.reduce_mode = reduce if len(endpoints) > 1 else "star"
        self.step_id = 0
        self.last_step_timing: list[dict] = []  # per worker: forward_s, reduce_s of the last step
        self.context = zmq.Context()
        self.links = []
        for index, endpoint in enumerate(endpoints):
            socket = self.context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.IDENTITY, f"coordinator-{uuid.uuid4().hex[:12]}-{index}".encode())
            socket.connect(endpoint)
            process = processes[index] if processes else None
            self.links.append(WorkerLink(index, endpoint, socket, process, _exit_fd(process)))
        exit_fds = [link.exit_fd for link in self.links if link.exit_fd is not None]
        for link in self.links:
            # Wait on one socket at a time (others may hold ready messages we are not
            # reading yet, which would make a shared poller spin), but on every exit fd.
            link.poller = zmq.Poller()
            link.poller.register(link.socket, zmq.POLLIN)
            for fd in exit_fds:
                link.poller.register(fd, zmq.POLLIN)
        self.handshake(model_sha256, n_slots)

    def handshake(self, model_sha256: str, n_slots: int) -> None:
        session = uuid.uuid4().hex
        for link in self.links:
            protocol.send(link.socket, protocol.HELLO, {
                "protocol_version": protocol.PROTOCOL_VERSION, "model_sha256": model_sha256,
                "shard_index": link.index, "n_shards": len(self.links), "n_slots": n_slots,
                "session": session, "reduce": self.reduce_mode})
        deadline = time.monotonic() + self.timeout
        for link in self.links:
            link.info = self.receive(link, protocol.READY, deadline, "handshake").header
        if self.reduce_mode == "peers":
            self.connect_peers(session)

    def connect_peers(self, session: str) -> None:
        """Tell every worker where the others' peer inboxes are (at the host we reached it on)."""
        endpoints = []
        for link in self.links:
            host = link.endpoint[len("tcp://"):].rsplit(":", 1)[0]
            endpoints.append(f"tcp://{host}:{link.info['peer_port']}")
        for link in self.links:
            protocol.send(link.socket, protocol.PEERS, {"session": session, "endpoints": endpoints})
        deadline = time.monotonic() + self.timeout
        for link in self.links:
            self.receive(link, protocol.CONNECTED, deadline, "peer connection")

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
        """The next message from `link`, which must be `kind`; WorkerError on a dead or silent
        worker or an ERROR reply, naming the worker and what we were waiting for."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerError(f"{link.name} sent no {kind.decode()} within {self.timeout:g} s ({state})")
            ready = dict(link.poller.poll(min(remaining, 1.0) * 1000))
            if link.socket not in ready:
                self.check_processes()  # an exit fd fired, or a quiet second passed
                continue
            message = protocol.decode(link.socket.recv_multipart(copy=False))
            if message.kind == protocol.ERROR:
                raise WorkerError(f"{link.name}: {message.header.get('message', 'error')}")
            if message.kind != kind:
                raise ProtocolError(f"{link.name} sent {message.kind.decode()} during {state}, "
                                    f"expected {kind.decode()}")
            return message

    def check_processes(self) -> None:
        for link in self.links:
            if link.process is not None and link.process.poll() is not None:
                raise WorkerError(f"{link.name} exited with code {link.process.returncode}")

    def worker_stats(self) -> list[dict]:
        """RSS, shard and KV-cache bytes of every worker (PING/PONG)."""
        for link in self.links:
            protocol.send(link.socket, protocol.PING)
        deadline = time.monotonic() + self.timeout
        return [self.receive(link, protocol.PONG, deadline, "ping").header for link in self.links]

    def close(self, shutdown_workers: bool = False) -> None:
        """End the session (BYE), or stop the workers too (SHUTDOWN). Never blocks."""
        kind = protocol.SHUTDOWN if shutdown_workers else protocol.BYE
        for link in self.links:
            try:
                protocol.send(link.socket, kind)
            except zmq.ZMQError:
                pass
        time.sleep(0.01 if self.links else 0)  # let the final frames leave before linger-0 close
        for link in self.links:
            link.socket.close(linger=100)
            if link.exit_fd is not None:
                os.close(link.exit_fd)
                link.exit_fd = None
        self.links = []
        self.context.term()


def _exit_fd(process) -> int | None:
    if process is None or not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(process.pid)
    except OSError:
        return None
