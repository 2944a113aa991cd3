"""The state file of `llmtp cluster up`: which workers it started, read back without trusting it.

The file may be stale (workers died, pids recycled), hand-edited or another program's. A worker is
named by its pid *and* the kernel's start time of that pid (/proc/PID/stat field 22, clock ticks
since boot): a recycled pid has another start time, so `cluster down` never signals a process it
did not start."""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from llmtp.common.errors import ConfigError, FormatError
from llmtp.common.formats.bounded import read_bounded

STATE_VERSION = 1
MAX_STATE_BYTES = 1024 * 1024  # a state file lists a few paths and one line per worker
FIELDS = ("version", "checkpoint", "tokenizer", "shards", "run_folder", "workers")
WORKER_FIELDS = ("pid", "start_time", "endpoint")


@dataclass(frozen=True)
class WorkerRecord:
    pid: int
    start_time: int  # /proc/PID/stat starttime when the worker was started
    endpoint: str


@dataclass(frozen=True)
class ClusterState:
    checkpoint: Path
    tokenizer: Path
    shards: Path
    run_folder: Path
    workers: tuple[WorkerRecord, ...]

    def to_dict(self) -> dict:
        return {"version": STATE_VERSION, "checkpoint": str(self.checkpoint), "tokenizer": str(self.tokenizer),
                "shards": str(self.shards), "run_folder": str(self.run_folder),
                "workers": [{"pid": w.pid, "start_time": w.start_time, "endpoint": w.endpoint}
                            for w in self.workers]}


def process_start_time(pid: int) -> int | None:
    """The start time of a live, non-zombie process `pid`, or None."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: the fields after it follow the last ')'.
    after_comm = stat[stat.rfind(")") + 2:].split()
    if not after_comm or after_comm[0] in ("Z", "X"):
        return None
    return int(after_comm[19])  # field 22 of the whole line


def is_running(worker: WorkerRecord) -> bool:
    """The very process the state file recorded is still alive."""
    return process_start_time(worker.pid) == worker.start_time


def write_state(path: Path, state: ClusterState) -> None:
    """Written under a temporary name and renamed: a reader sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(state.to_dict(), indent=2))
    os.replace(partial, path)


def read_state(path: Path) -> ClusterState:
    """The state file, every field checked by exact type; any problem is one ConfigError naming it."""
    try:
        data = read_bounded(path, MAX_STATE_BYTES, "cluster state")
    except FormatError as error:
        if not path.exists():
            raise ConfigError(f"{path}: no cluster is up (run `llmtp cluster up` first)") from None
        raise ConfigError(str(error)) from None
    try:
        state = json.loads(data)
    except (ValueError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error).splitlines()[0]
        raise ConfigError(f"{path}: unreadable cluster state ({reason}); is it a state file of "
                          f"`llmtp cluster up`?") from None
    where = f"{path}: cluster state"
    _exact_keys(state, FIELDS, where)
    if type(state["version"]) is not int or state["version"] != STATE_VERSION:
        raise ConfigError(f"{where}: version {state['version']!r} is not {STATE_VERSION} (written by another "
                          f"llmtp: stop its workers with that version, or by hand)")
    paths = {key: Path(_string(state, key, where)) for key in ("checkpoint", "tokenizer", "shards", "run_folder")}
    workers = state["workers"]
    if type(workers) is not list or not workers:
        raise ConfigError(f"{where}: 'workers' is not a non-empty list")
    records = []
    for index, worker in enumerate(workers):
        worker_where = f"{where}: workers[{index}]"
        _exact_keys(worker, WORKER_FIELDS, worker_where)
        for key in ("pid", "start_time"):
            value = worker[key]
            if type(value) is not int or not 0 < value < 2 ** 63:
                raise ConfigError(f"{worker_where}: {key} {value!r} is not a positive integer")
        endpoint = _string(worker, "endpoint", worker_where)
        if not endpoint.startswith(("tcp://", "ipc://")):
            raise ConfigError(f"{worker_where}: endpoint {endpoint!r} is not tcp://... or ipc://...")
        records.append(WorkerRecord(pid=worker["pid"], start_time=worker["start_time"], endpoint=endpoint))
    return ClusterState(workers=tuple(records), **paths)


def _exact_keys(data, keys: tuple[str, ...], where: str) -> None:
    if type(data) is not dict:
        raise ConfigError(f"{where} is not a JSON object")
    missing, unknown = set(keys) - set(data), set(data) - set(keys)
    if missing or unknown:
        raise ConfigError(f"{where}: missing {sorted(missing)}, unknown {sorted(unknown)}")


def _string(data: dict, key: str, where: str) -> str:
    value = data[key]
    if type(value) is not str or not value or "\x00" in value:
        raise ConfigError(f"{where}: {key} {value!r} is not a non-empty string")
    return value


def stop_workers(state: ClusterState, stage_timeout: float) -> int:
    """SIGTERM each recorded worker that is still that very process, SIGKILL what outlives
    `stage_timeout`; returns how many were running."""
    import signal
    import time
    running = [worker for worker in state.workers if is_running(worker)]
    for worker in running:
        _signal(worker, signal.SIGTERM)
    deadline = time.monotonic() + stage_timeout
    while any(is_running(worker) for worker in running) and time.monotonic() < deadline:
        time.sleep(0.05)
    for worker in running:
        _signal(worker, signal.SIGKILL)
    return len(running)


def _signal(worker: WorkerRecord, signum: int) -> None:
    # Checked again right before the signal: the window for a recycled pid is this one line.
    if is_running(worker):
        try:
            os.kill(worker.pid, signum)
        except ProcessLookupError:
            pass
