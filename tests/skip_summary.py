"""One line per reason for the tests that were skipped, instead of one line per test."""

from collections import Counter


def skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def skip_summary_lines(skipped_reports) -> list[str]:
    """'N skipped: reason' for each distinct reason, most frequent first."""
    counts = Counter(skip_reason(report) for report in skipped_reports)
    return [f"{count:>4} skipped: {reason}" for reason, count in counts.most_common()]
