"""`llmtp bench --contended`: every row again while a busy process holds one core.

A desktop is rarely quiet: a browser or a build takes a core now and then. Spinning BLAS
threads once made that cost 10x (common/model/blas_threads.py), so the bench keeps it in
view: in each round, after the quiet rows, a `while True: pass` process starts (the scheduler
places it, as it would a user's program), the same engines are timed again under rows named
"..., 1 core busy", and it is stopped. The ratio of each contended row to its quiet twin is
printed after the table; one busy core should cost at most its share (about 0.5x on 2 cores).
"""

import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Callable

from .results import BenchReport, EngineResult

BUSY_SUFFIX = ", 1 core busy"
SETTLE_SECONDS = 0.5  # for the scheduler to place the busy process before timing starts
BUSY_LOOP = "while True: pass"


@contextmanager
def one_core_busy():
    """A process that holds one core for as long as the block runs, then is stopped."""
    busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(SETTLE_SECONDS)
        yield busy
    finally:
        busy.kill()
        busy.wait()


def contended_label(label: str) -> str:
    return label + BUSY_SUFFIX


def is_contended(result: EngineResult) -> bool:
    return result.engine.endswith(BUSY_SUFFIX)


def time_while_busy(time_rows: Callable[[Callable[[str], str]], list[EngineResult]]) -> list[EngineResult]:
    """time_rows(label_of) times every engine once, naming each row label_of(its label)."""
    with one_core_busy():
        return time_rows(contended_label)


def contention_lines(report: BenchReport) -> list[str]:
    """Each contended row's decode and prefill against its quiet twin's."""
    quiet = {r.engine: r for r in report.results if not is_contended(r)}
    lines = []
    for row in report.results:
        twin = quiet.get(row.engine[:-len(BUSY_SUFFIX)]) if is_contended(row) else None
        if twin is not None:
            lines.append(f"{row.engine} / quiet: decode {row.decode_tokens_per_s / twin.decode_tokens_per_s:.2f}x, "
                         f"prefill {row.prefill_tokens_per_s / twin.prefill_tokens_per_s:.2f}x")
    return [""] + lines if lines else []
