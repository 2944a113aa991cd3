"""`llmtp bench`: prefill and decode speed against worker count, beside the machine's
own limits measured in the same run (streaming bandwidth, a bare ZeroMQ round trip).

Speed is never asserted in tests; this command is where it is measured. Report ratios
from one run: the machine is shared and noisy.
"""

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llmtp.common.model.config import ModelConfig
from llmtp.common.errors import ConfigError
from llmtp.common.model.transformer import StepSequence

PRESETS = {
    "15M": ModelConfig(dim=288, hidden_dim=768, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000,
                       seq_len=256, shared_classifier=True),
    "110M": ModelConfig(dim=768, hidden_dim=2048, n_layers=12, n_heads=12, n_kv_heads=12, vocab_size=32000,
                        seq_len=1024, shared_classifier=True),
    # One Llama-2-7B layer plus its (separate) classifier: the per-layer and logits costs of the real thing.
    "7B-layer": ModelConfig(dim=4096, hidden_dim=11008, n_layers=1, n_heads=32, n_kv_heads=32, vocab_size=32000,
                            seq_len=2048, shared_classifier=False),
}


@dataclass
class MachineLimits:
    cores: int
    bandwidth_gbs: dict  # cores (BLAS threads) -> GB/s of a float32 matrix-vector product over 1 GiB
    zmq_round_trip_ms: float  # a sync-sized message there and back between two processes


@dataclass
class EngineResult:
    engine: str
    n_workers: int
    cores: int  # cores its matrix products ran on, in all: its bandwidth limit is that many cores'
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    decode_step_ms: float
    math_ms: float  # workers computing (mean over workers)
    sync_wait_ms: float  # workers inside the all-reduce: sending, waiting for the slowest, receiving
    coordinator_ms: float  # the rest: embedding, STEP/LOGITS transport, gather, Python around it
    sync_ms: float | None  # sync_wait_ms per all-reduce
    worker_peak_rss_mb: list = field(default_factory=list)
    worker_shard_mb: list = field(default_factory=list)
    worker_kv_mb: list = field(default_factory=list)


def weight_bytes_per_token(config: ModelConfig, bytes_per_weight: float = 4.0) -> float:
    """Bytes of weights one decode step streams: every matrix once (the embedding lookup reads one row,
    but a shared classifier reads the whole table)."""
    lookup_only = 0 if config.shared_classifier else config.vocab_size * config.dim
    return (config.n_params() - lookup_only) * bytes_per_weight


BANDWIDTH_PROBE = """
import sys, time, numpy as np
rows = int(sys.argv[1]) * 2**20 // (4 * 16384)
matrix = np.ones((rows, 16384), dtype=np.float32)  # 1 GiB by default: larger than the caches
vector = np.ones(16384, dtype=np.float32)
best = 1e9
for _ in range(8):
    started = time.perf_counter(); matrix @ vector; best = min(best, time.perf_counter() - started)
print(matrix.nbytes / best / 1e9)
"""


def measure_bandwidth(threads: int, probe_mib: int = 1024) -> float:
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", BANDWIDTH_PROBE, str(probe_mib)], env=env, capture_output=True, text=True,
                         check=True, timeout=300).stdout
    return float(out.strip())


ECHO_SERVER = """
import sys, zmq
socket = zmq.Context().socket(zmq.ROUTER)
socket.bind("tcp://127.0.0.1:*")
print(socket.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
while True:
    frames = socket.recv_multipart()
    if frames[1] == b"quit":
        break
    socket.send_multipart(frames)
"""


def measure_zmq_round_trip(dim: int, rounds: int = 2000) -> float:
    """Median ms for one protocol-shaped message (header + dim float32) to go there and back."""
    import zmq

    from llmtp.common.wire import protocol
    server = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
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
            protocol.send(client, protocol.PARTIAL, {"step_id": round_index, "sync": 0}, [partial])
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


def synthetic_checkpoint(preset: str) -> Path:
    """A random-weight v1 checkpoint of a preset's shape, made once into the cache."""
    from llmtp.common.formats.checkpoint import write_checkpoint

    from .local_cluster import cache_dir
    config = PRESETS[preset]
    path = cache_dir() / "bench" / f"synthetic-{preset}.bin"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"bench: writing a random {preset} checkpoint to {path}", file=sys.stderr)
    write_checkpoint(path, config, random_model_weights(config, seed=0), version=1)
    return path


