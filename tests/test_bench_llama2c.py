"""`llmtp bench --llama2c DIR`'s pieces that need no real run.c: the rate parser, the folder
check, and stopping a program's whole process group on a timeout."""

import os
import subprocess
import sys
import time

import pytest

from llmtp.common.errors import ConfigError
from llmtp.coordinator.bench.llama2c import find_programs, parse_achieved, run_program

RUN_C_STDERR = "Once upon a time, there was\nachieved tok/s: 52.734375\n"


def test_parses_run_c_rate_and_refuses_what_is_not_one():
    assert parse_achieved(RUN_C_STDERR) == pytest.approx(52.734375)
    assert parse_achieved("achieved tok/s: 3.0\nachieved tok/s: 4.5\n") == 4.5  # the last one
    assert parse_achieved("achieved tok/s: inf\n") is None  # a run shorter than run.c's clock
    assert parse_achieved("no rate here\n") is None


def test_a_folder_without_programs_is_one_line(tmp_path):
    (tmp_path / "run").write_text("not executable")
    with pytest.raises(ConfigError, match=r"no executable 'run' or 'runq'") as error:
        find_programs(tmp_path)
    assert "\n" not in str(error.value)
    runq = tmp_path / "runq"
    runq.write_text("#!/bin/sh\n")
    runq.chmod(0o755)
    assert list(find_programs(tmp_path)) == ["runq.c"]


def test_the_cli_exits_2_on_such_a_folder(tmp_path):
    done = subprocess.run([sys.executable, "-m", "llmtp.coordinator.cli", "bench", "--preset", "15M",
                           "--llama2c", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "no executable 'run' or 'runq'" in done.stderr and "Traceback" not in done.stderr


def test_a_timed_out_program_leaves_no_child(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = f"sleep 60 & echo $! > {pid_file}; wait"
    started = time.monotonic()
    assert run_program(["sh", "-c", script], dict(os.environ), timeout=1.0) is None
    assert time.monotonic() - started < 10
    child = int(pid_file.read_text())
    time.sleep(0.2)
    try:  # gone, or dead and waiting for its new parent to reap it (a container's init may not)
        state = open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return
    assert state == "Z", f"the timed-out program's child {child} still runs (state {state})"
