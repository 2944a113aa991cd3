from types import SimpleNamespace

from skip_summary import skip_summary_lines


def skipped(reason: str, line: int):
    return SimpleNamespace(longrepr=("tests/test_x.py", line, f"Skipped: {reason}"))


def test_skips_are_grouped_by_reason():
    reports = [skipped("shared/models is absent", line) for line in range(40)] + [skipped("needs root", 1),
                                                                                 skipped("needs root", 2)]
    assert skip_summary_lines(reports) == ["  40 skipped: shared/models is absent", "   2 skipped: needs root"]
    assert skip_summary_lines([]) == []
