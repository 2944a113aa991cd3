"""Losing a worker mid-generation: noticed at once, named, recovered, nothing lost."""

import os
import re
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from cli_runner import llmtp_command
from llmtp.common.formats.checkpoint import load_checkpoint
from llmtp.common.errors import WorkerError
from llmtp.common.formats.manifest import load_manifest
from llmtp.common.model.sampler import Sampler, SamplerConfig
from llmtp.common.formats.shard_file import load_embedding, write_shards
from llmtp.common.model.transformer import StepSequence
from llmtp.coordinator.cluster_engine import ClusterEngine, WorkerLost
from llmtp.coordinator.generate import generate
from llmtp.coordinator.local_cluster import launch_worker, open_local_engine, start_workers, stop_processes, \
    wait_for_announce
from llmtp.coordinator.recovery import RecoveringEngine
from process_tools import wait_until_gone, worker_children_of


def reference(stories260k, case):
    section = stories260k["reference"].read_text().split(f"## {case}")[1]
    ids = [int(t) for t in re.search(r"ALL_IDS: `([^`]*)`", section).group(1).split()]
    stdout = re.search(r"stdout:\n```\n(.*?)```", section, re.S).group(1)
    return ids, stdout


@pytest.fixture(scope="module")
def shards(stories260k, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stories-2w")
    write_shards(load_checkpoint(stories260k["model"]), 2, folder, progress=False)
    return folder


def test_local_worker_killed_mid_generation_is_restarted_and_text_is_unchanged(stories260k, shards):
    expected, _ = reference(stories260k, "s260_t1_p09_s133742")
    engine = RecoveringEngine(open_local_engine(shards, 2), wait_seconds=20, log=open(os.devnull, "w"))
    victim = engine.engine.processes[1].pid
    fed = []

    def kill_midway(token):
        fed.append(token)
        if len(fed) == 60:
            os.kill(victim, signal.SIGKILL)

    try:
        result = generate(engine, Sampler(SamplerConfig(temperature=1.0, topp=0.9, seed=133742)), [1], 256,
                          on_token=kill_midway)
        assert engine.recoveries == 1
        assert engine.engine.processes[1].pid != victim
        assert result.generated_ids == expected
    finally:
        engine.close()


def test_cli_survives_kill_9_of_a_worker(stories260k):
    _, expected_stdout = reference(stories260k, "s260_t1_p09_s133742")
    process = subprocess.Popen(llmtp_command() + ["generate", str(stories260k["model"]), "-z",
                                                  str(stories260k["tokenizer"]), "-t", "1.0", "-p", "0.9",
                                                  "-s", "133742", "-n", "256", "--workers", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        head = process.stdout.read(30)
        workers = worker_children_of(process.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        rest, stderr = read_to_end(process)
        assert process.returncode == 0, stderr
        assert head + rest == expected_stdout
        assert "worker 1" in stderr and "recovering" in stderr
    finally:
        process.kill()


def read_to_end(process, timeout=60):
    """The rest of stdout, then stderr (communicate() would skip what the text wrapper buffered)."""
    rest = process.stdout.read()
    stderr = process.stderr.read()
    process.wait(timeout)
    return rest, stderr


def remote_engine(folder, endpoints, timeout=10.0):
    """A coordinator that did not start its workers: it sees only their sockets, as on a LAN."""
    manifest = load_manifest(folder)
    return ClusterEngine(manifest.config, load_embedding(folder), endpoints, manifest.source_sha256,
                         timeout=timeout, liveness=2.0)


def test_remote_worker_loss_is_noticed_within_seconds_and_named(shards, tmp_path):
    started = start_workers(shards, 2, tmp_path, tied_to_us=True)
    engine = remote_engine(shards, [w.endpoint for w in started], timeout=60.0)
    try:
        engine.step(np.array([1, 403]), [StepSequence(0, 0, 2)])
        os.kill(started[1].process.pid, signal.SIGKILL)
        began = time.monotonic()
        with pytest.raises(WorkerLost, match=re.escape(started[1].endpoint)) as lost:
            for position in range(2, 40):
                engine.step(np.array([407]), [StepSequence(0, position, 1)])
        assert lost.value.index == 1
        assert time.monotonic() - began < 5
    finally:
        engine.close()
        stop_processes([w.process for w in started])


def test_remote_worker_that_comes_back_is_waited_for(stories260k, shards, tmp_path):
    """As with systemd restarting a worker on the same port: wait, rebuild, continue."""
    expected, _ = reference(stories260k, "s260_once_t0_n64")
    started = start_workers(shards, 2, tmp_path, tied_to_us=True)
    processes = [w.process for w in started]
    engine = RecoveringEngine(remote_engine(shards, [w.endpoint for w in started]), wait_seconds=20,
                              log=open(os.devnull, "w"))
    manifest = load_manifest(shards)

    def restart_later():
        time.sleep(1.5)  # the coordinator must wait for it
        port_endpoint = started[1].endpoint
        process = subprocess.Popen([*launch_command(shards / manifest.shards[1].file, port_endpoint)],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
        processes.append(process)

    fed = []

    def kill_midway(token):
        fed.append(token)
        if len(fed) == 20:
            os.kill(started[1].process.pid, signal.SIGKILL)
            threading.Thread(target=restart_later).start()

    try:
        result = generate(engine, Sampler(SamplerConfig(temperature=0.0)), [1, 403, 407, 261, 378], 64,
                          on_token=kill_midway)
        assert engine.recoveries == 1
        assert [403, 407, 261, 378] + result.generated_ids == expected
    finally:
        engine.close()
        stop_processes(processes)


def launch_command(shard_path, endpoint):
    import sys
    return [sys.executable, "-m", "llmtp.worker", "--shard", str(shard_path), "--bind", endpoint,
            "--parent-pid", str(os.getpid())]


def test_worker_that_never_comes_back_gives_a_clear_error_in_bounded_time(shards, tmp_path):
    started = start_workers(shards, 2, tmp_path, tied_to_us=True)
    engine = RecoveringEngine(remote_engine(shards, [w.endpoint for w in started], timeout=2.0),
                              wait_seconds=3, log=open(os.devnull, "w"))
    try:
        engine.step(np.array([1, 403]), [StepSequence(0, 0, 2)])
        os.kill(started[0].process.pid, signal.SIGKILL)
        began = time.monotonic()
        with pytest.raises(WorkerError, match=re.escape(started[0].endpoint)):
            for position in range(2, 40):
                engine.step(np.array([407]), [StepSequence(0, position, 1)])
        assert time.monotonic() - began < 30
    finally:
        engine.close()
        stop_processes([w.process for w in started])
