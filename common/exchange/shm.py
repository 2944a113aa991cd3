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

import numpy as np

COUNTER_BYTES = 8
CHECK_EVERY = 2000  # spins between looks at the clock and the control socket


def segment_bytes(n_workers: int, capacity_rows: int, dim: int) -> int:
    return n_workers * COUNTER_BYTES + 2 * n_workers * capacity_rows * dim * 4


class ShmExchange:
    def __init__(self, name: str, index: int, count: int, capacity_rows: int, dim: int):
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

    def allreduce(self, partial: np.ndarray, deadline: float, between_spins) -> np.ndarray:
        """The sum of every worker's partial for the next generation. between_spins() runs every
        CHECK_EVERY spins (control messages, parent check); it may raise to end the step."""
        n_rows = partial.shape[0]
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
                        raise TimeoutError(f"no partial from worker {worker} in shared memory "
                                           f"(generation {self.generation})")
                    between_spins()
        total = self.slots[parity, 0, :n_rows].copy()
        for worker in range(1, self.count):
            total += self.slots[parity, worker, :n_rows]
        return total

    def close(self) -> None:
        self.published = self.slots = None
        self.segment.close()
