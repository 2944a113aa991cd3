"""`llmtp cluster up / down` and `generate --cluster` through the typed state file (issues 12.5,
12.8, 13.4, 13.5): down signals only the processes up started, edited state files are one line,
two generates never share the workers silently, and a dead worker is restarted at once."""

import json
import os
import signal
import subprocess
import sys

import pytest

from cli_runner import llmtp_command, run_llmtp
from llmtp.coordinator.cluster_state import process_start_time, read_state
from process_tools import wait_until_gone

PROMPT = "Once upon a time"


@pytest.fixture
def bystander():
    """An unrelated live process whose command line says "worker", as the old check looked for."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "llmtp.worker"])
    yield process
    process.kill()
    process.wait()


def write_state_naming(path, pid: int, start_time: int, tmp_path) -> None:
    path.write_text(json.dumps({
        "version": 1, "checkpoint": str(tmp_path / "m.bin"), "tokenizer": str(tmp_path / "t.bin"),
        "shards": str(tmp_path / "shards"), "run_folder": str(tmp_path / "run"),
        "workers": [{"pid": pid, "start_time": start_time, "endpoint": "tcp://127.0.0.1:1"}]}))


def test_down_leaves_an_unrelated_process_of_a_stale_state_alone(bystander, tmp_path):
    state = tmp_path / "cluster.json"
    # Stale: the pid now belongs to another process (its start time differs from the recorded one).
    write_state_naming(state, bystander.pid, process_start_time(bystander.pid) + 7, tmp_path)
    down = run_llmtp("cluster", "down", "--state", state, timeout=60)
    assert down.returncode == 0, down.stderr
    assert "stopped 0 worker(s)" in down.stdout
    assert bystander.poll() is None
    assert not state.exists()


EDITED = {
    "not json": "{pid: 1",
    "a list": "[1, 2]",
    "workers a map": json.dumps({"version": 1, "checkpoint": "/m", "tokenizer": "/t", "shards": "/s",
                                 "run_folder": "/r", "workers": {"pid": 1}}),
    "pid a string": json.dumps({"version": 1, "checkpoint": "/m", "tokenizer": "/t", "shards": "/s",
                                "run_folder": "/r", "workers": [{"pid": "1", "start_time": 1,
                                                                 "endpoint": "tcp://127.0.0.1:1"}]}),
    "worker without pid": json.dumps({"version": 1, "checkpoint": "/m", "tokenizer": "/t", "shards": "/s",
                                      "run_folder": "/r", "workers": [{"endpoint": "tcp://127.0.0.1:1"}]}),
    "old format": json.dumps({"tokenizer": "/t", "shards": "/s", "workers": [{"pid": 1, "endpoint": "x"}]}),
}


@pytest.mark.parametrize("name", EDITED)
@pytest.mark.parametrize("command", [("cluster", "down", "--state"), ("generate", "--cluster")])
def test_edited_state_is_one_line_exit_2(name, command, tmp_path):
    state = tmp_path / "cluster.json"
    state.write_text(EDITED[name])
    result = run_llmtp(*command, state, "-n", 2, timeout=60) if command[0] == "generate" else \
        run_llmtp(*command, state, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(state) in lines[0] and "Traceback" not in result.stderr, result.stderr


@pytest.fixture
def cluster_up(stories260k, tmp_path):
    """A `cluster up` of stories260K on 2 workers; always brought down."""
    state = tmp_path / "cluster.json"
    up = run_llmtp("cluster", "up", stories260k["model"], "-z", stories260k["tokenizer"], "--workers", 2,
                   "--state", state)
    assert up.returncode == 0, up.stderr
    try:
        yield state
    finally:
        pids = [w.pid for w in read_state(state).workers] if state.exists() else []
        run_llmtp("cluster", "down", "--state", state)
        assert wait_until_gone(pids, timeout=10) == []


@pytest.fixture
def expected_text(stories260k):
    def text(steps: int) -> str:
        return run_llmtp("generate", stories260k["model"], "-z", stories260k["tokenizer"], "-t", 0,
                         "-n", steps, "-i", PROMPT).stdout
    return text


def test_state_records_each_worker_by_pid_and_start_time(cluster_up):
    state = read_state(cluster_up)
    assert len(state.workers) == 2
    assert all(process_start_time(w.pid) == w.start_time for w in state.workers)


def test_a_second_generate_is_told_at_once_that_the_cluster_is_busy(cluster_up, expected_text):
    first = subprocess.Popen(llmtp_command() + ["generate", "--cluster", str(cluster_up), "-t", "0", "-n", "512",
                                                "-i", PROMPT],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        head = first.stdout.read(len(PROMPT) + 5)  # the first holds its session: it is generating
        second = run_llmtp("generate", "--cluster", cluster_up, "-t", 0, "-n", 20, "-i", PROMPT, timeout=60)
        assert second.returncode == 2, second.stderr
        assert "busy" in second.stderr and f"pid {first.pid}" in second.stderr, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        rest = first.stdout.read()  # not communicate(): it would skip what the text wrapper buffered
        stderr = first.stderr.read()
        first.wait(60)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == 0, stderr
    assert "recovering" not in stderr and "lost" not in stderr, stderr
    assert head + rest == expected_text(512)


def test_a_dead_worker_is_restarted_at_once(cluster_up, expected_text):
    before = read_state(cluster_up)
    os.kill(before.workers[1].pid, signal.SIGKILL)
    assert wait_until_gone([before.workers[1].pid], timeout=10) == []
    # A 120 s reply timeout: were the dead worker waited for, the run would hit the deadline below.
    result = run_llmtp("generate", "--cluster", cluster_up, "-t", 0, "-n", 40, "-i", PROMPT, "--timeout", 120,
                       timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_text(40)
    assert "worker 1" in result.stderr and "restarted" in result.stderr, result.stderr
    after = read_state(cluster_up)
    assert after.workers[0] == before.workers[0]
    assert after.workers[1] != before.workers[1]
    assert process_start_time(after.workers[1].pid) == after.workers[1].start_time


def test_workers_never_started_are_started_without_waiting(cluster_up, expected_text):
    before = read_state(cluster_up)
    for worker in before.workers:
        os.kill(worker.pid, signal.SIGKILL)
    assert wait_until_gone([w.pid for w in before.workers], timeout=10) == []
    result = run_llmtp("generate", "--cluster", cluster_up, "-t", 0, "-n", 40, "-i", PROMPT, "--timeout", 120,
                       timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_text(40)
    assert all(process_start_time(w.pid) == w.start_time for w in read_state(cluster_up).workers)


def test_a_worker_killed_mid_generation_is_restarted_from_the_state(cluster_up, expected_text):
    first = subprocess.Popen(llmtp_command() + ["generate", "--cluster", str(cluster_up), "-t", "0", "-n", "512",
                                                "-i", PROMPT],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        head = first.stdout.read(len(PROMPT) + 5)
        os.kill(read_state(cluster_up).workers[0].pid, signal.SIGKILL)
        rest = first.stdout.read()  # not communicate(): it would skip what the text wrapper buffered
        stderr = first.stderr.read()
        first.wait(60)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == 0, stderr
    assert "recovering" in stderr, stderr
    assert head + rest == expected_text(512)
    assert all(process_start_time(w.pid) == w.start_time for w in read_state(cluster_up).workers)



def test_cluster_up_places_and_sums_as_workers_n_does(cluster_up):
    """Issue 13.6: `cluster up` decoded at half the speed of `--workers 2` (its workers summed over
    ZeroMQ where --workers uses shared memory); now both pin and reduce alike."""
    from llmtp.common.exchange.modes import choose_reduce_mode
    from llmtp.coordinator.local_cluster import cpu_share, usable_cpus
    from llmtp.coordinator.standing_cluster import StandingClusterEngine
    for index, worker in enumerate(read_state(cluster_up).workers):
        assert sorted(os.sched_getaffinity(worker.pid)) == (cpu_share(index, 2) or usable_cpus())
    engine = StandingClusterEngine(cluster_up)
    try:
        assert engine.reduce_mode == choose_reduce_mode(2, None, local=True)
    finally:
        engine.close()


def test_down_refuses_while_a_generate_uses_the_workers(cluster_up, expected_text):
    first = subprocess.Popen(llmtp_command() + ["generate", "--cluster", str(cluster_up), "-t", "0", "-n", "512",
                                                "-i", PROMPT],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        head = first.stdout.read(len(PROMPT) + 5)
        down = run_llmtp("cluster", "down", "--state", cluster_up, timeout=60)
        assert down.returncode == 2 and "busy" in down.stderr and "stop it first" in down.stderr, down.stderr
        assert all(process_start_time(w.pid) == w.start_time for w in read_state(cluster_up).workers)
        rest = first.stdout.read()
        stderr = first.stderr.read()
        first.wait(60)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == 0, stderr
    assert head + rest == expected_text(512)
