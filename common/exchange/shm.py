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

import mmap
import os
import secrets
import time
from typing import Callable

import numpy as np

from .base import Exchange, StepAbandoned

COUNTER_BYTES = 8
CHECK_EVERY = 2000  # spins between looks at the clock and the control socket


def segment_bytes(n_workers: int, capacity_rows: int, dim: int) -> int:
    return n_workers * COUNTER_BYTES + 2 * n_workers * capacity_rows * dim * 4


class Segment:
    """A POSIX shared-memory map of our own. multiprocessing.shared_memory registers every
    segment, created or only opened, with a resource tracker: a Python process of its own that
    each coordinator and each worker would start (three interpreter starts on the first step's
    way, about 0.1 s of 2 cores), and which the coordinator needs not: it unlinks the name as
    soon as every worker holds the map (see ClusterEngine.handshake), so not even a kill -9
    can leave it behind."""

    def __init__(self, name: str, size: int, create: bool):
        import _posixshmem
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        descriptor = _posixshmem.shm_open(name, flags, mode=0o600)
        self.name = name
        try:
            if create:
                os.ftruncate(descriptor, size)  # a new POSIX segment reads as zeros
            self.size = os.fstat(descriptor).st_size
            self.map = mmap.mmap(descriptor, self.size)
        except BaseException:
            if create:
                _posixshmem.shm_unlink(name)
            raise
        finally:
            os.close(descriptor)
        self.buf = memoryview(self.map)
        self.linked = create

    def unlink(self) -> None:
        """Remove the name; the maps stay valid until closed."""
        if self.linked:
            import _posixshmem
            self.linked = False
            try:
                _posixshmem.shm_unlink(self.name)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        if self.buf is not None:
            self.buf.release()
            self.buf = None
            self.map.close()


class SharedSegment:
    """The coordinator's side: creates (zeroed) and finally unlinks one session's segment."""

    def __init__(self, n_workers: int, capacity_rows: int, dim: int):
        self.memory = Segment(f"/llmtp-{secrets.token_hex(8)}", segment_bytes(n_workers, capacity_rows, dim),
                              create=True)
        self.name = self.memory.name

    def unlink(self) -> None:
        self.memory.unlink()

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
        self.segment = Segment(name, 0, create=False)  # the coordinator owns (and unlinks) it
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
