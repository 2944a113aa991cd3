"""The private folder (/tmp/llmtp-run-*) of one coordinator's local workers: their announce
files and the cluster secret. The coordinator removes it when it closes; one killed by
kill -9 cannot, so each folder names its owner (pid and the kernel's start time of that
pid, as cluster_state.py names workers) and the next coordinator removes the folders whose
owner is gone. A folder whose owner is alive (another user of this machine) or that names
no owner is never touched."""

import os
import shutil
import tempfile
from pathlib import Path

from .cluster_state import process_start_time

PREFIX = "llmtp-run-"
OWNER_NAME = "owner"  # "PID START_TIME" of the coordinator that made the folder


def make_run_folder() -> Path:
    """A new 0700 folder in the temporary directory, its owner recorded; stale ones go first."""
    remove_stale_run_folders()
    folder = Path(tempfile.mkdtemp(prefix=PREFIX))
    partial = folder / f".{OWNER_NAME}.partial"
    partial.write_text(f"{os.getpid()} {process_start_time(os.getpid())}")
    os.replace(partial, folder / OWNER_NAME)
    return folder


def owner_is_gone(folder: Path) -> bool:
    """True only when the folder names an owner and that very process no longer runs."""
    try:
        pid, start_time = (int(field) for field in (folder / OWNER_NAME).read_text().split())
    except (OSError, ValueError):
        return False
    return process_start_time(pid) != start_time


def remove_stale_run_folders(parent: Path | None = None) -> list[Path]:
    """Remove this user's run folders whose owner died; returns them."""
    parent = Path(parent or tempfile.gettempdir())
    removed = []
    try:
        candidates = [path for path in parent.iterdir() if path.name.startswith(PREFIX)]
    except OSError:
        return removed
    for folder in candidates:
        try:
            if folder.is_symlink() or not folder.is_dir() or folder.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        if owner_is_gone(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
