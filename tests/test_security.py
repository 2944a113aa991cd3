"""CURVE on every link: key files, a YAML cluster over 127.0.0.1 with real workers, strangers
refused while the coordinator keeps being served, and nothing readable on the wire."""

import os
import socket
import stat
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
import zmq
from zmq.utils.monitor import recv_monitor_message

from cli_runner import run_llmtp
from llmtp.common.wire import protocol
from llmtp.common.formats.checkpoint import load_checkpoint
from llmtp.common.cluster.config import load_cluster_config
from llmtp.coordinator.local_engine import LocalEngine
from llmtp.common.errors import ConfigError, WorkerError
from llmtp.common.model.sampler import Sampler, SamplerConfig
from llmtp.common.cluster.keys import load_coordinator_keys, load_worker_keys
from llmtp.common.wire.security import KeyPair, connect_curve, generate_keys, load_key_pair, load_public_key
from llmtp.common.formats.shard_file import load_embedding, write_shards
from config_cluster_tools import free_ports, keys_section, pick_model, start_config_workers, stop_workers, \
    write_config
from llmtp.coordinator.cluster_engine import ClusterEngine
from llmtp.coordinator.config_cluster import coordinator_manifest, open_config_engine, shard_for_config
from llmtp.coordinator.generate import generate
from llmtp.coordinator.local_cluster import start_workers, stop_processes

PROMPT = [1, 5, 9, 13]
NO_REPLY_WAIT_MS = 1500


def sampled_tokens(engine, steps=24, temperature=1.0, seed=133742) -> list[int]:
    sampler = Sampler(SamplerConfig(temperature=temperature, topp=0.9, seed=seed))
    return generate(engine, sampler, PROMPT, steps).generated_ids


@pytest.fixture(scope="module")
def curve_cluster(tmp_path_factory):
    """Two CURVE workers on 127.0.0.1 started from a YAML file, as `llmtp worker --config` would be."""
    folder = tmp_path_factory.mktemp("curve")
    model = pick_model(folder)
    generate_keys(folder / "keys")
    ports = free_ports(4)
    workers = [{"host": "127.0.0.1", "port": ports[2 * i], "peer_port": ports[2 * i + 1], "shard": i, "threads": 1}
               for i in range(2)]
    # relative key paths: resolved against the YAML's folder, wherever the test runs from
    config_path = write_config(folder / "cluster.yaml", model, "127.0.0.1", workers, keys=keys_section(Path("keys")))
    config = load_cluster_config(config_path)
    shard_for_config(config, progress=False)
    processes = start_config_workers(config_path, 2, folder)
    checkpoint = load_checkpoint(model["model"])
    try:
        yield SimpleNamespace(folder=folder, model=model, config=config, config_path=config_path,
                              reference=LocalEngine(checkpoint.config, checkpoint.weights))
    finally:
        stop_workers(processes)


def test_generation_over_curve_matches_the_single_process_engine(curve_cluster):
    engine = open_config_engine(curve_cluster.config)
    try:
        for temperature, seed in ((0.0, 1), (1.0, 133742)):
            assert sampled_tokens(engine, temperature=temperature, seed=seed) == \
                sampled_tokens(curve_cluster.reference, temperature=temperature, seed=seed)
    finally:
        engine.close()


def test_cli_generate_with_config_matches_single_process(curve_cluster):
    if curve_cluster.model["tokenizer"] is None:
        pytest.skip("needs stories260K and its tokenizer (shared/models is absent)")
    args = ["-t", 0, "-n", 40, "-i", "Once upon a time"]
    expected = run_llmtp("generate", curve_cluster.model["model"], "-z", curve_cluster.model["tokenizer"], *args)
    clustered = run_llmtp("generate", "--config", curve_cluster.config_path, *args)
    assert clustered.returncode == 0, clustered.stderr
    assert clustered.stdout == expected.stdout
    assert "not encrypted" not in clustered.stderr


