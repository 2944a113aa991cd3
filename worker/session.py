"""What a worker holds between messages: its state, and the session it serves.

    IDLE --HELLO--> IN_SESSION --PEERS--> CONNECTED --STEP--> STEPPING --LOGITS--> CONNECTED
                    (star, one worker: straight to CONNECTED)            (abandoned: CONNECTED or IDLE)
    any state --BYE--> IDLE;  PING is answered in every state but STEPPING, where it waits for the step's end.

A message wrong for the state is refused at once with the state named (a STEP before PEERS
once waited a minute for reductions that could not come).
"""

from dataclasses import dataclass
from enum import Enum

from llmtp.common.exchange.base import Exchange
from llmtp.common.exchange.modes import ReduceMode


class WorkerState(Enum):
    IDLE = "idle"  # no session: waits for a HELLO
    IN_SESSION = "in session"  # HELLO accepted; waits for PEERS (reduce peers / shm)
    CONNECTED = "connected"  # ready for STEP
    STEPPING = "stepping"  # inside a step: only its reductions are read, control messages wait

    def accepts(self, kind: bytes) -> bool:
        return kind in ACCEPTED[self]


ACCEPTED = {
    WorkerState.IDLE: {b"HELLO", b"PING"},
    WorkerState.IN_SESSION: {b"HELLO", b"PING", b"PEERS", b"BYE", b"SHUTDOWN"},
    WorkerState.CONNECTED: {b"HELLO", b"PING", b"STEP", b"BYE", b"SHUTDOWN"},
    WorkerState.STEPPING: set(),  # mid-step messages go through Worker.poll_mid_step
}
WAITING_FOR = {WorkerState.IDLE: "a HELLO", WorkerState.IN_SESSION: "PEERS",
               WorkerState.CONNECTED: "a STEP", WorkerState.STEPPING: "the step's reductions"}


@dataclass
class Session:
    """One coordinator's session: who it is, how this worker sums, and with what."""

    coordinator: bytes  # ZeroMQ identity of the coordinator's socket
    session_id: str
    reduce: ReduceMode
    exchange: Exchange | None = None  # built at HELLO (star, one worker) or at PEERS (peers, shm)
