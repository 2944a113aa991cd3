"""The machine's own limits, measured in the same run as the engines: streaming bandwidth
(a probe process per thread count), a bare ZeroMQ round trip, and prefill's matrix kernel."""

import math
import os
import subprocess
import sys
import time

import numpy as np

PROBE_TIMEOUT = 300.0  # seconds for one bandwidth probe process
SHORTEST_SAMPLE = 2e-3  # seconds: a kernel sample repeats the product until it lasts this long


def measure_bandwidth(threads: int, probe_mib: int = 1024) -> float:
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-m", "llmtp.coordinator.bench.bandwidth_probe", str(probe_mib)],
                         env=env, capture_output=True, text=True, check=True, timeout=PROBE_TIMEOUT).stdout
    return float(out.strip())


def measure_zmq_round_trip(dim: int, rounds: int = 2000) -> float:
    """Median ms for one protocol-shaped message (header + dim float32) to go there and back."""
    import zmq

    from llmtp.common.wire import protocol
    from llmtp.common.wire.messages import Partial
    server = subprocess.Popen([sys.executable, "-m", "llmtp.coordinator.bench.echo_probe"],
                              stdout=subprocess.PIPE, text=True)
    context = zmq.Context()
    try:
        endpoint = server.stdout.readline().strip()
        client = context.socket(zmq.DEALER)
        client.setsockopt(zmq.LINGER, 0)
        client.setsockopt(zmq.RCVTIMEO, 10000)
        client.connect(endpoint)
        partial = np.ones((1, dim), dtype=np.float32)
        times = []
        for round_index in range(rounds + 100):
            started = time.perf_counter()
            protocol.send_message(client, Partial(step_id=round_index, sync=0, partial=partial))
            protocol.decode(client.recv_multipart(copy=False))
            times.append(time.perf_counter() - started)
        client.send_multipart([b"quit"])
        client.close()
        return float(np.median(times[100:]) * 1000)
    finally:
        context.term()
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def measure_gemm_gflops(n_rows: int, n_in: int, n_out: int, library: str) -> float:
    """Best of 20 samples of (n_rows x n_in) @ (n_in x n_out), with every core, in numpy or torch.

    A small product takes microseconds, below the clock's and Python's noise: each sample
    repeats it until it lasts SHORTEST_SAMPLE, so small shapes measure their rate too."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n_rows, n_in), dtype=np.float32)
    weight = rng.standard_normal((n_out, n_in), dtype=np.float32)
    if library == "torch":
        import torch
        x_t, weight_t = torch.from_numpy(x), torch.from_numpy(weight)
        product = lambda: torch.nn.functional.linear(x_t, weight_t)  # noqa: E731
    else:
        product = lambda: x @ weight.T  # noqa: E731
    product()
    started = time.perf_counter()
    product()
    repeats = max(1, math.ceil(SHORTEST_SAMPLE / max(time.perf_counter() - started, 1e-9)))
    best = float("inf")
    for _ in range(20):
        started = time.perf_counter()
        for _ in range(repeats):
            product()
        best = min(best, (time.perf_counter() - started) / repeats)
    return 2 * n_rows * n_in * n_out / best / 1e9
