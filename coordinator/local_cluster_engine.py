"""The engine of a local cluster: a ClusterEngine that owns its worker processes (launched by
local_cluster.py), restarts lost ones and stops them on close. Apart from local_cluster so that
launching workers needs neither numpy nor zmq: `generate --workers` starts them first."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

from llmtp.common.errors import WorkerLost

from . import local_cluster as launching  # looked up at each call: tests replace its functions
from .cluster_engine import ClusterEngine


class LocalClusterEngine(ClusterEngine):
    """A ClusterEngine that owns its worker processes, restarts lost ones and stops them on close."""

    def __init__(self, config, embedding, endpoints, model_sha256: str, *, shard_folder: Path, run_folder: Path,
                 processes: list, cores_per_worker: int | None = None, context_length: int | None = None, **kwargs):
        """A worker lost during the first handshake (killed as the cluster starts) is started
        again, up to START_ATTEMPTS times, as one lost mid-generation would be."""
        self.shard_folder = shard_folder
        self.context_length = context_length
        self.cores_per_worker = cores_per_worker
        self.run_folder = run_folder
        self.processes = list(processes)
        endpoints = list(endpoints)
        launches = dict.fromkeys(range(len(endpoints)), 1)
        try:
            while True:
                try:
                    super().__init__(config, embedding, endpoints, model_sha256, processes=self.processes, **kwargs)
                    return
                except WorkerLost as lost:
                    launches[lost.index] += 1
                    if launches[lost.index] > launching.START_ATTEMPTS:
                        raise
                    print(f"llmtp: {lost}; starting it again (attempt {launches[lost.index]} of "
                          f"{launching.START_ATTEMPTS})", file=sys.stderr, flush=True)
                    self.processes[lost.index], endpoints[lost.index] = self.restart(lost.index, len(endpoints))
        except BaseException:
            launching.stop_processes(list(self.processes))
            shutil.rmtree(run_folder, ignore_errors=True)
            raise

    def restart(self, index: int, n_workers: int) -> tuple[subprocess.Popen, str]:
        """Stop worker `index` (if it still runs) and start it again: (its process, its endpoint)."""
        from llmtp.common.formats.manifest import load_manifest
        shard = load_manifest(self.shard_folder).shards[index]
        launching.stop_processes([self.processes[index]])
        process = launching.launch_worker(self.shard_folder / shard.file, index, n_workers, self.run_folder,
                                          tied_to_us=True, cores_per_worker=self.cores_per_worker,
                                          secret=self.secret is not None, context=self.context_length)
        self.processes[index] = process
        return process, launching.wait_for_announce(launching.announce_path(self.run_folder, index), process, index,
                                                    time.monotonic() + launching.start_timeout(shard.n_bytes))

    def recover(self, wait_seconds: float, lost: set[int] = frozenset()) -> None:
        """Restart every worker that died or was reported lost (a hung one is killed first),
        then reconnect all of them in a new session. A replacement that dies while it starts is
        a WorkerLost too: RecoveringEngine spends another attempt on it."""
        for link in self.links:
            if link.index in lost or link.process.poll() is not None:
                link.process, link.endpoint = self.restart(link.index, len(self.links))
        super().recover(wait_seconds, lost)

    def close(self, shutdown_workers: bool = True) -> None:
        super().close(shutdown_workers=True)
        launching.stop_processes(list(self.processes))
        shutil.rmtree(self.run_folder, ignore_errors=True)
