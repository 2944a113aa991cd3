"""Looking at processes through /proc: children, liveness, mappings."""

import os
import time


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return found


def is_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until_gone(pids, timeout: float) -> list[int]:
    """The pids still alive after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if is_alive(pid)]
        if not alive:
            return []
        time.sleep(0.05)
    return [pid for pid in pids if is_alive(pid)]


def worker_children_of(pid: int) -> list[int]:
    """The llmtp worker processes among pid's children (not, e.g., multiprocessing's resource tracker)."""
    workers = []
    for child in children_of(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as handle:
                if b"-m\x00llmtp.worker" in handle.read():
                    workers.append(child)
        except OSError:
            pass
    return workers


def wait_for_file(path, process, deadline: float) -> None:
    """Until `process` writes `path` (a worker's --announce), with a deadline."""
    while not path.exists():
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:4]} exited with {process.returncode} before writing {path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} not written in time")
        time.sleep(0.05)
