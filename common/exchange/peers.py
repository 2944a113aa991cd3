"""All-reduce by direct exchange between workers, with no coordinator in the loop.

Every worker PUSHes its partial to every other worker and PULLs theirs, then sums all N
in worker-index order, so every worker holds the bit-identical total (their residual
streams must never drift apart). One network hop per sync instead of the star's two,
and the coordinator sleeps through the step.
"""

import time
from typing import Callable

import numpy as np
import zmq

from llmtp.common.wire import protocol, security
from llmtp.common.errors import ProtocolError
from llmtp.common.wire.messages import Partial

from .base import Exchange, StepAbandoned

INBOX_HIGH_WATER = 8  # messages queued per connection: a real peer is at most one sync ahead


class PeerExchange(Exchange):
    def __init__(self, context: zmq.Context, bind_host: str, index: int, count: int, max_message_bytes: int,
                 port: int | None = None, keys: security.WorkerKeys | None = None,
                 wait: Callable[[int], bool] | None = None, timeout: float = 60.0):
        """port: the inbox's (None = any free one). keys: CURVE both ways, the workers' shared
        pair on each end, so an inbox admits only other workers. wait(ms): polls the inbox and
        the worker's control socket together (it raises StepAbandoned when a control message
        ends the step); True when the inbox has something to read. timeout: seconds per sync."""
        self.index = index
        self.count = count
        self.keys = keys
        self.wait = wait
        self.timeout = timeout
        self.step_id = self.sync = 0
        self.inbox = context.socket(zmq.PULL)
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.inbox.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self.inbox.setsockopt(zmq.RCVHWM, INBOX_HIGH_WATER)
        if keys:
            security.serve_curve(self.inbox, keys.worker, security.PEERS_DOMAIN)
        self.inbox.bind(f"tcp://{bind_host}:{port or '*'}")
        self.port = int(self.inbox.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        self.context = context
        self.outboxes: dict[int, zmq.Socket] = {}
        self.session = ""
        self.early: dict[int, np.ndarray] = {}  # partials of the next sync, from faster peers
        self.next_step: dict[int, Partial] = {}  # sync-0 partials of a step not begun here yet (drain)

    def connect(self, session: str, endpoints: list[str]) -> None:
        """Start a session: drop old connections and anything queued from an old session."""
        self.close_outboxes()
        self.session = session
        self.early = {}
        self.next_step = {}
        self.step_id = self.sync = 0  # a new coordinator counts its steps from 1
        for index, endpoint in enumerate(endpoints):
            if index != self.index:
                outbox = self.context.socket(zmq.PUSH)
                outbox.setsockopt(zmq.LINGER, 0)
                if self.keys:
                    security.connect_curve(outbox, self.keys.worker, self.keys.worker.public)
                outbox.connect(endpoint)
                self.outboxes[index] = outbox

    def allreduce(self, partial: np.ndarray) -> np.ndarray:
        """Sum of every worker's partial for this step's next sync."""
        step_id, sync = self.step_id, self.sync
        message = Partial(step_id, sync, partial, session=self.session, index=self.index)
        for outbox in self.outboxes.values():
            protocol.send_message(outbox, message)
        received = {self.index: partial}
        received.update(self.early)
        self.early = {}
        deadline = time.monotonic() + self.timeout
        while len(received) < self.count:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                missing = sorted(set(range(self.count)) - set(received))
                raise StepAbandoned(f"no partial from worker(s) {missing} for step {step_id} sync {sync} "
                                    f"within {self.timeout:g} s", session_over=True)
            if not self.wait(remaining_ms):
                continue
            self.take(self.inbox.recv_multipart(copy=False), step_id, sync, partial.shape, received)
        self.sync += 1
        total = received[0].copy()
        for index in range(1, self.count):
            total += received[index]
        return total

    def take(self, frames, step_id: int, sync: int, shape: tuple, received: dict) -> None:
        """File a peer's partial under this sync or the next; anything else is stale or junk."""
        message = self.peer_partial(frames)
        if message is None or message.step_id != step_id or message.partial.shape != shape:
            return
        if message.sync == sync:
            received[message.index] = message.partial
        elif message.sync == sync + 1:
            self.early[message.index] = message.partial

    def peer_partial(self, frames) -> Partial | None:
        """A PARTIAL of this session from another worker, or None (junk, stale, or not ours)."""
        try:
            message = protocol.unpack(frames)
        except ProtocolError:
            return None
        if type(message) is not Partial or message.session != self.session or message.index is None \
                or not message.index < self.count or message.index == self.index:
            return None
        return message

    def drain(self) -> int:
        """Between steps: read what sits in the inbox, keeping only each peer's latest sync-0
        partial of a later step of this session (a faster peer may send one before our STEP
        arrives) and dropping the rest, so junk cannot pile up while idle. Returns how many
        were dropped."""
        dropped = 0
        while self.inbox.poll(0):
            message = self.peer_partial(self.inbox.recv_multipart(copy=False))
            if message is None or message.sync != 0 or message.step_id <= self.step_id:
                dropped += 1
                continue
            self.next_step[message.index] = message
        return dropped

    def start_step(self, step_id: int) -> None:
        self.early = {index: message.partial for index, message in self.next_step.items()
                      if message.step_id == step_id}
        self.next_step = {}
        super().start_step(step_id)

    def close_outboxes(self) -> None:
        for outbox in self.outboxes.values():
            outbox.close(linger=0)
        self.outboxes = {}

    def close(self) -> None:
        self.close_outboxes()
        self.inbox.close(linger=0)
