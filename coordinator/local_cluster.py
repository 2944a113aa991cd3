"""Workers on this machine: shard into a cache folder once, start N worker processes,
connect, and stop them all afterwards (standing_cluster.py keeps them up for `llmtp cluster`).
Launching needs neither numpy nor zmq (the engine, local_cluster_engine.py, loads them), so
`generate --workers` starts its workers before its own imports."""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from llmtp.common.errors import ConfigError, WorkerError, WorkerLost
from llmtp.common.exchange.modes import choose_reduce_mode

START_TIMEOUT = 30.0  # seconds for a worker to bind, plus time to read its shard at SLOWEST_DISK
SLOWEST_DISK = 100e6  # bytes/s: a worker reads its whole shard (huge pages, sha256) before it listens
STOP_TIMEOUT = 3.0  # seconds between each stage of shutdown: ask, terminate, kill
START_ATTEMPTS = 3  # launches of one worker while a cluster starts (a killed one is started again)
ANNOUNCE_POLL = 0.005  # seconds between looks for a worker's endpoint file: the first token waits on it


def cache_dir() -> Path:
    return Path(os.environ.get("LLMTP_CACHE_DIR") or Path.home() / ".cache" / "llmtp")


def shard_cache_folder(checkpoint_path: Path, n_workers: int) -> Path:
    """One folder per (checkpoint file version, worker count): a changed file reshards."""
    files = sorted(p for p in checkpoint_path.iterdir() if p.is_file()) if checkpoint_path.is_dir() else [checkpoint_path]
    identity = "|".join(f"{p.resolve()}|{p.stat().st_size}|{p.stat().st_mtime_ns}" for p in files)
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return cache_dir() / "shards" / f"{checkpoint_path.stem}-{key}-{n_workers}w"


def ensure_shards(checkpoint_path: Path, n_workers: int) -> Path:
    """The shard folder for this checkpoint and worker count, writing it on first use.
    Only then is the checkpoint itself opened."""
    if not checkpoint_path.exists():
        raise ConfigError(f"{checkpoint_path}: no such checkpoint file or model folder")
    folder = shard_cache_folder(checkpoint_path, n_workers)
    if (folder / "manifest.json").exists():
        return folder
    from llmtp.common.formats.load import load_model
    from llmtp.common.formats.shard_file import write_shards
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        write_shards(load_model(checkpoint_path), n_workers, staging)
        try:
            staging.rename(folder)
        except OSError:  # another process finished the same shards first
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        list(range(os.cpu_count() or 1))


def blas_threads_env(n_workers: int, cores_per_worker: int | None = None) -> dict:
    """Give each worker its share of the cores (or exactly cores_per_worker), so N workers
    never oversubscribe."""
    threads = str(cores_per_worker or max(1, len(usable_cpus()) // n_workers))
    env = dict(os.environ)
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = threads
    return env


def check_cores_per_worker(n_workers: int, cores_per_worker: int | None) -> None:
    if cores_per_worker is None:
        return
    available = len(usable_cpus())
    if cores_per_worker < 1 or n_workers * cores_per_worker > available:
        raise ConfigError(f"--cores-per-worker {cores_per_worker} x {n_workers} worker(s) does not fit "
                          f"the {available} core(s) this process may use")


def cpu_share(index: int, n_workers: int, cores_per_worker: int | None = None) -> list[int] | None:
    """The cores worker `index` is pinned to: its own contiguous share when every worker can
    have at least one (pinned, two workers' memory-bound half-layers finish more evenly and
    each sync waits less: 110M decode at 2 workers 26.8 -> 25.0 ms/token); None otherwise.

    cores_per_worker pins even a single worker, to exactly that many cores (the scaling
    benchmark's one worker per core)."""
    cpus = usable_cpus()
    if cores_per_worker is not None:
        check_cores_per_worker(n_workers, cores_per_worker)
        return cpus[index * cores_per_worker:(index + 1) * cores_per_worker]
    if n_workers < 2 or n_workers > len(cpus):
        return None
    per_worker = len(cpus) // n_workers
    return cpus[index * per_worker:(index + 1) * per_worker]


SECRET_NAME = "cluster.secret"  # in the run folder (0700): the HELLO secret of unkeyed local workers


def cluster_secret(run_folder: Path) -> str:
    """The run folder's cluster secret, made on first use; only this user can read it, so only
    the launcher and its coordinators can open a session on its workers."""
    import secrets
    path = run_folder / SECRET_NAME
    if not path.exists():
        run_folder.mkdir(parents=True, exist_ok=True)
        os.chmod(run_folder, 0o700)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32))
    return path.read_text().strip()


