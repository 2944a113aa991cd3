"""Small random Llama-2 models for tests: configs, weights, and checkpoint files."""

from pathlib import Path

import numpy as np

from llmtp.common.formats.checkpoint import write_checkpoint
from llmtp.common.model.config import ModelConfig
from llmtp.common.model.weights import LayerWeights, ModelWeights

WEIGHT_SCALE = 0.1  # keeps activations of a few layers in a sane range
NORM_SPREAD = 0.1  # norms are 1 +- this


def make_config(dim=48, hidden_dim=100, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=67, seq_len=32,
                shared_classifier=False) -> ModelConfig:
    """Defaults: grouped-query attention (3 query heads per kv head), head_dim 8, odd vocab."""
    config = ModelConfig(dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads,
                         n_kv_heads=n_kv_heads, vocab_size=vocab_size, seq_len=seq_len,
                         shared_classifier=shared_classifier)
    config.validate("make_config")
    return config


def random_weights(config: ModelConfig, seed: int) -> ModelWeights:
    """float32 weights ~ N(0, 0.1^2), norms ~ 1 + N(0, 0.1^2); deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    dim, hidden, kv_dim = config.dim, config.hidden_dim, config.kv_dim

    def matrix(rows: int, cols: int) -> np.ndarray:
        return rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(WEIGHT_SCALE)

    def norm() -> np.ndarray:
        return 1 + rng.standard_normal(dim, dtype=np.float32) * np.float32(NORM_SPREAD)

    embedding = matrix(config.vocab_size, dim)
    layers = [LayerWeights(attn_norm=norm(), wq=matrix(dim, dim), wk=matrix(kv_dim, dim),
                           wv=matrix(kv_dim, dim), wo=matrix(dim, dim), ffn_norm=norm(),
                           w1=matrix(hidden, dim), w2=matrix(dim, hidden), w3=matrix(hidden, dim))
              for _ in range(config.n_layers)]
    final_norm = norm()
    classifier = embedding if config.shared_classifier else matrix(config.vocab_size, dim)
    return ModelWeights(token_embedding=embedding, layers=layers, final_norm=final_norm,
                        classifier=classifier)


def write_random_checkpoint(path, config: ModelConfig, seed: int, version: int = 1,
                            group_size: int | None = None) -> Path:
    """random_weights(config, seed) written as a llama2.c checkpoint of `version`."""
    return write_checkpoint(Path(path), config, random_weights(config, seed), version, group_size)
