"""Worker processes: started and stopped, never orphaned; memory; handshake refusals."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import zmq

from cli_runner import llmtp_command, run_llmtp
from llmtp.common.formats.checkpoint import load_checkpoint
from llmtp.common.errors import ConfigError, WorkerError
from llmtp.common.formats.manifest import load_manifest
from llmtp.common.formats.shard_file import load_embedding, write_shards
from llmtp.common.model.transformer import StepSequence
from llmtp.coordinator.cluster_engine import ClusterEngine
from llmtp.coordinator.local_cluster import open_local_engine, start_workers, stop_processes
from model_factory import make_config, write_random_checkpoint
from process_tools import wait_until_gone, worker_children_of


@pytest.fixture(scope="module")
def sharded_stories(stories260k, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stories-2w")
    write_shards(load_checkpoint(stories260k["model"]), 2, folder, progress=False)
    return folder


@pytest.fixture(scope="module")
def sharded_one_worker(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-1w")
    config = make_config(dim=32, hidden_dim=64, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=40, seq_len=16)
    write_shards(load_checkpoint(write_random_checkpoint(folder / "tiny.bin", config, seed=3)), 1, folder,
                 progress=False)
    return folder


def test_workers_exit_when_the_coordinator_is_killed(sharded_stories):
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from llmtp.coordinator.local_cluster import open_local_engine
        engine = open_local_engine(Path({str(sharded_stories)!r}), 2)
        print(" ".join(str(p.pid) for p in engine.processes), flush=True)
        time.sleep(60)
    """)
    coordinator = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        worker_pids = [int(pid) for pid in coordinator.stdout.readline().split()]
        assert len(worker_pids) == 2
        coordinator.kill()
        coordinator.wait()
        assert wait_until_gone(worker_pids, timeout=5) == []
    finally:
        coordinator.kill()


