"""How many BLAS threads a step runs on, chosen from the steps' own times.

A decode step streams every weight once; on two quiet cores two OpenBLAS threads stream
about 1.6x what one does. But OpenBLAS splits each product evenly and its threads spin while
they wait, so when another process holds one of the cores, the thread that shares it holds
back every product and the spinning crowds out the rest: a 110M decode fell from ~38 to
3-16 tok/s, while one thread kept ~23 (docs/PERFORMANCE.md, "Float32, threads and
contention"). No fixed count is right on a shared machine, so this measures: decode-shaped
steps run on the count that has been fastest lately, and now and then one step tries the
other (1 or every usable core). A try that loses backs the next one off (up to every
MAX_PROBE_EVERY steps), so a quiet or a steadily busy machine pays little for it.

Products give the same numbers on any thread count (OpenBLAS splits a product's rows and
columns among threads, never a dot product's sum), so switching never changes a token.
threadpoolctl finds the BLAS library numpy loaded and sets its count directly.
LLMTP_ADAPTIVE_THREADS=0 turns the choosing off (the environment's count stays), for
measuring one fixed count against another.
"""

import os
import statistics
import time
from collections import deque
from contextlib import contextmanager

DECODE_ROWS = 8  # a step of at most this many rows is timed (prefills follow the choice)
FIRST_PROBE_EVERY = 16  # decode steps between tries of the other count, at first and after a switch
MAX_PROBE_EVERY = 128
SWITCH_BELOW = 0.9  # switch when the other count's try took less than this share of the current's time
HISTORY = 3  # the current count's time is the median of its last few steps


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def blas_libraries() -> list:
    """threadpoolctl's controllers for the BLAS libraries in this process (none without it)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return []
    return [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]


class BlasThreads:
    """Times decode steps on `most` threads and on one, and keeps to the faster."""

    def __init__(self, most: int | None = None, libraries: list | None = None):
        self.libraries = blas_libraries() if libraries is None else libraries
        configured = min((lib.num_threads for lib in self.libraries), default=1)
        # The environment's count (OPENBLAS_NUM_THREADS, a worker's --threads) is the ceiling.
        self.most = max(1, min(most or usable_cores(), configured))
        self.current = self.most
        self.times = {count: deque(maxlen=HISTORY) for count in {1, self.most}}
        self.probe_every = HISTORY  # the first try comes as soon as the current count has a median
        self.steps_since_probe = 0

    @property
    def adaptive(self) -> bool:
        return self.most > 1 and bool(self.libraries) and os.environ.get("LLMTP_ADAPTIVE_THREADS") != "0"

    def set_threads(self, count: int) -> None:
        for lib in self.libraries:
            lib.set_num_threads(count)

    @contextmanager
    def step(self, n_rows: int):
        """Around one step: a decode-shaped one is timed, and may be a try of the other count."""
        if not self.adaptive or n_rows > DECODE_ROWS:
            yield
            return
        other = 1 if self.current == self.most else self.most
        probing = self.steps_since_probe >= self.probe_every
        count = other if probing else self.current
        if probing:
            self.set_threads(other)
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            if probing:
                self.set_threads(self.current)
            self.record(count, elapsed, probing)

    def record(self, count: int, elapsed: float, probing: bool) -> None:
        if not probing:
            self.times[count].append(elapsed)
            self.steps_since_probe += 1
            return
        self.steps_since_probe = 0
        current_time = statistics.median(self.times[self.current])
        self.times[count].clear()  # a try stands alone: older times of that count are stale
        self.times[count].append(elapsed)
        if elapsed < SWITCH_BELOW * current_time:
            self.current = count
            self.set_threads(count)
            self.probe_every = FIRST_PROBE_EVERY
        else:
            self.probe_every = min(MAX_PROBE_EVERY, max(FIRST_PROBE_EVERY, 2 * self.probe_every))
