"""`llmtp cluster up`: detached local workers that outlive the command, described by a state file
(cluster_state.py), used by one `generate --cluster` (or `serve --cluster`) at a time.

- One user at a time: a coordinator holds an flock on the run folder's session.lock while its
  engine is open; a second one is told at once who holds it (the kernel drops the lock when
  its holder dies, kill -9 included), instead of taking the workers' session over silently and
  stalling the first in a recovery.
- A worker that died is found from the state's pid and start time before any connection is
  tried, and restarted from what the state names (shard folder, run folder and its secret); the
  state file is rewritten with the new pid. While the engine is open every worker is watched
  through a pidfd, so a death mid-generation wakes the coordinator at once, which restarts it.
"""

import fcntl
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from llmtp.common.errors import ConfigError, LlmtpError, WorkerError
from llmtp.common.exchange.modes import choose_reduce_mode

from .cluster_engine import ClusterEngine
from .cluster_state import ClusterState, WorkerRecord, is_running, process_start_time, read_state, stop_workers, \
    write_state
from .local_cluster import (SECRET_NAME, STOP_TIMEOUT, announce_path, cache_dir, ensure_shards, launch_worker,
                            start_timeout, start_workers, wait_for_announce)

LOCK_NAME = "session.lock"  # in the run folder: held (flock) by the coordinator using the workers


class ClusterBusy(WorkerError):
    """Another coordinator has the cluster's workers."""


def state_path(explicit: str | None) -> Path:
    return Path(explicit) if explicit else cache_dir() / "cluster.json"


def cluster_up(checkpoint_path: Path, tokenizer_path: Path, n_workers: int, state_file: Path) -> ClusterState:
    """Shard if needed, start n_workers detached workers (pinned and threaded as `--workers N`'s
    are: launch_worker decides both), and write the state file."""
    if state_file.exists():
        old = read_state(state_file)
        if any(is_running(worker) for worker in old.workers):
            raise ConfigError(f"{state_file}: a cluster is already up; run `llmtp cluster down --state "
                              f"{state_file}` first")
        print(f"llmtp: notice: {state_file}: none of its workers is running; replacing it", file=sys.stderr)
    shard_folder = ensure_shards(checkpoint_path, n_workers)
    run_folder = state_file.parent / (state_file.stem + "-run")
    started = start_workers(shard_folder, n_workers, run_folder, tied_to_us=False, secret=True)
    state = ClusterState(checkpoint=checkpoint_path.resolve(), tokenizer=tokenizer_path.resolve(),
                         shards=shard_folder, run_folder=run_folder,
                         workers=tuple(record_of(w.process.pid, w.endpoint, index) for index, w in enumerate(started)))
    write_state(state_file, state)
    return state


def record_of(pid: int, endpoint: str, index: int) -> WorkerRecord:
    start_time = process_start_time(pid)
    if start_time is None:
        raise WorkerError(f"worker {index} (pid {pid}) exited right after it started; see its log")
    return WorkerRecord(pid=pid, start_time=start_time, endpoint=endpoint)


def cluster_down(state_file: Path) -> int:
    """Stop the workers the state file names that are still those very processes (SIGTERM, then
    SIGKILL), never another process that got a recorded pid; returns how many were running."""
    state = read_state(state_file)
    # Not under a running generate or serve: it would restart the workers from the state.
    lock = SessionLock(state_file, state, "stop it first") if state.run_folder.is_dir() else None
    try:
        stopped = stop_workers(state, STOP_TIMEOUT)
        state_file.unlink(missing_ok=True)  # the workers' logs stay in the run folder
    finally:
        if lock:
            lock.release()
    return stopped


def rerun_hint(state_file: Path, state: ClusterState) -> str:
    return (f"run `llmtp cluster down --state {state_file}` and `llmtp cluster up {state.checkpoint} "
            f"-z {state.tokenizer} -w {len(state.workers)} --state {state_file}`")


