"""`llmtp cluster` state files read without trust (issue 12.5, 12.8): a stale or edited file never
makes `cluster down` signal a process llmtp did not start, and every malformed file is one line."""

import json
import subprocess
import sys

import pytest

from llmtp.common.errors import ConfigError
from llmtp.coordinator.cluster_state import (ClusterState, WorkerRecord, is_running, process_start_time, read_state,
                                             stop_workers, write_state)


@pytest.fixture
def bystander():
    """An unrelated process whose command line says "worker", as the old check looked for."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "llmtp.worker"])
    yield process
    process.kill()
    process.wait()


def state_with(*workers: WorkerRecord, tmp_path) -> ClusterState:
    return ClusterState(checkpoint=tmp_path / "m.bin", tokenizer=tmp_path / "t.bin", shards=tmp_path / "s",
                        run_folder=tmp_path / "run", workers=workers)


def test_a_recycled_pid_is_not_signalled(bystander, tmp_path):
    start = process_start_time(bystander.pid)
    assert start is not None
    # The state file's worker had this pid once, but started at another time.
    stale = WorkerRecord(pid=bystander.pid, start_time=start + 1, endpoint="tcp://127.0.0.1:1")
    assert not is_running(stale)
    assert stop_workers(state_with(stale, tmp_path=tmp_path), stage_timeout=0.5) == 0
    assert bystander.poll() is None


def test_the_recorded_process_itself_is_stopped(bystander, tmp_path):
    record = WorkerRecord(pid=bystander.pid, start_time=process_start_time(bystander.pid),
                          endpoint="tcp://127.0.0.1:1")
    assert stop_workers(state_with(record, tmp_path=tmp_path), stage_timeout=5) == 1
    assert bystander.wait(timeout=5) is not None


def test_state_round_trips(tmp_path):
    state = state_with(WorkerRecord(pid=12, start_time=34, endpoint="tcp://127.0.0.1:5555"), tmp_path=tmp_path)
    write_state(tmp_path / "cluster.json", state)
    assert read_state(tmp_path / "cluster.json") == state
    assert [p.name for p in tmp_path.iterdir()] == ["cluster.json"]  # no temporary left behind


GOOD = {"version": 1, "checkpoint": "/m.bin", "tokenizer": "/t.bin", "shards": "/s", "run_folder": "/r",
        "workers": [{"pid": 12, "start_time": 34, "endpoint": "tcp://127.0.0.1:5555"}]}


def edited(**changes):
    data = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if key.startswith("w_"):
            data["workers"][0][key[2:]] = value
        elif value is KeyError:
            del data[key]
        else:
            data[key] = value
    return json.dumps(data)


VARIANTS = {
    "not json": ("{pid: 1", "unreadable"),
    "a list": ("[1, 2]", "not a JSON object"),
    "null": ("null", "not a JSON object"),
    "no workers": (edited(workers=KeyError), "missing ['workers']"),
    "extra key": (edited(colour="red"), "unknown ['colour']"),
    "workers a map": (edited(workers={"pid": 1}), "'workers' is not a non-empty list"),
    "workers empty": (edited(workers=[]), "'workers' is not a non-empty list"),
    "worker a string": (edited(workers=["tcp://x"]), "workers[0] is not a JSON object"),
    "pid a string": (edited(w_pid="12"), "pid '12'"),
    "pid a bool": (edited(w_pid=True), "pid True"),
    "pid negative": (edited(w_pid=-1), "pid -1"),
    "pid huge": (edited(w_pid=2 ** 70), "pid"),
    "endpoint a number": (edited(w_endpoint=5555), "endpoint 5555"),
    "endpoint not zmq": (edited(w_endpoint="http://x"), "endpoint 'http://x'"),
    "shards null": (edited(shards=None), "shards None"),
    "old version": (edited(version=0), "version 0"),
    "deep nesting": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_edited_state_is_one_line(name, tmp_path):
    text, fragment = VARIANTS[name]
    path = tmp_path / "cluster.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        read_state(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and fragment in message, message


def test_missing_state_says_no_cluster_is_up(tmp_path):
    with pytest.raises(ConfigError, match="no cluster is up"):
        read_state(tmp_path / "cluster.json")
