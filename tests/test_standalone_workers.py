"""What the README says about standalone workers (issue 13.10): `llmtp shard -o DIR/127.0.0.1`,
one `llmtp worker --shard ... --bind tcp://127.0.0.1:PORT` per shard, and a cluster YAML that
lists them is all `generate --config` needs; the text equals the in-process run's."""

import os
import subprocess
import time

import yaml

from cli_runner import llmtp_command, run_llmtp
from config_cluster_tools import free_ports
from process_tools import wait_for_file

PROMPT = "Once upon a time"


def test_generate_on_workers_started_by_hand(stories260k, tmp_path):
    shards = tmp_path / "shards"
    cut = run_llmtp("shard", stories260k["model"], "--workers", 2, "-o", shards / "127.0.0.1")
    assert cut.returncode == 0, cut.stderr
    free = free_ports(4)
    ports, unused = free[:2], free[2:]
    workers = []
    try:
        for index, port in enumerate(ports):
            announce = tmp_path / f"worker-{index}.endpoint"
            workers.append(subprocess.Popen(
                llmtp_command() + ["worker", "--shard", str(shards / "127.0.0.1" / f"shard-{index}-of-2.bin"),
                                   "--bind", f"tcp://127.0.0.1:{port}", "--announce", str(announce),
                                   "--parent-pid", str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_for_file(announce, workers[-1], deadline=time.monotonic() + 60)
        config = tmp_path / "cluster.yaml"
        config.write_text(yaml.safe_dump({
            "model": str(stories260k["model"]), "tokenizer": str(stories260k["tokenizer"]), "shards": "shards",
            "coordinator": {"host": "127.0.0.1"},
            # peer_port only keeps the YAML's ports apart: a worker started with --shard --bind picks
            # a free peer inbox port and tells the coordinator in its handshake.
            "workers": [{"host": "127.0.0.1", "port": port, "peer_port": peer, "shard": index}
                        for index, (port, peer) in enumerate(zip(ports, unused))]}))
        result = run_llmtp("generate", "--config", config, "-t", 0, "-n", 60, "-i", PROMPT)
        assert result.returncode == 0, result.stderr
        expected = run_llmtp("generate", stories260k["model"], "-z", stories260k["tokenizer"], "-t", 0, "-n", 60,
                             "-i", PROMPT)
        assert result.stdout == expected.stdout
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
