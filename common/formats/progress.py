"""A progress bar for large files written (shards) or read (verified): on a terminal, or a line per quarter in a log."""

import sys


class Progress:
    """`\r[#####.....] 45% shard 2/4` on a terminal; into a log (a large model only) a line
    per quarter, so the log does not fill with carriage returns."""

    WIDTH = 30
    LOG_STEP = 25  # percent

    def __init__(self, total_bytes: int, enabled: bool, min_bytes: int, log_line: str = "shard: {percent}% written ({label})"):
        """Shown on a terminal, or in a log when more than `min_bytes` are written (or read:
        `log_line` says which, with {percent} and {label} filled in)."""
        self.min_bytes = min_bytes
        self.log_line = log_line
        self.total = max(total_bytes, 1)
        self.terminal = sys.stderr.isatty()
        self.enabled = enabled and (self.terminal or total_bytes > self.min_bytes)
        self.done, self.label, self.shown = 0, "", None

    def advance(self, n_bytes: int) -> None:
        self.done += n_bytes
        percent = min(100, self.done * 100 // self.total)
        # What the reader sees changes with each percent and label on a terminal, each quarter in a log.
        seen = (percent, self.label) if self.terminal else percent // self.LOG_STEP
        if not self.enabled or seen == self.shown:
            return
        if self.terminal:
            filled = percent * self.WIDTH // 100
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {percent:3d}% {self.label}")
        else:
            sys.stderr.write(self.log_line.format(percent=percent, label=self.label) + "\n")
        sys.stderr.flush()
        self.shown = seen

    def finish(self) -> None:
        if self.enabled and self.terminal and self.shown is not None:
            sys.stderr.write("\n")
            sys.stderr.flush()
