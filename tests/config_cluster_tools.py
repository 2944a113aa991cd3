"""Helpers for tests of YAML-described clusters: write a config, start its workers
(`python -m llmtp.worker --config ... --index I`, optionally inside a network namespace),
stop them, and a model to run (stories260K when present, else a random one)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from model_factory import make_config, write_random_checkpoint

WORKER_START_TIMEOUT = 60.0  # a loaded 2-core machine imports numpy slowly
SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"


def pick_model(folder: Path) -> dict:
    """{"model", "tokenizer" (None for the random model), "name"}: stories260K if present."""
    stories = SHARED_MODELS / "stories260K"
    if (stories / "stories260K.bin").exists():
        return {"model": stories / "stories260K.bin", "tokenizer": stories / "tok512.bin", "name": "stories260K"}
    path = write_random_checkpoint(folder / "random.bin", make_config(n_layers=3, seq_len=64), seed=7)
    return {"model": path, "tokenizer": None, "name": "random (stories260K absent)"}


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports the kernel says are free right now (bound together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def write_config(path: Path, model: dict, coordinator_host: str, workers: list[dict], keys: dict | None = None,
                 **extra) -> Path:
    data = {"model": str(model["model"]), "tokenizer": str(model["tokenizer"] or model["model"]),
            "shards": "shards", "coordinator": {"host": coordinator_host}, "workers": workers, **extra}
    if keys:
        data["keys"] = keys
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def keys_section(folder: Path) -> dict:
    return {f"{name}_{kind}": str(folder / f"{name}.{suffix}") for name in ("coordinator", "worker")
            for kind, suffix in (("public", "key"), ("secret", "key_secret"))}


def start_config_workers(config_path: Path, count: int, log_folder: Path,
                         prefix: list[str] | None = None) -> list[subprocess.Popen]:
    """Start workers 0..count-1 of a config (each behind `prefix`, e.g. `ip netns exec NS`) and
    wait until each logs that it listens. Stops them all if one fails to start."""
    processes = []
    try:
        for index in range(count):
            log = open(log_folder / f"worker-{index}.log", "wb")
            command = (prefix(index) if prefix else []) + [
                sys.executable, "-m", "llmtp.worker", "--config", str(config_path), "--index", str(index),
                "--parent-pid", str(os.getpid())]
            processes.append(subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                              cwd=Path(__file__).resolve().parents[1]))
            log.close()
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        for index, process in enumerate(processes):
            log_path = log_folder / f"worker-{index}.log"
            while b"listening on" not in log_path.read_bytes():
                if process.poll() is not None:
                    raise RuntimeError(f"worker {index} exited with {process.returncode}: {log_path.read_text()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker {index} did not start: {log_path.read_text()}")
                time.sleep(0.05)
    except BaseException:
        stop_workers(processes)
        raise
    return processes


def stop_workers(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