def connection_events(monitor: zmq.Socket, wait_ms: int) -> set[int]:
    """The socket's connection events, until a handshake ends either way or wait_ms pass."""
    events, deadline = set(), time.monotonic() + wait_ms / 1000
    verdicts = {zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_HANDSHAKE_FAILED_AUTH}
    while not events & verdicts and monitor.poll(max(0, int((deadline - time.monotonic()) * 1000))):
        events.add(recv_monitor_message(monitor)["event"])
    return events


def test_strangers_get_nothing_and_the_coordinator_is_still_served(curve_cluster):
    """A client with a random key, one with the workers' own key pair (it is not the
    coordinator's), and one without CURVE send a valid HELLO and PING: no reply, the
    handshake fails, and the real coordinator is served as before."""
    config = curve_cluster.config
    worker_public = load_public_key(config.keys.worker_public, "test")
    hello = {"protocol_version": protocol.PROTOCOL_VERSION, "model_sha256": coordinator_manifest(config).source_sha256,
             "shard_index": 0, "n_shards": 2, "n_slots": 1, "session": "intruder", "reduce": "star"}
    context = zmq.Context()
    strangers = {"random key": KeyPair(*zmq.curve_keypair()),
                 "the workers' key pair": load_key_pair(config.keys.worker_secret, "test"),
                 "no CURVE": None}
    sockets = {}
    try:
        for name, pair in strangers.items():
            dealer = context.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            if pair:
                connect_curve(dealer, pair, worker_public)
            monitor = dealer.get_monitor_socket()
            dealer.connect(config.workers[0].endpoint)
            protocol.send(dealer, protocol.HELLO, hello)
            protocol.send(dealer, protocol.PING)
            sockets[name] = (dealer, monitor)
        poller = zmq.Poller()
        for dealer, _ in sockets.values():
            poller.register(dealer, zmq.POLLIN)
        assert not poller.poll(NO_REPLY_WAIT_MS), "a stranger got a reply"
        for name, (dealer, monitor) in sockets.items():
            events = connection_events(monitor, 200)
            assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in events, name
            if strangers[name] is not None:  # the worker's ZAP handler said no (status 400)
                assert zmq.EVENT_HANDSHAKE_FAILED_AUTH in events, (name, events)
    finally:
        for dealer, monitor in sockets.values():
            dealer.disable_monitor()
            monitor.close(linger=0)
            dealer.close(linger=0)
        context.term()
    log = (curve_cluster.folder / "worker-0.log").read_text()
    assert "refused a CURVE client on llmtp-control" in log
    test_generation_over_curve_matches_the_single_process_engine(curve_cluster)


def test_a_peer_inbox_admits_only_the_workers_key(curve_cluster):
    """The coordinator's own key cannot push partial sums into a worker's peer inbox."""
    config = curve_cluster.config
    coordinator_pair = load_coordinator_keys(config).coordinator
    worker_public = load_public_key(config.keys.worker_public, "test")
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    connect_curve(push, coordinator_pair, worker_public)
    monitor = push.get_monitor_socket()
    push.connect(f"tcp://127.0.0.1:{config.workers[1].peer_port}")
    try:
        events = connection_events(monitor, NO_REPLY_WAIT_MS)
        assert zmq.EVENT_HANDSHAKE_FAILED_AUTH in events and zmq.EVENT_HANDSHAKE_SUCCEEDED not in events, events
    finally:
        push.disable_monitor()
        monitor.close(linger=0)
        push.close(linger=0)
        context.term()
    assert "refused a CURVE client on llmtp-peers" in (curve_cluster.folder / "worker-1.log").read_text()
    test_generation_over_curve_matches_the_single_process_engine(curve_cluster)


def test_a_coordinator_with_another_key_is_refused(curve_cluster):
    config = curve_cluster.config
    manifest = coordinator_manifest(config)
    keys = load_coordinator_keys(config)
    stranger = type(keys)(coordinator=KeyPair(*zmq.curve_keypair()), worker_public=keys.worker_public)
    with pytest.raises(WorkerError, match=r"worker [01] .* refused our CURVE key"):
        ClusterEngine(manifest.config, load_embedding(manifest), [w.endpoint for w in config.by_shard()],
                      manifest.source_sha256, timeout=3.0, keys=stranger)


