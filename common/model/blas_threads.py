"""How many BLAS threads a step runs on, chosen from the steps' own times.

A decode step streams every weight once; on two quiet cores two OpenBLAS threads stream
about 1.6x what one does. But OpenBLAS splits each product evenly and its threads spin while
they wait, so when another process holds one of the cores, the thread that shares it holds
back every product and the spinning crowds out the rest: a 110M decode fell from ~38 to
3-16 tok/s, while one thread kept ~23 (docs/PERFORMANCE.md, "Float32, threads and
contention"). No fixed count is right on a shared machine, so this measures: decode-shaped
steps run on the count that has been fastest lately, and now and then one step tries the
other (1 or every usable core). A try that loses backs the next one off (up to every
MAX_PROBE_EVERY steps), so a quiet or a steadily busy machine pays little for it; two steps in
a row far slower than the current count's median try the other at once; and one thread taken
because another process was seen running tries every core again as soon as none is (the
backed-off schedule alone kept a bench's quiet rows after a busy one on one thread). The first
decode steps after a prefill are not timed (its BLAS threads are still winding down). The count is the
process's (every chooser in it sets the libraries alike), so each step sets its own. A prefill
(too long to try twice) runs on one thread whenever another process is running as it
starts, and so does the first step: the bench's contended prefill fell to 0.32x of its
quiet speed on the decode's two threads.

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

import numpy as np

DECODE_ROWS = 8  # a step of at most this many rows is timed (prefills follow the choice)
FIRST_PROBE_EVERY = 16  # decode steps between tries of the other count, at first and after a switch
MAX_PROBE_EVERY = 128
SWITCH_BELOW = 0.9  # switch when the other count's try took less than this share of the current's time
TRY_AT_ONCE_ABOVE = 1.5  # two steps in a row this much slower than the current count's median: try the other next
HISTORY = 3  # the current count's time is the median of its last few steps
SETTLE_STEPS = 2  # decode steps after a prefill left untimed: its BLAS threads are still winding down
QUIET_LOOK_EVERY = 8  # steps on one thread between looks for the process that took a core having gone
WARM_UP_ROWS = 64  # rows of the product that warms the library (a prefill's shape)
WARM_UP_MOST = 1024, 4096  # at most these inputs and outputs: a few ms, even for a 7B layer


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def others_running() -> int:
    """Tasks of other processes that are running or runnable right now, machine-wide:
    /proc/loadavg's fourth field, less this process's own running threads (the reader, and
    OpenBLAS threads still spinning after a product); 0 if unknown."""
    try:
        with open("/proc/loadavg") as loadavg:
            running = int(loadavg.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return 0
    return max(0, running - own_running_threads())


def own_running_threads() -> int:
    count = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/stat") as stat:
                count += stat.read().rsplit(")", 1)[1].split()[0] == "R"  # the state follows the name
        except (OSError, IndexError):
            pass
    return max(1, count)


def warm_up(rows: int, n_in: int, n_out: int, counts: list[int], libraries: list) -> None:
    """One product of prefill's shape on each thread count, so the first prefill does not pay
    for what a library does once: start its threads and fault in their packing buffers."""
    x = np.ones((rows, n_in), dtype=np.float32)
    weight = np.ones((n_out, n_in), dtype=np.float32)
    for count in counts:
        for lib in libraries:
            lib.set_num_threads(count)
        x @ weight.T
    if not counts:  # the count is not ours to change: warm it as it is
        x @ weight.T


def blas_libraries() -> list:
    """threadpoolctl's controllers for the BLAS libraries in this process (none without it),
    and llmtp's own kernels' count (decode's float32 and quantized products), set alike."""
    import llmtp.common.kernels as kernels
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return [kernels.THREADS]
    return [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"] + [kernels.THREADS]


class BlasThreads:
    """Times decode steps on `most` threads and on one, and keeps to the faster."""

    def __init__(self, most: int | None = None, libraries: list | None = None, busy_now: bool | None = None):
        """busy_now: whether another process runs now (None: look, others_running())."""
        self.libraries = blas_libraries() if libraries is None else libraries
        configured = min((lib.num_threads for lib in self.libraries), default=1)
        # The environment's count (OPENBLAS_NUM_THREADS, a worker's --threads) is the ceiling.
        self.most = max(1, min(most or usable_cores(), configured))
        # Start where the machine is now: with another process running, one thread (the first
        # prefill is otherwise the slowest step of all, before any try could move it).
        self.current = self.most
        # one thread because another process was seen running: when none is, try every core again
        self.seen_busy = False
        if self.adaptive and (others_running() >= 1 if busy_now is None else busy_now):
            self.current = 1
            self.seen_busy = True
            self.apply(1)
        self.times = {count: deque(maxlen=HISTORY) for count in {1, self.most}}
        self.probe_every = HISTORY  # the first try comes as soon as the current count has a median
        self.steps_since_probe = 0
        self.slow_steps = 0  # decode steps in a row much slower than their count's median
        self.settling = 0  # decode steps still to leave untimed after a prefill

    def warm_up(self, n_in: int, n_out: int) -> None:
        """The library warmed on every count a step may use, then left on the current one."""
        n_in, n_out = min(n_in, WARM_UP_MOST[0]), min(n_out, WARM_UP_MOST[1])
        if not self.adaptive:
            warm_up(WARM_UP_ROWS, n_in, n_out, [], [])
            return
        warm_up(WARM_UP_ROWS, n_in, n_out, sorted({1, self.most}), self.libraries)
        self.apply(self.current)

    @property
    def adaptive(self) -> bool:
        return self.most > 1 and bool(self.libraries) and os.environ.get("LLMTP_ADAPTIVE_THREADS") != "0"

    def apply(self, count: int) -> None:
        """Set `count` wherever a library holds another. The count is the process's, not this
        chooser's: another engine in the same process (the bench holds several) may have moved
        it since this one's last step, and its steps then ran on the other's choice."""
        for lib in self.libraries:
            if lib.num_threads != count:
                lib.set_num_threads(count)

    @contextmanager
    def step(self, n_rows: int):
        """Around one step: a decode-shaped one is timed, and may be a try of the other count."""
        if not self.adaptive:
            yield
            return
        if n_rows > DECODE_ROWS:  # a prefill is not timed; it runs on one thread if anything else runs now
            count = 1 if self.current == 1 or others_running() >= 1 else self.most
            self.apply(count)
            try:
                yield
            finally:
                self.apply(self.current)
                # the first decode step after a 128-token prefill took 5-7x the next ones while
                # OpenBLAS's threads spun down; timed, it made a one-thread try win and stay
                self.settling = SETTLE_STEPS
            return
        if self.settling:
            self.settling -= 1
            self.apply(self.current)
            yield
            return
        other = 1 if self.current == self.most else self.most
        probing = self.steps_since_probe >= self.probe_every
        count = other if probing else self.current
        self.apply(count)
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            if probing:
                self.apply(self.current)
            self.record(count, elapsed, probing)

    def record(self, count: int, elapsed: float, probing: bool) -> None:
        if not probing:
            history = self.times[count]
            # A core just taken shows as slow steps; waiting out a backed-off schedule (up to
            # MAX_PROBE_EVERY steps) cost a 110M decode 0.24x of its speed for a whole bench row.
            # Two in a row (one is noise here), and the median the try must beat is theirs.
            slow = len(history) == HISTORY and elapsed > TRY_AT_ONCE_ABOVE * statistics.median(history)
            self.slow_steps = self.slow_steps + 1 if slow else 0
            self.steps_since_probe = self.probe_every if self.slow_steps >= 2 else self.steps_since_probe + 1
            history.append(elapsed)
            if self.seen_busy and self.steps_since_probe % QUIET_LOOK_EVERY == 0 and others_running() == 0:
                # the process that took a core has gone: try now, once (an unseen one, another
                # VM's, gets no more tries than the schedule's)
                self.seen_busy = False
                self.steps_since_probe = self.probe_every
            return
        self.steps_since_probe = self.slow_steps = 0
        current_time = statistics.median(self.times[self.current])
        self.times[count].clear()  # a try stands alone: older times of that count are stale
        self.times[count].append(elapsed)
        if elapsed < SWITCH_BELOW * current_time:
            self.current = count
            self.apply(count)
            self.probe_every = FIRST_PROBE_EVERY
            self.seen_busy = count == 1 and others_running() >= 1
        else:
            self.probe_every = min(MAX_PROBE_EVERY, max(FIRST_PROBE_EVERY, 2 * self.probe_every))