@dataclass
class StartedWorker:
    process: subprocess.Popen
    endpoint: str


def start_workers(shard_folder: Path, n_workers: int, run_folder: Path, tied_to_us: bool,
                  host: str = "127.0.0.1", cores_per_worker: int | None = None,
                  secret: bool = False, context: int | None = None,
                  launched: list[subprocess.Popen] | None = None) -> list[StartedWorker]:
    """Start one worker per shard on an ephemeral port and wait for each to announce it
    (launched: the processes launch_workers started already with the same arguments).

    tied_to_us: the workers exit when this process does (one `generate`); otherwise they
    are detached daemons (`cluster up`) that log into run_folder. secret: every HELLO must
    carry the run folder's cluster_secret."""
    from llmtp.common.formats.manifest import load_manifest
    manifest = load_manifest(shard_folder)
    run_folder.mkdir(parents=True, exist_ok=True)
    processes: list[subprocess.Popen] = []

    def launch(index: int) -> subprocess.Popen:
        return launch_worker(shard_folder / manifest.shards[index].file, index, n_workers, run_folder, tied_to_us,
                             host, cores_per_worker, secret, context)
    try:
        if launched is not None:
            processes += launched
        else:
            processes += [launch(index) for index in range(len(manifest.shards))]
        started = []
        for index in range(len(processes)):
            shard_bytes = manifest.shards[index].n_bytes
            for attempt in range(2, START_ATTEMPTS + 2):
                try:
                    endpoint = wait_for_announce(announce_path(run_folder, index), processes[index], index,
                                                 time.monotonic() + start_timeout(shard_bytes))
                    break
                except WorkerLost:
                    # Killed (a signal, not an exit code that says why): start it again.
                    returncode = processes[index].returncode
                    if returncode is None or returncode >= 0 or attempt > START_ATTEMPTS:
                        raise
                    print(f"llmtp: worker {index} was killed (signal {-returncode}) while starting; starting it "
                          f"again (attempt {attempt} of {START_ATTEMPTS})", file=sys.stderr, flush=True)
                    processes[index] = launch(index)
            started.append(StartedWorker(processes[index], endpoint))
        return started
    except BaseException:
        stop_processes(processes)
        raise


def launch_workers(shard_folder: Path, n_workers: int, run_folder: Path, **options) -> list[subprocess.Popen]:
    """One worker per shard, started without waiting (start_workers(launched=...) waits)."""
    from llmtp.common.formats.manifest import load_manifest
    manifest = load_manifest(shard_folder)
    run_folder.mkdir(parents=True, exist_ok=True)
    processes: list[subprocess.Popen] = []
    try:
        for index, shard in enumerate(manifest.shards):
            processes.append(launch_worker(shard_folder / shard.file, index, n_workers, run_folder, **options))
    except BaseException:
        stop_processes(processes)
        raise
    return processes


class EarlyWorkers:
    """The workers of open_local_engine, launched ahead of it: their interpreters start and
    import (a few hundred ms on a busy machine) while this process still reads the tokenizer
    and the embedding. Whoever launches them must open_local_engine(early=...) or discard()."""

    def __init__(self, shard_folder: Path, n_workers: int, context: int | None = None):
        self.shard_folder, self.n_workers, self.context = shard_folder, n_workers, context
        self.run_folder: Path | None = None
        self.processes: list[subprocess.Popen] | None = None

    def launch(self) -> None:
        if self.processes is not None:
            return
        from .run_folders import make_run_folder
        self.run_folder = make_run_folder()
        try:
            self.processes = launch_workers(self.shard_folder, self.n_workers, self.run_folder, tied_to_us=True,
                                            secret=True, context=self.context)
        except BaseException:
            shutil.rmtree(self.run_folder, ignore_errors=True)
            self.run_folder = None
            raise

    def take(self) -> tuple[Path, list[subprocess.Popen]] | None:
        """(run folder, processes) once, if launched; from then on they are the engine's."""
        if self.processes is None:
            return None
        taken = (self.run_folder, self.processes)
        self.run_folder = self.processes = None
        return taken

    def discard(self) -> None:
        taken = self.take()
        if taken:
            stop_processes(taken[1])
            shutil.rmtree(taken[0], ignore_errors=True)


def announce_path(run_folder: Path, index: int) -> Path:
    return run_folder / f"worker-{index}.endpoint"


