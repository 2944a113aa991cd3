"""All-reduce through shared memory, for workers on one machine (reduce mode "shm").

The coordinator of a local cluster creates one segment per session:

  int64 published[N]                      how many partials worker w has written so far
  float32 slots[2][N][capacity_rows][dim]  partial g of worker w lives in slots[g % 2][w]

A worker copies its partial into its slot, then bumps its counter; it spins until every
counter has reached the same generation, and sums all N slots in worker order (so every
copy of x stays bit-identical, as with "peers"). Two parities suffice: nobody can write
generation g+2 before everyone has published g+1, which each does only after reading g.
Spinning costs nothing while every worker has its own core, which is the only case the
coordinator chooses this mode for; stores become visible in program order on x86-64 (TSO),
the only architecture it is enabled on. Steps longer than capacity_rows (long prefills)
use the ZeroMQ peer exchange instead.
"""

import time
from multiprocessing import resource_tracker, shared_memory

from typing import Callable

import numpy as np

from .base import Exchange, StepAbandoned

COUNTER_BYTES = 8
CHECK_EVERY = 2000  # spins between looks at the clock and the control socket


def segment_bytes(n_workers: int, capacity_rows: int, dim: int) -> int:
    return n_workers * COUNTER_BYTES + 2 * n_workers * capacity_rows * dim * 4


class SharedSegment:
    """The coordinator's side: creates (zeroed) and finally unlinks one session's segment."""

    def __init__(self, n_workers: int, capacity_rows: int, dim: int):
        self.memory = shared_memory.SharedMemory(create=True, size=segment_bytes(n_workers, capacity_rows, dim))
        self.memory.buf[:] = bytes(self.memory.size)
        self.name = self.memory.name

    def release(self) -> None:
        self.memory.close()
        self.memory.unlink()


class ShmExchange(Exchange):
    def __init__(self, name: str, index: int, count: int, capacity_rows: int, dim: int,
                 long_steps: Exchange | None = None, between_spins: Callable[[], None] = lambda: None,
                 timeout: float = 60.0):
        """long_steps: the exchange for steps of more than capacity_rows rows (the peers).
        between_spins() runs every CHECK_EVERY spins (control socket, parent check); it may
        raise StepAbandoned to end the step. timeout: seconds per sync."""
        self.long_steps = long_steps
        self.between_spins = between_spins
        self.timeout = timeout
        self.step_id = self.sync = 0
        self.index = index
        self.count = count
        self.capacity_rows = capacity_rows
        self.segment = shared_memory.SharedMemory(name=name)
        # The coordinator owns (and unlinks) the segment; Python 3.11 would otherwise also
        # register it here and unlink it when this worker exits.
        resource_tracker.unregister(self.segment._name, "shared_memory")
        if self.segment.size < segment_bytes(count, capacity_rows, dim):
            self.segment.close()
            raise ValueError(f"shared memory {name} is {self.segment.size} bytes, needs "
                             f"{segment_bytes(count, capacity_rows, dim)}")
        self.published = np.ndarray((count,), dtype=np.int64, buffer=self.segment.buf)
        self.slots = np.ndarray((2, count, capacity_rows, dim), dtype=np.float32, buffer=self.segment.buf,
                                offset=count * COUNTER_BYTES)
        self.generation = int(self.published[index])

    def fits(self, n_rows: int) -> bool:
        return n_rows <= self.capacity_rows

    def start_step(self, step_id: int) -> None:
        super().start_step(step_id)
        if self.long_steps is not None:
            self.long_steps.start_step(step_id)

    def allreduce(self, partial: np.ndarray) -> np.ndarray:
        """The sum of every worker's partial for the next generation."""
        n_rows = partial.shape[0]
        if not self.fits(n_rows):  # a long prefill: every worker takes the same way, by the same rows
            if self.long_steps is None:
                raise StepAbandoned(f"a step of {n_rows} rows does not fit the shared memory's {self.capacity_rows}")
            return self.long_steps.allreduce(partial)
        deadline = time.monotonic() + self.timeout
        parity = self.generation % 2
        self.slots[parity, self.index, :n_rows] = partial
        self.generation += 1
        self.published[self.index] = self.generation
        others = [worker for worker in range(self.count) if worker != self.index]
        spins = 0
        for worker in others:
            while self.published[worker] < self.generation:
                spins += 1
                if spins % CHECK_EVERY == 0:
                    if time.monotonic() > deadline:
                        raise StepAbandoned(f"no partial from worker {worker} in shared memory "
                                            f"(generation {self.generation}) within {self.timeout:g} s",
                                            session_over=True)
                    self.between_spins()
        total = self.slots[parity, 0, :n_rows].copy()
        for worker in range(1, self.count):
            total += self.slots[parity, worker, :n_rows]
        return total

    def close(self) -> None:
        """The segment only: the long-step exchange belongs to the worker."""
        self.published = self.slots = None
        self.segment.close()
