"""What one bench run measured: the machine's limits, one row per engine, and the report
that holds them (saved as JSON, read back by load_report)."""

import dataclasses
from dataclasses import dataclass, field

from llmtp.common.model.config import ModelConfig
from llmtp.common.model.tensors import LAYER_MATRICES


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
    weights: str = "f32"  # how its matrices are stored (a Matrix type tag)
    weight_mb_per_token: float = 0.0  # what one decode step streams in that storage; 0: the report's
    variant: str = ""  # "" for the measured model, else the `--quant` format its weights were put in
    # (or "v2": the llama2.c version 2 copy `--llama2c` measures beside runq.c)
    program: str = ""  # "" for llmtp's engines, "run.c" / "runq.c" for llama2.c's (`--llama2c`)


@dataclass
class FirstTokenResult:
    """`--llama2c`: the wall time of a whole process generating one token after a 5-token prompt."""
    engine: str
    seconds: float
    program: str = ""  # "run.c", or "" for `llmtp generate`
    command: str = ""  # the command line, as timed


@dataclass
class Ratio:
    """One comparison the report names, e.g. "in-process / run.c 2 threads", "decode", 1.12."""
    name: str
    measure: str  # "decode", "prefill" or "time to first token"
    value: float


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
    first_token: list = field(default_factory=list)  # FirstTokenResult, best round of each (--llama2c)
    ratios: list = field(default_factory=list)  # Ratio: llmtp against llama2.c's rows (--llama2c)
    llama2c_counting: str = ""  # what run.c's rate counts, and how the ratios use it (--llama2c)

    def bandwidth_limit_tokens_per_s(self, cores: int, weight_mb_per_token: float = 0.0) -> float:
        """Decode tokens/s if every weight byte (of the source, or `weight_mb_per_token`) streamed
        at what `cores` cores measured."""
        return self.limits.bandwidth_gbs[cores] * 1e9 / ((weight_mb_per_token or self.weight_mb_per_token) * 1e6)

    def limit_of(self, result: EngineResult) -> float:
        """`result`'s own limit: its cores' stream over the bytes its storage reads per token."""
        return self.bandwidth_limit_tokens_per_s(result.cores, result.weight_mb_per_token)

    def share_of_limit(self, result: EngineResult) -> float:
        return result.decode_tokens_per_s / self.limit_of(result)


def streamed_bytes_per_token(config: ModelConfig, weights) -> float:
    """Bytes one decode step reads of `weights` as stored: every layer matrix and the classifier
    once (a separate embedding table gives one row, left out)."""
    matrices = [getattr(layer, name) for layer in weights.layers for name in LAYER_MATRICES]
    return float(sum(m.nbytes for m in matrices) + weights.classifier.nbytes)


def best_of(kept: EngineResult | None, new: EngineResult) -> EngineResult:
    """The round with the faster decode (its time split with it), with the faster prefill of the two."""
    if kept is None:
        return new
    best = new if new.decode_tokens_per_s > kept.decode_tokens_per_s else kept
    return dataclasses.replace(best, prefill_tokens_per_s=max(kept.prefill_tokens_per_s, new.prefill_tokens_per_s))


def faster_start(kept: FirstTokenResult | None, new: FirstTokenResult) -> FirstTokenResult:
    return new if kept is None or new.seconds < kept.seconds else kept