class TcpRelay:
    """127.0.0.1:port -> target, keeping a copy of every byte that passes either way."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.captured = bytearray()
        self.lock = threading.Lock()
        self.sockets = [self.listener]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self.pump, args=(source, sink), daemon=True).start()

    def pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                with self.lock:
                    self.captured += data
                sink.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the threads blocked on it
            except OSError:
                pass
            sock.close()


def run_through_relay(endpoints: list[str], manifest, keys=None) -> tuple[bytes, np.ndarray]:
    """A few steps with worker 0 reached through a relay: (bytes seen on its wire, an input row sent)."""
    relay = TcpRelay(int(endpoints[0].rsplit(":", 1)[1]))
    embedding = load_embedding(manifest)
    engine = ClusterEngine(manifest.config, embedding, [f"tcp://127.0.0.1:{relay.port}"] + endpoints[1:],
                           manifest.source_sha256, timeout=30.0, keys=keys)
    try:
        sampled_tokens(engine, steps=8, temperature=0.0)
    finally:
        engine.close()
        relay.close()
    return bytes(relay.captured), np.asarray(embedding[PROMPT[1]], dtype=np.float32)


def test_nothing_readable_crosses_the_wire(curve_cluster, tmp_path):
    """Through a relay in front of worker 0: with keys, none of our message types, header
    fields, the model's sha256 or an embedding row show; without keys (control) they all do."""
    config = curve_cluster.config
    manifest = coordinator_manifest(config)
    # (not HELLO or READY: CURVE's own handshake commands bear those names, in the clear)
    secrets = [protocol.STEP, protocol.LOGITS, b"model_sha256", b"step_id", manifest.source_sha256.encode()]
    wire, row = run_through_relay([w.endpoint for w in config.by_shard()], manifest, load_coordinator_keys(config))
    assert len(wire) > 2000
    for plain in secrets + [row.tobytes()[:64]]:
        assert plain not in wire, plain

    write_shards(load_checkpoint(curve_cluster.model["model"]), 2, tmp_path / "shards", progress=False)
    started = start_workers(tmp_path / "shards", 2, tmp_path / "run", tied_to_us=True)
    try:
        plain_wire, row = run_through_relay([w.endpoint for w in started], manifest)
    finally:
        stop_processes([w.process for w in started])
    for plain in secrets + [row.tobytes()[:64]]:
        assert plain in plain_wire, plain


# --- key files ----------------------------------------------------------------------------

def test_keygen_writes_private_secrets_and_never_overwrites(tmp_path):
    written = generate_keys(tmp_path / "keys")
    for public, secret in written.values():
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert stat.S_IMODE(public.stat().st_mode) == 0o644
        assert b"secret-key" not in public.read_bytes()
    with pytest.raises(ConfigError, match="exists"):
        generate_keys(tmp_path / "keys")


def test_secret_readable_by_others_is_refused(tmp_path):
    _, secret = generate_keys(tmp_path)["worker"]
    os.chmod(secret, 0o644)
    with pytest.raises(ConfigError, match=r"keys.worker_secret: .* readable by others \(mode 0644\); expected 0600"):
        load_key_pair(secret, "cluster.yaml: keys.worker_secret")


def test_public_key_field_must_not_hold_a_secret(tmp_path):
    _, secret = generate_keys(tmp_path)["coordinator"]
    with pytest.raises(ConfigError, match="keys.coordinator_public: .* holds a secret key too"):
        load_public_key(secret, "cluster.yaml: keys.coordinator_public")


def test_keygen_cli_prints_a_keys_section_that_loads(tmp_path):
    result = run_llmtp("keygen", "-o", "keys", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    local = yaml.safe_load((Path(__file__).resolve().parents[1] / "deploy" / "local-2workers.yaml").read_text())
    local.update(yaml.safe_load(result.stdout))
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(local))
    config = load_cluster_config(tmp_path / "cluster.yaml")
    assert load_worker_keys(config).coordinator_public == load_coordinator_keys(config).coordinator.public
    assert load_coordinator_keys(config).worker_public == load_worker_keys(config).worker.public
    again = run_llmtp("keygen", "-o", "keys", cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "exists" in again.stderr
