"""The one interface every all-reduce implements, and the one error a step ends with.

A worker's forward pass calls `exchange.allreduce(partial)` twice per layer; the exchange
returns the sum over every worker, added in worker order so every copy of the residual
stream stays bit-identical. Lifecycle: built when a session opens, `start_step` before each
step, `close` when the session ends.
"""

from abc import ABC, abstractmethod

import numpy as np


class StepAbandoned(Exception):
    """The step cannot complete: a reduction did not arrive in time, or a control message
    (BYE, a new HELLO) came for the worker mid-step. `session_over`: the session is gone too."""

    def __init__(self, message: str, session_over: bool = False):
        super().__init__(message)
        self.session_over = session_over


class Exchange(ABC):
    def start_step(self, step_id: int) -> None:
        """A new step begins: its syncs count from 0."""
        self.step_id = step_id
        self.sync = 0

    @abstractmethod
    def allreduce(self, partial: np.ndarray) -> np.ndarray:
        """The sum of every worker's partial for this step's next sync; StepAbandoned if it cannot come."""

    def close(self) -> None:
        """Release what the session held (sockets, shared memory)."""


class NoExchange(Exchange):
    """A lone worker holds the whole sum already."""

    def allreduce(self, partial: np.ndarray) -> np.ndarray:
        return partial
