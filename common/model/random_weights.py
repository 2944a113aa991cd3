"""Random Llama-2 weights of any shape: the tests' models and `llmtp bench`'s presets are
the same numbers for the same (config, seed)."""

import numpy as np

from .config import ModelConfig
from .tensors import LAYER_TENSORS, TENSOR, TENSORS
from .weights import LayerWeights, ModelWeights

WEIGHT_SCALE = 0.1  # keeps activations of a few layers in a sane range
NORM_SPREAD = 0.1  # norms are 1 +- this


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