def random_model_weights(config: ModelConfig, seed: int):
    """Weights scaled like a trained model's (std 0.02, unit norms), so activations stay finite."""
    from llmtp.common.model.weights import LayerWeights, ModelWeights
    rng = np.random.default_rng(seed)

    def matrix(rows, cols):
        return (rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02))

    layers = [LayerWeights(attn_norm=np.ones(config.dim, np.float32), wq=matrix(config.dim, config.dim),
                           wk=matrix(config.kv_dim, config.dim), wv=matrix(config.kv_dim, config.dim),
                           wo=matrix(config.dim, config.dim), ffn_norm=np.ones(config.dim, np.float32),
                           w1=matrix(config.hidden_dim, config.dim), w2=matrix(config.dim, config.hidden_dim),
                           w3=matrix(config.hidden_dim, config.dim)) for _ in range(config.n_layers)]
    embedding = matrix(config.vocab_size, config.dim)
    classifier = embedding if config.shared_classifier else matrix(config.vocab_size, config.dim)
    return ModelWeights(embedding, layers, np.ones(config.dim, np.float32), classifier)


def time_engine(engine, config: ModelConfig, prompt_tokens: int, decode_tokens: int, n_workers: int,
                cores: int, label: str) -> EngineResult:
    rng = np.random.default_rng(1)
    prompt = rng.integers(3, config.vocab_size, prompt_tokens)
    engine.step(prompt[:8], [StepSequence(0, 0, 8)])  # warm up: page in weights, start BLAS threads
    prefill_seconds = float("inf")
    for _ in range(3):  # one prefill is a single sample on a noisy machine: keep the best of three
        started = time.perf_counter()
        logits = engine.step(prompt, [StepSequence(0, 0, prompt_tokens)])
        prefill_seconds = min(prefill_seconds, time.perf_counter() - started)

    walls, maths, waits, forwards = [], [], [], []
    token = int(np.argmax(logits[0]))
    for position in range(prompt_tokens, prompt_tokens + decode_tokens):
        started = time.perf_counter()
        logits = engine.step(np.array([token]), [StepSequence(0, position, 1)])
        walls.append(time.perf_counter() - started)
        timing = getattr(engine, "last_step_timing", None) or [{"forward_s": walls[-1], "reduce_s": 0.0}]
        forwards.append(max(t["forward_s"] for t in timing))
        waits.append(float(np.mean([t["reduce_s"] for t in timing])))
        maths.append(float(np.mean([t["forward_s"] - t["reduce_s"] for t in timing])))
        token = int(np.argmax(logits[0]))
    step = float(np.median(walls))
    math_s, wait_s = float(np.median(maths)), float(np.median(waits))
    n_syncs = 2 * config.n_layers if n_workers > 1 else 0
    result = EngineResult(
        engine=label, n_workers=n_workers, cores=cores, prefill_tokens_per_s=prompt_tokens / prefill_seconds,
        decode_tokens_per_s=1.0 / step, decode_step_ms=step * 1000, math_ms=math_s * 1000,
        sync_wait_ms=wait_s * 1000, coordinator_ms=max(0.0, step - float(np.median(forwards))) * 1000,
        sync_ms=wait_s * 1000 / n_syncs if n_syncs else None)
    if hasattr(engine, "worker_stats"):
        for stats in engine.worker_stats():
            result.worker_peak_rss_mb.append(stats["peak_rss_bytes"] / 1e6)
            result.worker_shard_mb.append(stats["shard_bytes"] / 1e6)
            result.worker_kv_mb.append(stats["kv_cache_bytes"] / 1e6)
    return result