def test_ctrl_c_keeps_text_stops_workers_and_exits_130(stories260k):
    process = subprocess.Popen(llmtp_command() + ["generate", str(stories260k["model"]), "-z",
                                                  str(stories260k["tokenizer"]), "-n", "512", "-s", "7",
                                                  "--workers", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first_text = process.stdout.read(40)  # generation is under way
        worker_pids = worker_children_of(process.pid)
        assert len(worker_pids) == 2
        process.send_signal(signal.SIGINT)
        rest = process.stdout.read()  # not communicate(): it would skip what the text wrapper buffered
        stderr = process.stderr.read()
        process.wait(20)
        assert process.returncode == 130, stderr
        assert (first_text + rest).startswith("Once upon a time")
        assert "Traceback" not in stderr
        assert wait_until_gone(worker_pids, timeout=5) == []
    finally:
        process.kill()


def test_cluster_up_serves_several_generates_then_down(stories260k, tmp_path):
    state = tmp_path / "cluster.json"
    up = run_llmtp("cluster", "up", stories260k["model"], "-z", stories260k["tokenizer"], "--workers", 2,
                   "--state", state)
    assert up.returncode == 0, up.stderr
    try:
        import json
        worker_pids = [w["pid"] for w in json.loads(state.read_text())["workers"]]
        expected = run_llmtp("generate", stories260k["model"], "-z", stories260k["tokenizer"], "-t", 0,
                             "-n", 40, "-i", "Once upon a time").stdout
        for _ in range(2):
            result = run_llmtp("generate", "--cluster", state, "-t", 0, "-n", 40, "-i", "Once upon a time")
            assert result.returncode == 0, result.stderr
            assert result.stdout == expected
    finally:
        down = run_llmtp("cluster", "down", "--state", state)
    assert down.returncode == 0, down.stderr
    assert wait_until_gone(worker_pids, timeout=5) == []
    assert not state.exists()


def test_worker_memory_stays_near_shard_plus_cache(tmp_path):
    """Resident memory of each worker against its shard size, on a model big enough to see."""
    config = make_config(dim=512, hidden_dim=1536, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=8000,
                         seq_len=128, shared_classifier=False)
    checkpoint = load_checkpoint(write_random_checkpoint(tmp_path / "m.bin", config, seed=3))
    write_shards(checkpoint, 2, tmp_path / "shards", progress=False)
    baseline = run_python_rss()
    engine = open_local_engine(tmp_path / "shards", 2)
    try:
        engine.step(np.arange(1, 33), [StepSequence(0, 0, 32)])
        for stats in engine.worker_stats():
            overhead = stats["peak_rss_bytes"] - stats["shard_bytes"] - stats["kv_cache_bytes"]
            print(f"worker rss {stats['rss_bytes'] / 1e6:.1f} MB, peak {stats['peak_rss_bytes'] / 1e6:.1f} MB, "
                  f"shard {stats['shard_bytes'] / 1e6:.1f} MB, kv {stats['kv_cache_bytes'] / 1e6:.1f} MB, "
                  f"python+numpy+zmq baseline {baseline / 1e6:.1f} MB")
            assert overhead < baseline + 30e6, stats
    finally:
        engine.close()


def run_python_rss() -> int:
    """Resident bytes of a bare interpreter that imported what a worker imports."""
    out = subprocess.run([sys.executable, "-c", "import numpy, zmq, msgpack\n"
                          "print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])"],
                         capture_output=True, text=True, check=True).stdout
    return int(out) * 1024


def test_coordinator_maps_only_the_embedding(stories260k, sharded_stories):
    script = textwrap.dedent(f"""
        from pathlib import Path
        import numpy as np
        from llmtp.coordinator.local_cluster import open_local_engine
        from llmtp.common.model.transformer import StepSequence
        engine = open_local_engine(Path({str(sharded_stories)!r}), 2)
        engine.step(np.array([1, 403]), [StepSequence(0, 0, 2)])
        print(open("/proc/self/maps").read())
        engine.close()
    """)
    maps = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60).stdout
    assert "embedding" in maps
    assert str(stories260k["model"].resolve()) not in maps
    assert "shard-" not in maps


@pytest.fixture
def one_worker(sharded_stories, tmp_path):
    started = start_workers(sharded_stories, 2, tmp_path / "run", tied_to_us=True)
    yield started
    stop_processes([w.process for w in started])


def connect(folder, endpoints, sha=None, timeout=5.0):
    manifest = load_manifest(folder)
    return ClusterEngine(manifest.config, load_embedding(folder), endpoints, sha or manifest.source_sha256,
                         timeout=timeout)


def test_handshake_refuses_another_model(sharded_stories, one_worker):
    with pytest.raises(WorkerError, match="model_sha256"):
        connect(sharded_stories, [w.endpoint for w in one_worker], sha="0" * 64)


def test_handshake_refuses_wrong_shard_order(sharded_stories, one_worker):
    with pytest.raises(WorkerError, match="shard_index"):
        connect(sharded_stories, [w.endpoint for w in reversed(one_worker)])


def test_handshake_refuses_wrong_worker_count(sharded_stories, one_worker):
    with pytest.raises(WorkerError, match="n_shards"):
        connect(sharded_stories, [one_worker[0].endpoint])


def test_unreachable_worker_times_out_naming_it(sharded_stories):
    with zmq.Context() as context, context.socket(zmq.REP) as probe:  # a free port nobody serves
        port = probe.bind_to_random_port("tcp://127.0.0.1")
    started = time.monotonic()
    with pytest.raises(WorkerError, match=f"127.0.0.1:{port}"):
        connect(sharded_stories, [f"tcp://127.0.0.1:{port}"] * 2, timeout=1.0)
    assert time.monotonic() - started < 5


def test_junk_on_a_worker_port_is_survived(sharded_stories, one_worker, stories260k):
    endpoints = [w.endpoint for w in one_worker]
    rng = np.random.default_rng(5)
    with zmq.Context() as context:
        for endpoint in endpoints:
            junk = context.socket(zmq.DEALER)
            junk.setsockopt(zmq.LINGER, 0)
            junk.connect(endpoint)
            for _ in range(300):
                frames = [rng.bytes(int(rng.integers(0, 64))) for _ in range(int(rng.integers(1, 4)))]
                if rng.random() < 0.5:
                    frames[0] = [b"STEP", b"HELLO", b"REDUCED", b"SHUTDOWN", b"PING"][int(rng.integers(5))]
                junk.send_multipart(frames)
            junk.close()
    time.sleep(0.5)
    assert all(w.process.poll() is None for w in one_worker)
    engine = connect(sharded_stories, endpoints)
    try:
        from llmtp.coordinator.local_engine import LocalEngine
        checkpoint = load_checkpoint(stories260k["model"])
        local = LocalEngine(checkpoint.config, checkpoint.weights)
        tokens = np.array([1, 403, 407, 261, 378])
        np.testing.assert_allclose(engine.step(tokens, [StepSequence(0, 0, 5)]),
                                   local.step(tokens, [StepSequence(0, 0, 5)]), atol=1e-5, rtol=1e-6)
    finally:
        engine.close()


def test_local_workers_are_pinned_to_their_own_cores(sharded_stories):
    from llmtp.coordinator.local_cluster import cpu_share, usable_cpus
    if len(usable_cpus()) < 2:
        pytest.skip("one usable core: nothing to pin")
    engine = open_local_engine(sharded_stories, 2)
    try:
        pinned = []
        for process in engine.processes:
            with open(f"/proc/{process.pid}/status") as status:
                allowed = next(line for line in status if line.startswith("Cpus_allowed_list:")).split()[1]
            pinned.append(expand_cpu_list(allowed))
        expected = [cpu_share(i, 2) for i in range(2)]
        assert pinned == expected and pinned[0] != pinned[1]
    finally:
        engine.close()


def expand_cpu_list(text: str) -> list[int]:
    """/proc's "0-2,5" -> [0, 1, 2, 5]."""
    cpus = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def test_cpu_share_splits_cores_only_when_each_worker_gets_one(monkeypatch):
    from llmtp.coordinator import local_cluster
    monkeypatch.setattr(local_cluster, "usable_cpus", lambda: [0, 1, 2, 3])
    assert [local_cluster.cpu_share(i, 2) for i in range(2)] == [[0, 1], [2, 3]]
    assert [local_cluster.cpu_share(i, 3) for i in range(3)] == [[0], [1], [2]]
    assert local_cluster.cpu_share(0, 1) is None and local_cluster.cpu_share(0, 5) is None


def test_cores_per_worker_pins_even_one_worker_and_refuses_too_many(monkeypatch):
    from llmtp.coordinator import local_cluster
    monkeypatch.setattr(local_cluster, "usable_cpus", lambda: [0, 1, 2, 3])
    assert local_cluster.cpu_share(0, 1, cores_per_worker=1) == [0]
    assert [local_cluster.cpu_share(i, 2, cores_per_worker=2) for i in range(2)] == [[0, 1], [2, 3]]
    assert local_cluster.blas_threads_env(2, cores_per_worker=1)["OPENBLAS_NUM_THREADS"] == "1"
    with pytest.raises(ConfigError, match="does not fit the 4 core"):
        local_cluster.cpu_share(0, 3, cores_per_worker=2)


def test_one_worker_given_one_core_runs_one_blas_thread_on_it(sharded_one_worker):
    from llmtp.coordinator.local_cluster import usable_cpus
    engine = open_local_engine(sharded_one_worker, 1, cores_per_worker=1)
    try:
        (process,) = engine.processes
        with open(f"/proc/{process.pid}/status") as status:
            allowed = next(line for line in status if line.startswith("Cpus_allowed_list:")).split()[1]
        with open(f"/proc/{process.pid}/environ", "rb") as environ:
            variables = dict(item.split(b"=", 1) for item in environ.read().split(b"\0") if b"=" in item)
        assert expand_cpu_list(allowed) == usable_cpus()[:1]
        assert variables[b"OPENBLAS_NUM_THREADS"] == b"1"
    finally:
        engine.close()
