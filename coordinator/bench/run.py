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
from .results import (BenchReport, EngineResult, FirstTokenResult, MachineLimits, best_of, faster_start,
                      streamed_bytes_per_token)
from .timing import time_engine


def run_bench(model: str, checkpoint_path: Path, worker_counts: list[int], prompt_tokens: int,
              decode_tokens: int, reduce: str | None, compare_hf: bool, in_process: bool = True,
              probe_mib: int = 1024, cores_per_worker: int | None = 1, rounds: int = 3,
              contended: bool = False, quant: list[str] = (), llama2c: Path | None = None) -> BenchReport:
    """cores_per_worker: pin each worker to that many cores (BLAS threads), so N workers use
    N x that many cores and the limit of each row is what those cores stream; None shares
    every core among the workers (as `generate --workers` does). A worker count that does
    not fit the cores falls back to sharing.

    quant: GGUF block formats ("q8_0", ...) the same weights are also measured in, each its own
    rows (in-process and every worker count) beside the source's.

    llama2c: a folder with llama2.c's `run` and/or `runq`, built by the user: their rows, a version
    2 copy measured by runq.c and by llmtp, and times to first token (llama2c.py).

    Every engine stays open for `rounds` rounds; each reports its best. contended: each round
    also times every engine while a busy process holds a core (contention.py)."""
    from llmtp.common.formats.load import load_model

    from ..local_cluster import ensure_shards, open_local_engine, usable_cpus
    from ..local_engine import LocalEngine
    from .llama2c_plan import RUNQ_VARIANT, plan_llama2c
    from .llama2c_report import llama2c_ratios
    from .quantized import quantized_model
    source = load_model(checkpoint_path)
    config = source.config
    if prompt_tokens + decode_tokens > config.seq_len:
        raise ConfigError(f"--prompt-tokens + --decode-tokens = {prompt_tokens + decode_tokens} exceeds "
                          f"the model's context {config.seq_len}")
    cores = len(usable_cpus())
    placements = {n: cores_per_worker if cores_per_worker and n * cores_per_worker <= cores else None
                  for n in worker_counts}
    cores_used = {n: n * k if k else cores for n, k in placements.items()}
    # (suffix of the row labels, path, worker counts): the source first, then each quantization
    variants = [("", checkpoint_path, worker_counts)]
    variants += [(f" {fmt}", quantized_model(checkpoint_path, fmt), worker_counts) for fmt in quant]
    plan = None
    if llama2c is not None:
        plan = plan_llama2c(llama2c, checkpoint_path, source, prompt_tokens, decode_tokens, worker_counts)
        if plan.runq_file is not None:
            variants.append((f" {RUNQ_VARIANT}", plan.runq_file, plan.runq_worker_counts))
        print("bench: running each llama2.c program and first-token command once", file=sys.stderr)
        plan.check()
    core_counts = sorted({cores, *cores_used.values(), *(plan.thread_counts if plan else ())})
    bandwidth_gbs = {n: 0.0 for n in core_counts}
    results: dict[str, EngineResult] = {}
    first_token: dict[str, FirstTokenResult] = {}
    with contextlib.ExitStack() as stack:
        engines = []  # (label, n_workers, cores, engine, weights name, MB per token, variant), in report order
        for suffix, path, counts in variants:
            loaded = source if path == checkpoint_path else load_model(path)
            name, mb = weights_name(loaded), streamed_bytes_per_token(config, loaded.weights) / 1e6
            if in_process:
                engines.append(("in-process" + suffix, 0, cores,
                                stack.enter_context(LocalEngine.from_checkpoint(loaded)), name, mb, suffix.strip()))
            for n in counts:
                print(f"bench: starting {n} worker(s){suffix}", file=sys.stderr)
                engine = stack.enter_context(contextlib.closing(open_local_engine(
                    ensure_shards(path, n), n, reduce=reduce, cores_per_worker=placements[n])))
                engines.append((f"{n} worker{'s' if n > 1 else ''}{suffix}", n, cores_used[n], engine, name, mb,
                                suffix.strip()))
            del loaded
        hf = None
        if compare_hf:
            hf = HFModel.open(source, cores)
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
                timings = []
                for label, n, used, engine, name, mb, variant in engines:
                    timing = time_engine(engine, config, prompt_tokens, decode_tokens, n, used, label_of(label))
                    timing.weights, timing.weight_mb_per_token, timing.variant = name, mb, variant
                    timings.append(timing)
                if plan:  # llama2.c's programs and the first-token processes, after llmtp's engines
                    timings += plan.time_rows(label_of) + plan.time_first_tokens(label_of)
                return timings
            timings = time_rows()
            if contended:  # the same engines again, a busy process holding one core
                timings += time_while_busy(time_rows)
            if hf:
                timings.append(hf.time(prompt_tokens, decode_tokens))
            for timing in timings:
                if isinstance(timing, FirstTokenResult):
                    first_token[timing.engine] = faster_start(first_token.get(timing.engine), timing)
                else:
                    results[timing.engine] = best_of(results.get(timing.engine), timing)
    limits = MachineLimits(cores=cores, bandwidth_gbs=bandwidth_gbs,
                           zmq_round_trip_ms=measure_zmq_round_trip(config.dim))
    gemm_shape = (prompt_tokens, config.dim, config.hidden_dim)
    gemm_gflops = {"numpy": measure_gemm_gflops(*gemm_shape, "numpy")}
    if hf:
        gemm_gflops["torch"] = measure_gemm_gflops(*gemm_shape, "torch")
    report = BenchReport(model=model, config=asdict(config),
                         weight_mb_per_token=streamed_bytes_per_token(config, source.weights) / 1e6,
                         limits=limits, results=list(results.values()), prompt_tokens=prompt_tokens,
                         decode_tokens=decode_tokens, gemm_gflops=gemm_gflops, first_token=list(first_token.values()),
                         llama2c_counting=plan.counting if plan else "")
    report.ratios = llama2c_ratios(report)
    return report


def weights_name(model) -> str:
    """How the source stores its matrices, for the report: "f32", "q8_grouped", "q4_0", ..."""
    return model.weights.layers[0].wq.type_tag
