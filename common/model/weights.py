"""Weight containers: norms as float32 vectors, matrices as Matrix objects (common/model/matrices.py).

Matrices follow llama2.c's layout: (out_features, in_features), so y = x @ W.T.
The whole model is a ShardWeights too: a worker's shard is the same structure
with fewer rows (column-parallel wq/wk/wv/w1/w3/classifier) or fewer columns
(row-parallel wo/w2), so one forward function serves both. A plain float32 ndarray
given for a matrix is taken as an F32Matrix view of the same memory.
"""

from dataclasses import dataclass, fields

import numpy as np

from .matrices import Matrix, as_matrix, stacked_view
from .tensors import LAYER_MATRICES, LAYER_TENSORS

__all__ = ["LayerWeights", "ShardWeights", "ModelWeights", "Matrix", "LAYER_FIELDS",
           "LAYER_MATRICES", "embed_tokens", "stacked_view"]


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # (dim,)
    wq: Matrix  # (n_heads_local * head_dim, dim)
    wk: Matrix  # (n_kv_heads_local * head_dim, dim)
    wv: Matrix  # (n_kv_heads_local * head_dim, dim)
    wo: Matrix  # (dim, n_heads_local * head_dim)
    ffn_norm: np.ndarray  # (dim,)
    w1: Matrix  # (hidden_local, dim)
    w2: Matrix  # (dim, hidden_local)
    w3: Matrix  # (hidden_local, dim)

    def __post_init__(self):
        for name in LAYER_MATRICES:
            setattr(self, name, as_matrix(getattr(self, name)))


LAYER_FIELDS = tuple(field.name for field in fields(LayerWeights))
assert LAYER_FIELDS == LAYER_TENSORS, "LayerWeights must hold the tensor table's per-layer tensors, in its order"


@dataclass
class ShardWeights:
    """Everything one worker multiplies with; the whole model is the one-worker shard."""

    layers: list[LayerWeights]
    final_norm: np.ndarray  # (dim,)
    classifier: Matrix  # (vocab_local, dim)

    def __post_init__(self):
        self.classifier = as_matrix(self.classifier)


@dataclass
class ModelWeights:
    token_embedding: Matrix  # (vocab_size, dim)
    layers: list[LayerWeights]
    final_norm: np.ndarray  # (dim,)
    classifier: Matrix  # (vocab_size, dim); the same object as token_embedding when shared

    def __post_init__(self):
        shared = self.classifier is self.token_embedding
        self.token_embedding = as_matrix(self.token_embedding)
        self.classifier = self.token_embedding if shared else as_matrix(self.classifier)

    def as_shard(self) -> ShardWeights:
        return ShardWeights(layers=self.layers, final_norm=self.final_norm, classifier=self.classifier)

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        return embed_tokens(self.token_embedding, tokens)


def embed_tokens(embedding: Matrix, tokens: np.ndarray) -> np.ndarray:
    """(T,) token ids -> (T, dim) float32 rows of the embedding table."""
    return as_matrix(embedding).rows(tokens)