class HFModel:
    """The same weights through transformers on the CPU (the `oracle` extra), built once and
    timed like llmtp's engines."""

    def __init__(self, checkpoint, cores: int):
        import torch

        from .hf_bridge import build_hf_model
        self.torch, self.cores = torch, cores
        torch.set_num_threads(cores)
        self.vocab_size = checkpoint.config.vocab_size
        self.model = build_hf_model(checkpoint.config, checkpoint.weights, attention="sdpa")

    @classmethod
    def open(cls, checkpoint, cores: int) -> "HFModel | None":
        try:
            return cls(checkpoint, cores)
        except ImportError:
            return None

    def time(self, prompt_tokens: int, decode_tokens: int) -> EngineResult:
        torch, model = self.torch, self.model
        rng = np.random.default_rng(1)
        prompt = torch.tensor(rng.integers(3, self.vocab_size, (1, prompt_tokens)))
        with torch.inference_mode():
            model(input_ids=prompt[:, :8])
            prefill_seconds = float("inf")
            for _ in range(3):  # best of three, as for llmtp's engines
                started = time.perf_counter()
                output = model(input_ids=prompt, use_cache=True)
                prefill_seconds = min(prefill_seconds, time.perf_counter() - started)
            cache, token = output.past_key_values, output.logits[:, -1:].argmax(-1)
            walls = []
            for _ in range(decode_tokens):
                started = time.perf_counter()
                output = model(input_ids=token, past_key_values=cache, use_cache=True)
                walls.append(time.perf_counter() - started)
                cache, token = output.past_key_values, output.logits[:, -1:].argmax(-1)
        step = float(np.median(walls))
        return EngineResult(engine="transformers (torch)", n_workers=0, cores=self.cores,
                            prefill_tokens_per_s=prompt_tokens / prefill_seconds,
                            decode_tokens_per_s=1.0 / step, decode_step_ms=step * 1000, math_ms=step * 1000,
                            sync_wait_ms=0.0, coordinator_ms=0.0, sync_ms=None)


def best_of(kept: EngineResult | None, new: EngineResult) -> EngineResult:
    """The round with the faster decode (its time split with it), with the faster prefill of the two."""
    if kept is None:
        return new
    best = new if new.decode_tokens_per_s > kept.decode_tokens_per_s else kept
    return dataclasses.replace(best, prefill_tokens_per_s=max(kept.prefill_tokens_per_s, new.prefill_tokens_per_s))


def measure_gemm_gflops(n_rows: int, n_in: int, n_out: int, library: str) -> float:
    """Best of 20 products (n_rows x n_in) @ (n_in x n_out), with every core, in numpy or torch."""
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
    best = float("inf")
    for _ in range(20):
        started = time.perf_counter()
        product()
        best = min(best, time.perf_counter() - started)
    return 2 * n_rows * n_in * n_out / best / 1e9


@dataclass
class BenchReport:
    model: str
    config: dict
    weight_mb_per_token: float
    limits: MachineLimits
    results: list
    prompt_tokens: int = 128
    decode_tokens: int = 32
    # prefill's biggest product, (prompt x dim) @ (dim x hidden), in numpy and (with
    # --compare-hf) torch: library -> GFLOPS. Prefill is bound by these kernels.
    gemm_gflops: dict = field(default_factory=dict)

    def bandwidth_limit_tokens_per_s(self, cores: int) -> float:
        """Decode tokens/s if every weight byte streamed at what `cores` cores measured."""
        return self.limits.bandwidth_gbs[cores] * 1e9 / (self.weight_mb_per_token * 1e6)

    def share_of_limit(self, result: EngineResult) -> float:
        return result.decode_tokens_per_s / self.bandwidth_limit_tokens_per_s(result.cores)


