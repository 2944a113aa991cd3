"""One `llmtp bench` run: open every engine, time them in interleaved rounds beside the
machine's limits, and return the report."""

import contextlib
import sys
from dataclasses import asdict
from pathlib import Path

from llmtp.common.errors import ConfigError

from .contention import time_while_busy
from .hf import HFModel
from .limits import measure_bandwidth, measure_gemm_gflops, measure_zmq_round_trip
from .results import BenchReport, EngineResult, MachineLimits, best_of, weight_bytes_per_token
from .timing import time_engine


def run_bench(model: str, checkpoint_path: Path, worker_counts: list[int], prompt_tokens: int,
              decode_tokens: int, reduce: str | None, compare_hf: bool, in_process: bool = True,
              probe_mib: int = 1024, cores_per_worker: int | None = 1, rounds: int = 3,
              contended: bool = False) -> BenchReport:
    """cores_per_worker: pin each worker to that many cores (BLAS threads), so N workers use
    N x that many cores and the limit of each row is what those cores stream; None shares
    every core among the workers (as `generate --workers` does). A worker count that does
    not fit the cores falls back to sharing.

    Every engine stays open for `rounds` rounds; each reports its best. contended: each round
    also times every engine while a busy process holds a core (contention.py)."""
    from llmtp.common.formats.checkpoint import load_checkpoint

    from ..local_cluster import ensure_shards, open_local_engine, usable_cpus
    from ..local_engine import LocalEngine
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
            engines.append(("in-process", 0, cores, stack.enter_context(LocalEngine.from_checkpoint(checkpoint))))
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
            def time_rows(label_of=lambda label: label):
                return [time_engine(engine, config, prompt_tokens, decode_tokens, n, used, label_of(label))
                        for label, n, used, engine in engines]
            timings = time_rows()
            if contended:  # the same engines again, a busy process holding one core
                timings += time_while_busy(time_rows)
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
                       limits=limits, results=list(results.values()), prompt_tokens=prompt_tokens,
                       decode_tokens=decode_tokens, gemm_gflops=gemm_gflops)
