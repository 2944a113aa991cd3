"""The bench report's plot: tokens/s against workers beside the bandwidth limit, and where
each decode step's time goes. Needs matplotlib (the `bench` extra)."""

from pathlib import Path

import numpy as np

from .contention import is_contended
from .hf import HF_LABEL
from .results import BenchReport


def plot_report(report: BenchReport, path: Path) -> bool:
    """tokens/s against workers with the bandwidth limit, and each step's time split. False
    when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ours = [r for r in report.results if r.engine != HF_LABEL and not r.program and not is_contended(r)]  # quiet rows
    labels = [r.engine for r in ours]
    figure, (speed, split) = plt.subplots(1, 2, figsize=(12, 4.5))
    workers = sorted((r for r in ours if r.n_workers > 0), key=lambda r: r.n_workers)
    counts = [r.n_workers for r in workers]
    speed.plot(counts, [r.decode_tokens_per_s for r in workers], "o-", label="llmtp, N workers")
    speed.plot(counts, [report.limit_of(r) for r in workers], "s--", color="red",
               label="limit: weights / what their cores stream")
    for r in report.results:
        if r.n_workers == 0 and not (r.program and is_contended(r)):
            style = {"color": "gray", "linestyle": ":"} if r.engine == HF_LABEL else \
                {"color": "orange", "linestyle": "--"} if r.program else {"color": "green", "linestyle": "-."}
            speed.axhline(r.decode_tokens_per_s, label=f"{r.engine} ({r.cores} cores)", **style)
    speed.set_xticks(counts, [f"{r.n_workers} ({r.cores} core{'s' if r.cores > 1 else ''})" for r in workers])
    speed.set_xlabel("workers (cores)")
    speed.set_ylabel("decode tokens/s")
    speed.set_title(f"{report.model}: decode speed")
    speed.set_ylim(bottom=0)
    speed.legend(fontsize="small")
    positions = np.arange(len(ours))
    parts = [("math", "math_ms"), ("sync wait", "sync_wait_ms"), ("coordinator + transport", "coordinator_ms")]
    bottom = np.zeros(len(ours))
    for name, key in parts:
        values = np.array([getattr(r, key) for r in ours])
        split.bar(positions, values, bottom=bottom, label=name)
        bottom += values
    split.set_xticks(positions, labels)
    split.set_ylabel("ms per decoded token")
    split.set_title("where a decode step's time goes")
    split.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
