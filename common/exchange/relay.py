"""Reduce mode "star": every partial goes to the coordinator, which answers the sum (REDUCED).

Two hops per sync, but no worker-to-worker connection at all. The worker side is
`RelayExchange`; the coordinator's side is `relay_step`, which sums in worker order."""

import time
from typing import Callable

import numpy as np

from llmtp.common.errors import ProtocolError
from llmtp.common.wire.messages import Partial, Reduced

from .base import Exchange, StepAbandoned


class RelayExchange(Exchange):
    def __init__(self, send: Callable[[Partial], None], receive: Callable[[float], Reduced | None], timeout: float):
        """send: a PARTIAL to the session's coordinator. receive(deadline): the next REDUCED from
        it, or None at the deadline (it raises StepAbandoned itself when a control message ends
        the step)."""
        self.send = send
        self.receive = receive
        self.timeout = timeout
        self.start_step(0)

    def allreduce(self, partial: np.ndarray) -> np.ndarray:
        self.send(Partial(self.step_id, self.sync, partial))
        reduced = self.receive(time.monotonic() + self.timeout)
        if reduced is None:
            raise StepAbandoned(f"no REDUCED for step {self.step_id} sync {self.sync} within {self.timeout:g} s",
                                session_over=True)
        if reduced.step_id != self.step_id or reduced.sync != self.sync or reduced.total.shape != partial.shape:
            raise ProtocolError(f"REDUCED for step {reduced.step_id} sync {reduced.sync} {reduced.total.shape} "
                                f"does not match step {self.step_id} sync {self.sync} {partial.shape}")
        self.sync += 1
        return reduced.total


def relay_step(n_workers: int, n_syncs: int, rows: int, dim: int, receive: Callable[[int, int], Partial],
               send_all: Callable[[Reduced], None], step_id: int) -> None:
    """The coordinator's part of a star step: for each sync, sum every worker's PARTIAL (from
    receive(worker, sync), already checked) in worker order and send the total to all.
    A fresh total each sync: a zero-copy send may still be reading the last one."""
    for sync in range(n_syncs):
        total = np.empty((rows, dim), dtype=np.float32)
        for worker in range(n_workers):
            partial = receive(worker, sync).partial
            if partial.shape != total.shape:
                raise ProtocolError(f"worker {worker}'s PARTIAL for step {step_id} sync {sync} is "
                                    f"{partial.shape}, expected {total.shape}")
            if worker == 0:
                np.copyto(total, partial)
            else:
                np.add(total, partial, out=total)
        send_all(Reduced(step_id, sync, total))
