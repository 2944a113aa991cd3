"""Recovery gaps of issue 12.9: a worker killed while the cluster starts (before it listens, or
before the handshake) is started again; a replacement killed while it starts costs one attempt,
not the run; the run folder of a coordinator killed by kill -9 is removed by the next one."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cli_runner import run_llmtp
from llmtp.common.formats.checkpoint import load_checkpoint
from llmtp.common.formats.shard_file import write_shards
from llmtp.common.model.transformer import StepSequence
from llmtp.coordinator import local_cluster
from llmtp.coordinator.local_engine import LocalEngine
from llmtp.coordinator.recovery import RecoveringEngine
from llmtp.coordinator.run_folders import OWNER_NAME, PREFIX
from process_tools import wait_until_gone

TOKENS = np.array([1, 403, 407, 261, 378])


@pytest.fixture(scope="module")
def shards(stories260k, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stories-2w")
    write_shards(load_checkpoint(stories260k["model"]), 2, folder, progress=False)
    return folder


@pytest.fixture(scope="module")
def reference(stories260k):
    checkpoint = load_checkpoint(stories260k["model"])
    local = LocalEngine(checkpoint.config, checkpoint.weights)
    return [local.step(TOKENS, [StepSequence(0, 0, 5)]), local.step(np.array([432]), [StepSequence(0, 5, 1)])]


def assert_exact(engine, reference):
    np.testing.assert_allclose(engine.step(TOKENS, [StepSequence(0, 0, 5)]), reference[0], atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(engine.step(np.array([432]), [StepSequence(0, 5, 1)]), reference[1],
                               atol=1e-5, rtol=1e-6)


def kill_and_reap(process) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(10)


@pytest.fixture
def kill_next_launches(monkeypatch):
    """kill(index, times): the next `times` launches of worker `index` are killed at once."""
    real_launch = local_cluster.launch_worker
    pending: dict[int, int] = {}

    def launch(shard_path, index, *args, **kwargs):
        process = real_launch(shard_path, index, *args, **kwargs)
        if pending.get(index):
            pending[index] -= 1
            kill_and_reap(process)
        return process
    monkeypatch.setattr(local_cluster, "launch_worker", launch)
    return lambda index, times=1: pending.__setitem__(index, times)


def test_a_worker_killed_before_it_listens_is_started_again(shards, reference, kill_next_launches, capfd):
    kill_next_launches(1)
    engine = local_cluster.open_local_engine(shards, 2)
    try:
        assert_exact(engine, reference)
    finally:
        engine.close()
    assert "worker 1 was killed (signal 9) while starting" in capfd.readouterr().err


def test_a_worker_killed_before_the_handshake_is_started_again(shards, reference, monkeypatch, capfd):
    real_start = local_cluster.start_workers

    def start_then_kill(*args, **kwargs):
        started = real_start(*args, **kwargs)
        kill_and_reap(started[0].process)
        return started
    monkeypatch.setattr(local_cluster, "start_workers", start_then_kill)
    engine = local_cluster.open_local_engine(shards, 2)
    try:
        assert_exact(engine, reference)
    finally:
        engine.close()
    assert "starting it again (attempt 2 of 3)" in capfd.readouterr().err


def test_a_worker_that_keeps_dying_while_starting_is_given_up_on(shards, kill_next_launches, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    kill_next_launches(0, times=10)
    with pytest.raises(local_cluster.WorkerError, match="worker 0 exited with code -9 while starting"):
        local_cluster.open_local_engine(shards, 2)
    assert list(tmp_path.iterdir()) == []  # no run folder left behind


def test_a_replacement_killed_while_it_starts_costs_one_attempt(shards, reference, kill_next_launches):
    engine = RecoveringEngine(local_cluster.open_local_engine(shards, 2), wait_seconds=30)
    try:
        engine.step(TOKENS, [StepSequence(0, 0, 5)])
        kill_next_launches(0)  # the first replacement of worker 0 dies too
        kill_and_reap(engine.engine.processes[0])
        np.testing.assert_allclose(engine.step(np.array([432]), [StepSequence(0, 5, 1)]), reference[1],
                                   atol=1e-5, rtol=1e-6)
        assert engine.recoveries == 2
    finally:
        engine.close()


def test_the_run_folder_of_a_killed_coordinator_is_removed_by_the_next(shards, stories260k, tmp_path):
    run_tmp = tmp_path / "tmp"
    run_tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(run_tmp))
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from llmtp.coordinator.local_cluster import open_local_engine
        engine = open_local_engine(Path({str(shards)!r}), 2)
        print(engine.run_folder, " ".join(str(p.pid) for p in engine.processes), flush=True)
        time.sleep(60)
    """)
    coordinator = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        folder, *worker_pids = coordinator.stdout.readline().split()
        kill_and_reap(coordinator)
        assert wait_until_gone([int(pid) for pid in worker_pids], timeout=10) == []
    finally:
        coordinator.kill()
        coordinator.wait()
    assert os.path.isdir(folder)
    # Another user's folder (its owner alive) and one that names no owner are left alone.
    alive = run_tmp / f"{PREFIX}alive"
    alive.mkdir()
    from llmtp.coordinator.cluster_state import process_start_time
    (alive / OWNER_NAME).write_text(f"{os.getpid()} {process_start_time(os.getpid())}")
    anonymous = run_tmp / f"{PREFIX}anonymous"
    anonymous.mkdir()
    result = run_llmtp("generate", stories260k["model"], "-z", stories260k["tokenizer"], "-w", 2, "-n", 8,
                       env_extra={"TMPDIR": str(run_tmp)})
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in run_tmp.iterdir()) == [alive.name, anonymous.name]
