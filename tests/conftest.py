"""Make test helpers such as model_factory importable as top-level modules."""

import sys
from pathlib import Path

TESTS_DIR = str(Path(__file__).resolve().parent)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

import os
import tempfile

import pytest

# Shard caches and cluster state of the tests go to a throwaway folder, never ~/.cache.
os.environ.setdefault("LLMTP_CACHE_DIR", tempfile.mkdtemp(prefix="llmtp-test-cache-"))

SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"


@pytest.fixture(scope="session")
def stories260k():
    """Paths of the stories260K model and its tokenizers, or a skip when shared/ is absent."""
    folder = SHARED_MODELS / "stories260K"
    if not (folder / "stories260K.bin").exists():
        pytest.skip(f"{folder} is absent (the real test models live beside the project in shared/models)")
    return {"model": folder / "stories260K.bin", "tokenizer": folder / "tok512.bin",
            "sp_model": folder / "tok512.model", "reference": folder / "REFERENCE.md"}


@pytest.fixture(params=["vnni", "avx2", "portable", "numpy"])
def backend(request):
    """Each kernel backend in turn (common/kernels), skipped where this machine lacks it."""
    from llmtp.common import kernels
    if request.param not in kernels.available_backends():
        pytest.skip(f"kernel backend {request.param} not available here ({kernels.backend_info()})")
    previous = kernels.use_backend(request.param)
    yield request.param
    kernels.use_backend(previous)


@pytest.fixture(autouse=True, scope="session")
def no_orphan_workers():
    """Fail the run if any test left a worker process of ours behind (and clean it up)."""
    yield
    import signal
    from process_tools import wait_until_gone, worker_children_of
    leftovers = worker_children_of(os.getpid())
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    wait_until_gone(leftovers, timeout=5)
    assert not leftovers, f"worker processes outlived the tests: {leftovers}"


def pytest_terminal_summary(terminalreporter):
    """Skips grouped by reason (pyproject's -rfE leaves out pytest's line per skipped test)."""
    from skip_summary import skip_summary_lines
    lines = skip_summary_lines(terminalreporter.stats.get("skipped", []))
    if lines:
        terminalreporter.section("skipped tests, by reason", sep="-")
        for line in lines:
            terminalreporter.write_line(line)