class SessionLock:
    """The run folder's session.lock, held with flock for as long as an engine uses the workers."""

    def __init__(self, state_file: Path, state: ClusterState,
                 when_busy: str = "wait for it to finish, or start another cluster with `llmtp cluster up --state "
                                  "OTHER.json`"):
        path = state.run_folder / LOCK_NAME
        try:
            self.descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as error:
            raise ConfigError(f"{state_file}: cannot open {path} ({error.strerror}); {rerun_hint(state_file, state)}") \
                from None
        try:
            fcntl.flock(self.descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.descriptor, 32, 0).decode(errors="replace").strip()
            os.close(self.descriptor)
            who = f"pid {holder}" if holder.isdigit() else "another process"
            raise ClusterBusy(f"{state_file}: the cluster is busy: llmtp {who} is using its workers; {when_busy}") \
                from None
        os.ftruncate(self.descriptor, 0)
        os.pwrite(self.descriptor, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self.descriptor is not None:
            os.close(self.descriptor)  # closing drops the flock
            self.descriptor = None


class RecordedProcess:
    """A worker `cluster up` started (so not our child): watched by its pid and start time.
    Offers what ClusterEngine asks of a subprocess.Popen: pid, poll(), returncode."""

    def __init__(self, record: WorkerRecord):
        self.record = record
        self.pid = record.pid
        self.returncode = None

    def poll(self):
        if self.returncode is None and not is_running(self.record):
            self.returncode = "unknown (not a child of this process)"
        return self.returncode


def restart_workers(state_file: Path, state: ClusterState, lost: set[int] = frozenset()) -> tuple[ClusterState, dict]:
    """Restart every worker of `state` that is not running, and those in `lost` (a hung one is
    stopped first); the state file is rewritten. Returns the new state and {index: Popen}."""
    hung = tuple(worker for index, worker in enumerate(state.workers) if index in lost and is_running(worker))
    if hung:
        stop_workers(replace(state, workers=hung), STOP_TIMEOUT)
    dead = [index for index, worker in enumerate(state.workers) if not is_running(worker)]
    if not dead:
        return state, {}
    try:
        current = read_state(state_file)
    except ConfigError:
        current = None
    if current != state:  # only a lock holder writes it: someone removed or replaced it by hand
        raise WorkerError(f"{state_file}: removed or replaced while in use; not restarting worker(s) "
                          f"{', '.join(map(str, dead))}")
    from llmtp.common.formats.manifest import load_manifest
    try:
        manifest = load_manifest(state.shards)
        shard_files = [state.shards / manifest.shards[index].file for index in dead]
        missing = next((path for path in shard_files if not path.is_file()), None)
        if missing or len(manifest.shards) != len(state.workers):
            raise ConfigError(f"{missing or state.shards} does not hold the shards of these workers")
    except LlmtpError as error:
        raise WorkerError(f"{state_file}: worker(s) {', '.join(map(str, dead))} not running and cannot be "
                          f"restarted ({error}); {rerun_hint(state_file, state)}") from None
    started = {index: launch_worker(path, index, len(state.workers), state.run_folder, tied_to_us=False, secret=True)
               for index, path in zip(dead, shard_files)}
    workers = list(state.workers)
    deadline = time.monotonic() + start_timeout(max(manifest.shards[index].n_bytes for index in dead))
    for index, process in started.items():
        endpoint = wait_for_announce(announce_path(state.run_folder, index), process, index, deadline)
        workers[index] = record_of(process.pid, endpoint, index)
        print(f"llmtp: worker {index} (pid {state.workers[index].pid}) was not running; restarted it as pid "
              f"{process.pid} (log: {state.run_folder / f'worker-{index}.log'})", file=sys.stderr, flush=True)
    state = replace(state, workers=tuple(workers))
    write_state(state_file, state)
    return state, started


def read_secret(state_file: Path, state: ClusterState) -> str:
    path = state.run_folder / SECRET_NAME
    try:
        return path.read_text().strip()
    except OSError as error:
        raise ConfigError(f"{state_file}: cannot read the cluster secret {path} ({error.strerror}); "
                          f"{rerun_hint(state_file, state)}") from None


class StandingClusterEngine(ClusterEngine):
    """A ClusterEngine on `cluster up`'s workers: holds the session lock, restarts lost workers
    from the state, and leaves the workers running on close."""

    def __init__(self, state_file: Path, n_slots: int = 1, timeout: float = 30.0):
        from llmtp.common.formats.manifest import load_manifest
        from llmtp.common.formats.shard_file import load_embedding
        self.state_file = state_file
        self.state = read_state(state_file)
        self.lock = SessionLock(state_file, self.state)
        try:
            secret = read_secret(state_file, self.state)
            self.state, restarted = restart_workers(state_file, self.state)
            manifest = load_manifest(self.state.shards)
            n_workers = len(self.state.workers)
            # Reduce chosen as for `--workers N`: these workers are on this machine too.
            super().__init__(manifest.config, load_embedding(self.state.shards),
                             [worker.endpoint for worker in self.state.workers], manifest.source_sha256,
                             n_slots=n_slots, timeout=timeout, processes=self.watched(restarted), secret=secret,
                             reduce=choose_reduce_mode(n_workers, None, local=True))
        except BaseException:
            self.lock.release()
            raise

    def watched(self, restarted: dict) -> list:
        return [restarted.get(index) or RecordedProcess(worker) for index, worker in enumerate(self.state.workers)]

    def recover(self, wait_seconds: float, lost: set[int] = frozenset()) -> None:
        self.state, restarted = restart_workers(self.state_file, self.state, lost)
        for link, process in zip(self.links, self.watched(restarted)):
            link.endpoint = self.state.workers[link.index].endpoint
            link.process = process
        super().recover(wait_seconds, lost)

    def close(self, shutdown_workers: bool = False) -> None:
        try:
            super().close(shutdown_workers=False)  # BYE: the workers stay up for the next generate
        finally:
            self.lock.release()
