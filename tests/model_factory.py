"""Small random Llama-2 models for tests: configs, weights, and checkpoint files."""

from pathlib import Path

import numpy as np

from llmtp.common.formats.checkpoint import write_checkpoint
from llmtp.common.model.config import ModelConfig
from llmtp.common.model.tensors import LAYER_TENSORS, TENSOR, TENSORS
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
    """float32 weights ~ N(0, 0.1^2), norms ~ 1 + N(0, 0.1^2); deterministic in `seed`.
    Drawn in tensor-table order (the embedding, each layer's tensors, the final norm, the classifier)."""
    rng = np.random.default_rng(seed)

    def draw(info) -> np.ndarray:
        shape = info.shape(config)
        if info.is_matrix:
            return rng.standard_normal(shape, dtype=np.float32) * np.float32(WEIGHT_SCALE)
        return 1 + rng.standard_normal(shape, dtype=np.float32) * np.float32(NORM_SPREAD)

    tensors, layers = {}, []
    for info in TENSORS:
        if info.per_layer:
            if not layers:  # the per-layer block: layer by layer
                layers = [LayerWeights(**{name: draw(TENSOR[name]) for name in LAYER_TENSORS})
                          for _ in range(config.n_layers)]
        elif info.name == "classifier" and config.shared_classifier:
            tensors["classifier"] = tensors["token_embedding"]
        else:
            tensors[info.name] = draw(info)
    return ModelWeights(layers=layers, **tensors)


def write_random_checkpoint(path, config: ModelConfig, seed: int, version: int = 1,
                            group_size: int | None = None) -> Path:
    """random_weights(config, seed) written as a llama2.c checkpoint of `version`."""
    return write_checkpoint(Path(path), config, random_weights(config, seed), version, group_size)
