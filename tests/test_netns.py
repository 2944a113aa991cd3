"""Workers on separate hosts: each in its own Linux network namespace on its own address,
with CURVE keys (required off loopback); the coordinator in the root namespace. Output must
match the single-process engine, with and without 2 ms of added latency, and a benchmark
line is printed (not asserted): tokens/s at +0 and +2 ms, and the measured cost of the
syncs against 2 x n_layers x RTT, the RTT from a bare ZeroMQ ping-pong on the same link.
Skips with the reason where namespaces cannot be made (not root, no iproute2)."""

import contextlib
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cli_runner import run_llmtp
from llmtp.common.formats.checkpoint import load_checkpoint
from llmtp.common.cluster.config import load_cluster_config
from llmtp.coordinator.local_engine import LocalEngine
from llmtp.common.model.sampler import Sampler, SamplerConfig
from llmtp.common.wire.security import generate_keys
from llmtp.common.model.transformer import StepSequence
from config_cluster_tools import keys_section, pick_model, start_config_workers, stop_workers, write_config
from llmtp.coordinator.config_cluster import open_config_engine, shard_for_config
from llmtp.coordinator.generate import generate
from netns_tools import Lab, NetemUnavailable, namespaces_unavailable

N_HOSTS = 3
PROMPT = [1, 5, 9, 13]
TIMED_STEPS = 40
ADDED_MS = 2


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("netns")
    lab = Lab(N_HOSTS)
    try:
        lab.build_bridge()
        model = pick_model(folder)
        generate_keys(folder / "keys")
        checkpoint = load_checkpoint(model["model"])
        yield SimpleNamespace(lab=lab, folder=folder, model=model, n_layers=checkpoint.config.n_layers,
                              reference=LocalEngine(checkpoint.config, checkpoint.weights))
    finally:
        lab.close()


def cluster_config(env, name: str, coordinator: str, hosts: list[str]):
    """A keyed config for workers on `hosts` (port 5555 on each), sharded one folder per host."""
    workers = [{"host": host, "port": 5555, "shard": index, "threads": 1} for index, host in enumerate(hosts)]
    path = write_config(env.folder / f"{name}.yaml", env.model, coordinator, workers, keys=keys_section(Path("keys")))
    config = load_cluster_config(path)
    shard_for_config(config, progress=False)
    return config


@contextlib.contextmanager
def running_workers(env, config):
    """Worker i runs inside namespace i (`ip netns exec`), started by `--config --index i`."""
    logs = env.folder / f"logs-{config.path.stem}"
    logs.mkdir(exist_ok=True)
    processes = start_config_workers(config.path, config.n_workers, logs, prefix=env.lab.exec_prefix)
    try:
        yield
    finally:
        stop_workers(processes)


def sampled_tokens(engine, temperature: float, seed: int) -> list[int]:
    sampler = Sampler(SamplerConfig(temperature=temperature, topp=0.9, seed=seed))
    return generate(engine, sampler, PROMPT, steps=48).generated_ids


def assert_same_tokens(engine, reference) -> None:
    for temperature, seed in ((0.0, 1), (1.0, 133742)):
        assert sampled_tokens(engine, temperature, seed) == sampled_tokens(reference, temperature, seed)


def decode_seconds_per_token(engine) -> float:
    """Prefill PROMPT, then TIMED_STEPS single-token steps on fixed tokens (no early EOS)."""
    vocab = engine.config.vocab_size
    engine.step(np.asarray(PROMPT), [StepSequence(0, 0, len(PROMPT))])
    started = time.perf_counter()
    for position in range(len(PROMPT), len(PROMPT) + TIMED_STEPS):
        engine.step(np.asarray([3 + position % (vocab - 3)]), [StepSequence(0, position, 1)])
    return (time.perf_counter() - started) / TIMED_STEPS


def test_generation_across_namespaces_matches_the_single_process_engine(env):
    coordinator, hosts = env.lab.bridge_addresses
    config = cluster_config(env, "bridge", coordinator, hosts)
    with running_workers(env, config):
        engine = open_config_engine(config)
        try:
            assert_same_tokens(engine, env.reference)
        finally:
            engine.close()
        if env.model["tokenizer"] is not None:
            args = ["-t", 0, "-n", 48, "-i", "Once upon a time"]
            expected = run_llmtp("generate", env.model["model"], "-z", env.model["tokenizer"], *args)
            clustered = run_llmtp("generate", "--config", config.path, *args)
            assert clustered.returncode == 0, clustered.stderr
            assert clustered.stdout == expected.stdout


def latency_path(lab: Lab):
    """(name, coordinator, hosts, set_delay(ms)): netem on the bridge's veths, or, where the
    kernel has no netem, the userspace delay switch on a second set of links."""
    try:
        lab.add_netem_delay(ADDED_MS)
        lab.remove_netem_delay()
    except NetemUnavailable as error:
        coordinator, hosts = lab.build_switch()
        return f"userspace delay switch (tc netem unavailable: {error})", coordinator, hosts, lab.set_switch_delay

    def set_delay(milliseconds: float) -> None:
        lab.remove_netem_delay()
        if milliseconds:
            lab.add_netem_delay(milliseconds)

    return "tc netem", *lab.bridge_addresses, set_delay


def test_added_latency_keeps_output_and_prints_a_benchmark(env, capsys):
    mechanism, coordinator, hosts, set_delay = latency_path(env.lab)
    config = cluster_config(env, "latency", coordinator, hosts)
    measured = {}
    with running_workers(env, config):
        engine = open_config_engine(config)
        try:
            for added_ms in (0, ADDED_MS):
                set_delay(added_ms)
                assert_same_tokens(engine, env.reference)
                seconds = decode_seconds_per_token(engine)
                rtt = env.lab.zmq_rtt(server=1, client=0, server_address=hosts[1])
                measured[added_ms] = (seconds, rtt)
        finally:
            set_delay(0)
            engine.close()
    with capsys.disabled():
        print("\n" + benchmark_line(env, mechanism, measured))


def benchmark_line(env, mechanism: str, measured: dict) -> str:
    n_syncs = 2 * env.n_layers
    (base, base_rtt), (slow, slow_rtt) = measured[0], measured[ADDED_MS]
    added = slow - base
    predicted = n_syncs * (slow_rtt - base_rtt)
    return (f"netns benchmark ({env.model['name']}, {N_HOSTS} workers in namespaces, CURVE, reduce peers, "
            f"{mechanism}): decode {1 / base:.1f} tok/s at +0 ms, {1 / slow:.1f} tok/s at +{ADDED_MS} ms; "
            f"worker<->worker RTT (ZeroMQ ping-pong) {base_rtt * 1e3:.2f} ms -> {slow_rtt * 1e3:.2f} ms; "
            f"added {added * 1e3:.1f} ms/token = {added / n_syncs * 1e3:.2f} ms per sync over {n_syncs} syncs, "
            f"against 2 x n_layers x added RTT = {predicted * 1e3:.1f} ms/token "
            f"(measured/predicted {added / predicted:.2f})")
