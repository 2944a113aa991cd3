"""What one bench run measured: the machine's limits, one row per engine, and the report
that holds them (saved as JSON, read back by load_report)."""

import dataclasses
from dataclasses import dataclass, field

from llmtp.common.model.config import ModelConfig


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


def weight_bytes_per_token(config: ModelConfig, bytes_per_weight: float = 4.0) -> float:
    """Bytes of weights one decode step streams: every matrix once (the embedding lookup reads one row,
    but a shared classifier reads the whole table)."""
    lookup_only = 0 if config.shared_classifier else config.vocab_size * config.dim
    return (config.n_params() - lookup_only) * bytes_per_weight


def best_of(kept: EngineResult | None, new: EngineResult) -> EngineResult:
    """The round with the faster decode (its time split with it), with the faster prefill of the two."""
    if kept is None:
        return new
    best = new if new.decode_tokens_per_s > kept.decode_tokens_per_s else kept
    return dataclasses.replace(best, prefill_tokens_per_s=max(kept.prefill_tokens_per_s, new.prefill_tokens_per_s))
