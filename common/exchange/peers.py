"""All-reduce by direct exchange between workers, with no coordinator in the loop.

Every worker PUSHes its partial to every other worker and PULLs theirs, then sums all N
in worker-index order, so every worker holds the bit-identical total (their residual
streams must never drift apart). One network hop per sync instead of the star's two,
and the coordinator sleeps through the step.
"""

import time

import numpy as np
import zmq

from llmtp.common.wire import protocol, security
from llmtp.common.errors import ProtocolError


class PeerExchange:
    def __init__(self, context: zmq.Context, bind_host: str, index: int, count: int, max_message_bytes: int,
                 port: int | None = None, keys: security.WorkerKeys | None = None):
        """port: the inbox's (None = any free one). keys: CURVE both ways, the workers' shared
        pair on each end, so an inbox admits only other workers."""
        self.index = index
        self.count = count
        self.keys = keys
        self.inbox = context.socket(zmq.PULL)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.inbox.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        if keys:
            security.serve_curve(self.inbox, keys.worker, security.PEERS_DOMAIN)
        self.inbox.bind(f"tcp://{bind_host}:{port or '*'}")
        self.port = int(self.inbox.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        self.context = context
        self.outboxes: dict[int, zmq.Socket] = {}
        self.session = ""
        self.early: dict[int, np.ndarray] = {}  # partials of the next sync, from faster peers

    def connect(self, session: str, endpoints: list[str]) -> None:
        """Start a session: drop old connections and anything queued from an old session."""
        self.close_outboxes()
        self.session = session
        self.early = {}
        for index, endpoint in enumerate(endpoints):
            if index != self.index:
                outbox = self.context.socket(zmq.PUSH)
                outbox.setsockopt(zmq.LINGER, 0)
                if self.keys:
                    security.connect_curve(outbox, self.keys.worker, self.keys.worker.public)
                outbox.connect(endpoint)
                self.outboxes[index] = outbox

    def allreduce(self, partial: np.ndarray, step_id: int, sync: int, deadline: float, wait) -> np.ndarray:
        """Sum of every worker's partial for (step_id, sync). `wait(ms)` polls the inbox and the
        worker's control socket together, handling control messages itself; it returns True
        when the inbox has something to read."""
        header = {"session": self.session, "step_id": step_id, "sync": sync, "index": self.index}
        for outbox in self.outboxes.values():
            protocol.send(outbox, protocol.PARTIAL, header, [partial])
        received = {self.index: partial}
        received.update(self.early)
        self.early = {}
        while len(received) < self.count:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                missing = sorted(set(range(self.count)) - set(received))
                raise TimeoutError(f"no partial from worker(s) {missing} for step {step_id} sync {sync}")
            if not wait(remaining_ms):
                continue
            self.take(self.inbox.recv_multipart(copy=False), step_id, sync, partial.shape, received)
        total = received[0].copy()
        for index in range(1, self.count):
            total += received[index]
        return total

    def take(self, frames, step_id: int, sync: int, shape: tuple, received: dict) -> None:
        """File a peer's partial under this sync or the next; anything else is stale or junk."""
        try:
            message = protocol.decode(frames)
        except ProtocolError:
            return
        header = message.header
        index = header.get("index")
        if message.kind != protocol.PARTIAL or header.get("session") != self.session \
                or header.get("step_id") != step_id or not isinstance(index, int) \
                or not 0 <= index < self.count or index == self.index \
                or len(message.arrays) != 1 or message.arrays[0].shape != shape:
            return
        if header.get("sync") == sync:
            received[index] = message.arrays[0]
        elif header.get("sync") == sync + 1:
            self.early[index] = message.arrays[0]

    def close_outboxes(self) -> None:
        for outbox in self.outboxes.values():
            outbox.close(linger=0)
        self.outboxes = {}

    def close(self) -> None:
        self.close_outboxes()
        self.inbox.close(linger=0)