def run_bench(model: str, checkpoint_path: Path, worker_counts: list[int], prompt_tokens: int,
              decode_tokens: int, reduce: str | None, compare_hf: bool, in_process: bool = True,
              probe_mib: int = 1024, cores_per_worker: int | None = 1, rounds: int = 3) -> BenchReport:
    """cores_per_worker: pin each worker to that many cores (BLAS threads), so N workers use
    N x that many cores and the limit of each row is what those cores stream; None shares
    every core among the workers (as `generate --workers` does). A worker count that does
    not fit the cores falls back to sharing.

    Every engine stays open for `rounds` rounds; each reports its best."""
    from llmtp.common.formats.checkpoint import load_checkpoint
    from .local_engine import LocalEngine

    from .local_cluster import ensure_shards, open_local_engine, usable_cpus
    checkpoint = load_checkpoint(checkpoint_path)
    config = checkpoint.config
    if prompt_tokens + decode_tokens > config.seq_len:
        raise ConfigError(f"--prompt-tokens + --decode-tokens = {prompt_tokens + decode_tokens} exceeds "
                          f"the model's context {config.seq_len}")
    cores = len(usable_cpus())
    placements = {n: cores_per_worker if cores_per_worker and n * cores_per_worker <= cores else None
                  for n in worker_counts}
    cores_used = {n: n * k if k else cores for n, k in placements.items()}
    bytes_per_weight = 1.0 + 4.0 / checkpoint.group_size if checkpoint.group_size else 4.0
    core_counts = sorted({cores, *cores_used.values()})
    bandwidth_gbs = {n: 0.0 for n in core_counts}
    results: dict[str, EngineResult] = {}
    with contextlib.ExitStack() as stack:
        engines = []  # (label, n_workers, cores, engine), in report order
        if in_process:
            engines.append(("in-process", 0, cores, LocalEngine.from_checkpoint(checkpoint)))
        for n in worker_counts:
            print(f"bench: starting {n} worker(s)", file=sys.stderr)
            engine = stack.enter_context(contextlib.closing(open_local_engine(
                ensure_shards(checkpoint_path, n), n, reduce=reduce, cores_per_worker=placements[n])))
            engines.append((f"{n} worker{'s' if n > 1 else ''}", n, cores_used[n], engine))
        hf = None
        if compare_hf:
            hf = HFModel.open(checkpoint, cores)
            if hf is None:
                print("bench: transformers/torch are not installed (pip install -e '.[oracle]'); skipped",
                      file=sys.stderr)
        # Rounds interleave the engines, so a spell of noise on this shared machine hits them
        # all alike; each keeps its best round (and the probe its fastest stream).
        for round_number in range(1, rounds + 1):
            print(f"bench: round {round_number}/{rounds}: bandwidth, "
                  + ", ".join(label for label, *_ in engines) + (", transformers" if hf else ""), file=sys.stderr)
            for n in core_counts:
                bandwidth_gbs[n] = max(bandwidth_gbs[n], measure_bandwidth(n, probe_mib))
            timings = [time_engine(engine, config, prompt_tokens, decode_tokens, n, used, label)
                       for label, n, used, engine in engines]
            if hf:
                timings.append(hf.time(prompt_tokens, decode_tokens))
            for timing in timings:
                results[timing.engine] = best_of(results.get(timing.engine), timing)
    limits = MachineLimits(cores=cores, bandwidth_gbs=bandwidth_gbs,
                           zmq_round_trip_ms=measure_zmq_round_trip(config.dim))
    gemm_shape = (prompt_tokens, config.dim, config.hidden_dim)
    gemm_gflops = {"numpy": measure_gemm_gflops(*gemm_shape, "numpy")}
    if hf:
        gemm_gflops["torch"] = measure_gemm_gflops(*gemm_shape, "torch")
    return BenchReport(model=model, config=asdict(config),
                       weight_mb_per_token=weight_bytes_per_token(config, bytes_per_weight) / 1e6,
                       limits=limits, results=list(results.values()), prompt_tokens=prompt_tokens, decode_tokens=decode_tokens,
                       gemm_gflops=gemm_gflops)


def format_report(report: BenchReport) -> str:
    streams = ", ".join(f"{gbs:.1f} GB/s on {n} core{'s' if n > 1 else ''}"
                        for n, gbs in sorted(report.limits.bandwidth_gbs.items()))
    lines = [
        f"model {report.model}: {report.weight_mb_per_token:.1f} MB of weights per decoded token",
        f"machine: {report.limits.cores} cores; a matrix-vector product streams {streams}; "
        f"ZeroMQ round trip {report.limits.zmq_round_trip_ms * 1000:.0f} us",
        "limit = weights / what the row's cores stream (in-process and transformers use every core)",
        "",
        f"{'engine':<22}{'cores':>6}{'prefill tok/s':>14}{'decode tok/s':>13}{'limit':>8}{'% of limit':>11}"
        f"{'step ms':>9}{'math':>8}{'sync':>8}{'coord':>8}{'per sync us':>12}{'sync/RTT':>9}"
        f"{'peak RSS - shard - kv MB':>26}",
    ]
    for r in report.results:
        per_sync = f"{r.sync_ms * 1000:.0f}" if r.sync_ms else "-"
        ratio = f"{r.sync_ms / report.limits.zmq_round_trip_ms:.2f}" if r.sync_ms else "-"
        overhead = ", ".join(f"{rss - shard - kv:.0f}" for rss, shard, kv in
                             zip(r.worker_peak_rss_mb, r.worker_shard_mb, r.worker_kv_mb)) or "-"
        lines.append(f"{r.engine:<22}{r.cores:>6}{r.prefill_tokens_per_s:>14.1f}{r.decode_tokens_per_s:>13.2f}"
                     f"{report.bandwidth_limit_tokens_per_s(r.cores):>8.1f}{100 * report.share_of_limit(r):>10.0f}%"
                     f"{r.decode_step_ms:>9.2f}{r.math_ms:>8.2f}{r.sync_wait_ms:>8.2f}{r.coordinator_ms:>8.2f}"
                     f"{per_sync:>12}{ratio:>9}{overhead:>26}")
    lines += scaling_lines(report)
    if report.gemm_gflops:
        config = report.config
        kernels = ", ".join(f"{library} {gflops:.0f} GFLOPS" for library, gflops in report.gemm_gflops.items())
        ratio = (f" (numpy / torch {report.gemm_gflops['numpy'] / report.gemm_gflops['torch']:.2f}x)"
                 if "torch" in report.gemm_gflops else "")
        lines += ["", f"prefill's kernel, ({report.prompt_tokens} x {config['dim']}) @ ({config['dim']} x {config['hidden_dim']}) "
                      f"on {report.limits.cores} cores: {kernels}{ratio}"]
    return "\n".join(lines)


