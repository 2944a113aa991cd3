"""Random Llama-2 weights of any shape: the tests' models and `llmtp bench`'s presets are
the same numbers for the same (config, seed)."""

import numpy as np

from .config import ModelConfig
from .weights import LayerWeights, ModelWeights

WEIGHT_SCALE = 0.1  # keeps activations of a few layers in a sane range
NORM_SPREAD = 0.1  # norms are 1 +- this


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
