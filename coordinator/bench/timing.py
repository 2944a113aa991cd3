"""Timing one engine: prefill (best of three) and a greedy decode, each decode step's time
split into math, sync wait and the coordinator's share (from Engine.timing()), and the
workers' memory (from Engine.stats())."""

import time

import numpy as np

from llmtp.common.model.config import ModelConfig
from llmtp.common.model.transformer import StepSequence, syncs_per_step

from ..engine import Engine, StepTiming
from .results import EngineResult

WARM_UP_TOKENS = 8


def time_engine(engine: Engine, config: ModelConfig, prompt_tokens: int, decode_tokens: int, n_workers: int,
                cores: int, label: str) -> EngineResult:
    rng = np.random.default_rng(1)
    prompt = rng.integers(3, config.vocab_size, prompt_tokens)
    # warm up: page in weights, start BLAS threads
    engine.step(prompt[:WARM_UP_TOKENS], [StepSequence(0, 0, WARM_UP_TOKENS)])
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
        # An engine without workers did all of the step itself, none of it in a sync.
        timing = engine.timing() or [StepTiming(forward_s=walls[-1], reduce_s=0.0)]
        forwards.append(max(t.forward_s for t in timing))
        waits.append(float(np.mean([t.reduce_s for t in timing])))
        maths.append(float(np.mean([t.forward_s - t.reduce_s for t in timing])))
        token = int(np.argmax(logits[0]))
    step = float(np.median(walls))
    math_s, wait_s = float(np.median(maths)), float(np.median(waits))
    # a cluster counts its steps' syncs at the handshake (a v2 file's make more than two a layer)
    n_syncs = getattr(engine, "syncs_per_step", syncs_per_step(config.n_layers)) if n_workers > 1 else 0
    result = EngineResult(
        engine=label, n_workers=n_workers, cores=cores, prefill_tokens_per_s=prompt_tokens / prefill_seconds,
        decode_tokens_per_s=1.0 / step, decode_step_ms=step * 1000, math_ms=math_s * 1000,
        sync_wait_ms=wait_s * 1000, coordinator_ms=max(0.0, step - float(np.median(forwards))) * 1000,
        sync_ms=wait_s * 1000 / n_syncs if n_syncs else None)
    for stats in engine.stats():
        result.worker_peak_rss_mb.append(stats.peak_rss_bytes / 1e6)
        result.worker_shard_mb.append(stats.shard_bytes / 1e6)
        result.worker_kv_mb.append(stats.kv_cache_bytes / 1e6)
    return result
