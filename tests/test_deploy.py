"""deploy/: the ssh launcher starts, checks and stops a config's workers (ssh replaced by a
local shell), and the systemd template restarts a failed worker."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from cli_runner import llmtp_command
from llmtp.common.formats.checkpoint import load_checkpoint
from llmtp.common.cluster.config import load_cluster_config
from llmtp.coordinator.local_engine import LocalEngine
from llmtp.common.model.sampler import Sampler, SamplerConfig
from config_cluster_tools import free_ports, pick_model, write_config
from llmtp.coordinator.config_cluster import open_config_engine, shard_for_config
from llmtp.coordinator.generate import generate
from process_tools import is_alive, wait_until_gone

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def greedy_tokens(engine) -> list[int]:
    return generate(engine, Sampler(SamplerConfig(temperature=0.0)), [1, 5, 9], 24).generated_ids


def test_ssh_launcher_starts_checks_and_stops_a_configs_workers(tmp_path):
    fake_ssh = tmp_path / "fake-ssh"
    fake_ssh.write_text('#!/bin/sh\n# fake-ssh HOST COMMAND: run COMMAND on this machine\nexec sh -c "$2"\n')
    fake_ssh.chmod(0o755)
    model = pick_model(tmp_path)
    ports = free_ports(4)
    workers = [{"host": "127.0.0.1", "port": ports[2 * i], "peer_port": ports[2 * i + 1], "shard": i, "threads": 1}
               for i in range(2)]
    config = load_cluster_config(write_config(tmp_path / "cluster.yaml", model, "127.0.0.1", workers))
    shard_for_config(config, progress=False)
    env = dict(os.environ, SSH=str(fake_ssh), LLMTP_REMOTE_BIN=" ".join(llmtp_command()),
               LLMTP_PYTHON=sys.executable)

    def launcher(action: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(DEPLOY / "cluster-ssh.sh"), action, str(config.path)], env=env,
                              capture_output=True, text=True, timeout=120)

    try:
        started = launcher("start")
        assert started.returncode == 0, started.stdout + started.stderr
        assert started.stdout.count("started, pid") == 2, started.stdout
        assert launcher("status").stdout.count("running, pid") == 2
        assert launcher("start").stdout.count("already running") == 2
        checkpoint = load_checkpoint(model["model"])
        engine = open_config_engine(config)
        try:
            assert greedy_tokens(engine) == greedy_tokens(LocalEngine(checkpoint.config, checkpoint.weights))
        finally:
            engine.close()
        pids = [int((tmp_path / f"worker-{i}.pid").read_text()) for i in range(2)]
        stopped = launcher("stop")
        assert stopped.stdout.count(": stopped") == 2, stopped.stdout
        assert wait_until_gone(pids, timeout=10) == []
        assert launcher("status").stdout.count("not running") == 2
    finally:
        for pid_file in tmp_path.glob("worker-*.pid"):  # whatever a failure left running
            pid = int(pid_file.read_text())
            if is_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_launcher_refuses_a_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\n")
    result = subprocess.run([str(DEPLOY / "cluster-ssh.sh"), "start", str(bad)], capture_output=True, text=True,
                            env=dict(os.environ, LLMTP_PYTHON=sys.executable), timeout=60)
    assert result.returncode != 0 and "bad.yaml: tokenizer: missing" in result.stderr


def test_systemd_template_restarts_a_failed_worker_from_the_config():
    unit = (DEPLOY / "llmtp-worker@.service").read_text()
    assert "Restart=on-failure" in unit.splitlines()
    assert "worker --config /opt/llmtp/cluster.yaml --index %i" in unit