def launch_worker(shard_path: Path, index: int, n_workers: int, run_folder: Path, tied_to_us: bool,
                  host: str = "127.0.0.1", cores_per_worker: int | None = None,
                  secret: bool = False, context: int | None = None) -> subprocess.Popen:
    """Start one worker process (without waiting for it to listen). context: run that many
    positions instead of the model's seq_len."""
    announce = announce_path(run_folder, index)
    announce.unlink(missing_ok=True)
    command = [sys.executable, "-m", "llmtp.worker", "--shard", str(shard_path), "--bind", f"tcp://{host}:*",
               "--announce", str(announce)]
    if secret:
        cluster_secret(run_folder)
        command += ["--secret-file", str(run_folder / SECRET_NAME)]
    if context is not None:
        command += ["--context", str(context)]
    cpus = cpu_share(index, n_workers, cores_per_worker)
    if cpus:
        command += ["--cpus", ",".join(map(str, cpus))]
    log = None
    if tied_to_us:
        command += ["--parent-pid", str(os.getpid())]
    else:
        log = open(run_folder / f"worker-{index}.log", "ab")
    try:
        # A session of its own: Ctrl-C in the terminal reaches the coordinator only, which
        # then stops the workers in order.
        return subprocess.Popen(command, env=blas_threads_env(n_workers, cores_per_worker), stdin=subprocess.DEVNULL,
                                stdout=log or subprocess.DEVNULL, stderr=log, start_new_session=True)
    finally:
        if log:
            log.close()


def start_timeout(shard_bytes: int) -> float:
    return START_TIMEOUT + shard_bytes / SLOWEST_DISK


def wait_for_announce(path: Path, process: subprocess.Popen, index: int, deadline: float) -> str:
    started = time.monotonic()
    while not path.exists():
        if process.poll() is not None:
            raise WorkerLost(index, f"worker {index} exited with code {process.returncode} while starting")
        if time.monotonic() > deadline:
            raise WorkerLost(index, f"worker {index} did not start within {deadline - started:.0f} s")
        time.sleep(ANNOUNCE_POLL)
    return path.read_text().strip()


def stop_processes(processes: list) -> None:
    """Staged: they were asked already (SHUTDOWN); wait, then SIGTERM, then SIGKILL."""
    for stage in ("wait", "terminate", "kill"):
        alive = [p for p in processes if p.poll() is None]
        if not alive:
            return
        for process in alive:
            if stage == "terminate":
                process.terminate()
            elif stage == "kill":
                process.kill()
        deadline = time.monotonic() + STOP_TIMEOUT
        for process in alive:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass


def open_local_engine(shard_folder: Path, n_workers: int, n_slots: int = 1, timeout: float = 30.0,
                      reduce: str | None = None, cores_per_worker: int | None = None, context: int | None = None,
                      early: EarlyWorkers | None = None):
    """Start workers for a shard folder and connect to them; close() stops them.
    context: run that many positions (memory.with_context) instead of the model's seq_len.
    early: workers already launched for this folder, count and context (default cores).

    cores_per_worker: pin each worker to that many cores with as many BLAS threads
    (default: the cores shared out evenly, a lone worker unpinned)."""
    check_cores_per_worker(n_workers, cores_per_worker)
    from llmtp.common.formats.manifest import load_manifest
    from llmtp.common.formats.shard_file import load_embedding
    from llmtp.common.model.memory import with_context
    manifest = load_manifest(shard_folder)
    config = with_context(manifest.config, context, str(shard_folder))
    taken = early.take() if early is not None else None
    try:
        embedding = load_embedding(manifest)  # verified before any worker or run folder exists (unless early)
    except BaseException:
        if taken:
            stop_processes(taken[1])
            shutil.rmtree(taken[0], ignore_errors=True)
        raise
    from .run_folders import make_run_folder
    run_folder, launched = taken or (make_run_folder(), None)
    try:
        started = start_workers(shard_folder, n_workers, run_folder, tied_to_us=True,
                                cores_per_worker=cores_per_worker, secret=True, context=context, launched=launched)
    except BaseException:
        shutil.rmtree(run_folder, ignore_errors=True)
        raise
    from .local_cluster_engine import LocalClusterEngine
    return LocalClusterEngine(config, embedding, [w.endpoint for w in started],
                              manifest.source_sha256, n_slots=n_slots, timeout=timeout,
                              processes=[w.process for w in started], shard_folder=shard_folder,
                              run_folder=run_folder, secret=cluster_secret(run_folder),
                              reduce=choose_reduce_mode(n_workers, reduce, local=True),
                              cores_per_worker=cores_per_worker, context_length=context)