def scaling_lines(report: BenchReport) -> list[str]:
    """Each worker count's decode speed against one worker's, beside the same ratio of limits."""
    workers = {r.n_workers: r for r in report.results if r.n_workers > 0}
    if 1 not in workers or len(workers) < 2:
        return []
    one = workers[1]
    lines = [""]
    for n, r in sorted(workers.items()):
        if n > 1:
            limits = report.bandwidth_limit_tokens_per_s(r.cores) / report.bandwidth_limit_tokens_per_s(one.cores)
            lines.append(f"{n} workers / 1 worker: decode {r.decode_tokens_per_s / one.decode_tokens_per_s:.2f}x, "
                         f"prefill {r.prefill_tokens_per_s / one.prefill_tokens_per_s:.2f}x "
                         f"(their limits: {limits:.2f}x)")
    return lines


def plot_report(report: BenchReport, path: Path) -> bool:
    """tokens/s against workers with the bandwidth limit, and each step's time split. False
    when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ours = [r for r in report.results if r.engine != "transformers (torch)"]
    labels = [r.engine for r in ours]
    figure, (speed, split) = plt.subplots(1, 2, figsize=(12, 4.5))
    workers = sorted((r for r in ours if r.n_workers > 0), key=lambda r: r.n_workers)
    counts = [r.n_workers for r in workers]
    speed.plot(counts, [r.decode_tokens_per_s for r in workers], "o-", label="llmtp, N workers")
    speed.plot(counts, [report.bandwidth_limit_tokens_per_s(r.cores) for r in workers], "s--", color="red",
               label="limit: weights / what their cores stream")
    for r in report.results:
        if r.n_workers == 0:
            style = {"color": "gray", "linestyle": ":"} if r.engine.startswith("transformers") else \
                {"color": "green", "linestyle": "-."}
            speed.axhline(r.decode_tokens_per_s, label=f"{r.engine} ({r.cores} cores)", **style)
    speed.set_xticks(counts, [f"{r.n_workers} ({r.cores} core{'s' if r.cores > 1 else ''})" for r in workers])
    speed.set_xlabel("workers (cores)")
    speed.set_ylabel("decode tokens/s")
    speed.set_title(f"{report.model}: decode speed")
    speed.set_ylim(bottom=0)
    speed.legend(fontsize="small")
    positions = np.arange(len(ours))
    parts = [("math", "math_ms"), ("sync wait", "sync_wait_ms"), ("coordinator + transport", "coordinator_ms")]
    bottom = np.zeros(len(ours))
    for name, key in parts:
        values = np.array([getattr(r, key) for r in ours])
        split.bar(positions, values, bottom=bottom, label=name)
        bottom += values
    split.set_xticks(positions, labels)
    split.set_ylabel("ms per decoded token")
    split.set_title("where a decode step's time goes")
    split.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def load_report(path: Path) -> BenchReport:
    """A report written by save_report, e.g. to draw its plot again."""
    data = json.loads(Path(path).read_text())
    limits = data.pop("limits")
    limits["bandwidth_gbs"] = {int(cores): gbs for cores, gbs in limits["bandwidth_gbs"].items()}
    results = [EngineResult(**row) for row in data.pop("results")]
    return BenchReport(limits=MachineLimits(**limits), results=results, **data)


def save_report(report: BenchReport, out_dir: Path) -> tuple[Path, Path | None]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bench-{report.model}"
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(asdict(report), indent=2))
    png_path = out_dir / f"{stem}.png"
    return json_path, png_path if plot_report(report, png_path) else None
