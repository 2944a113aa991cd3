"""`llmtp serve` as a user starts it: a subprocess on a free port, in-process and on 2 workers,
stopped with Ctrl-C (SIGINT), leaving no process behind; bad arguments exit 2 in one line."""

import os
import signal
import socket
import subprocess
import time

import httpx
import pytest

from llmtp.common.formats.tokenizer import load_tokenizer
from llmtp.coordinator.commands.engines import DEFAULT_MODEL_DIR

from cli_runner import llmtp_command, run_llmtp
from serve_tools import DEADLINE_S


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_serve(*args):
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(llmtp_command() + ["serve", "--port", str(port), *map(str, args)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                return process, base
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError("llmtp serve did not come up")


def stop(process) -> str:
    process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return stderr


@pytest.mark.parametrize("workers", [0, 2])
def test_serve_answers_like_generate_and_stops_cleanly(workers):
    process, base = start_serve("--slots", 2, "--api-key", "k", "-w", workers)
    try:
        response = httpx.post(base + "/v1/completions", headers={"Authorization": "Bearer k"}, timeout=DEADLINE_S,
                              json={"model": "m", "prompt": "ROMEO:", "max_tokens": 10, "temperature": 0})
        models = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer k"}, timeout=DEADLINE_S)
        children = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True,
                                                       text=True).stdout.split()]
    finally:
        stderr = stop(process)
    assert response.status_code == 200, response.text
    n_prompt = len(load_tokenizer(DEFAULT_MODEL_DIR / "tokenizer.model").encode("ROMEO:"))
    generated = run_llmtp("generate", "-t", "0", "-i", "ROMEO:", "-n", n_prompt + 9)  # 10 new tokens
    assert "ROMEO:" + response.json()["choices"][0]["text"] + "\n" == generated.stdout
    assert models.json()["data"][0]["id"] == "default_model"
    assert "serving default_model" in stderr and "Traceback" not in stderr
    assert process.returncode == 130  # Ctrl-C, as every llmtp command ends on it
    assert len(children) >= workers
    deadline = time.monotonic() + DEADLINE_S  # the workers (and multiprocessing's tracker) went with it
    while any(os.path.exists(f"/proc/{pid}") for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in children)


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--slots", "0"], "--slots must be >= 1"),
    (["--chat-template", "nonesuch"], "neither llama2 nor chatml nor a file"),
    (["/nonexistent/model.bin"], "/nonexistent/"),
])
def test_bad_serve_arguments_exit_2_in_one_line(args, message):
    result = run_llmtp("serve", *args)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
