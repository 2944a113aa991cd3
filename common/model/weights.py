"""Weight containers: plain numpy arrays (often memory-mapped views) and int8 groups.

Matrices follow llama2.c's layout: (out_features, in_features), so y = x @ W.T.
The whole model is a ShardWeights too: a worker's shard is the same structure
with fewer rows (column-parallel wq/wk/wv/w1/w3/classifier) or fewer columns
(row-parallel wo/w2), so one forward function serves both.
"""

from dataclasses import dataclass, fields
from typing import Union

import numpy as np


@dataclass
class QuantizedMatrix:
    """llama2.c Q8_0: int8 values, one float32 scale per `group_size` consecutive values.

    values: (rows, cols) int8; scales: (rows * cols // group_size,) float32, in the
    same row-major order as the values. w = values * scale (scale = max|w| / 127).
    """

    values: np.ndarray
    scales: np.ndarray
    group_size: int

    @property
    def shape(self) -> tuple:
        return self.values.shape

    def dequantize(self, out: np.ndarray | None = None) -> np.ndarray:
        rows, cols = self.values.shape
        if out is None:
            out = np.empty((rows, cols), dtype=np.float32)
        grouped = out.reshape(-1, self.group_size)
        np.multiply(self.values.reshape(-1, self.group_size), self.scales.reshape(-1, 1), out=grouped)
        return out

    def dequantize_rows(self, rows: np.ndarray) -> np.ndarray:
        """Dequantize only the given rows (used for embedding lookups)."""
        cols = self.values.shape[1]
        groups_per_row = cols // self.group_size
        values = self.values[rows].astype(np.float32).reshape(len(rows), groups_per_row, self.group_size)
        scales = self.scales.reshape(-1, groups_per_row)[rows]
        return (values * scales[:, :, None]).reshape(len(rows), cols)


Matrix = Union[np.ndarray, QuantizedMatrix]


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


LAYER_FIELDS = tuple(field.name for field in fields(LayerWeights))
LAYER_MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass
class ShardWeights:
    """Everything one worker multiplies with; the whole model is the one-worker shard."""

    layers: list[LayerWeights]
    final_norm: np.ndarray  # (dim,)
    classifier: Matrix  # (vocab_local, dim)


@dataclass
class ModelWeights:
    token_embedding: Matrix  # (vocab_size, dim)
    layers: list[LayerWeights]
    final_norm: np.ndarray  # (dim,)
    classifier: Matrix  # (vocab_size, dim); the same object as token_embedding when shared

    def as_shard(self) -> ShardWeights:
        return ShardWeights(layers=self.layers, final_norm=self.final_norm, classifier=self.classifier)

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        return embed_tokens(self.token_embedding, tokens)


def stacked_view(matrices: list) -> np.ndarray | None:
    """One (total rows, cols) read-only view over float32 matrices that lie back to back in
    memory (a shard file stores wq, wk, wv and w1, w3 so), letting one BLAS call replace
    several; None when they do not."""
    if not all(isinstance(m, np.ndarray) and m.ndim == 2 and m.flags.c_contiguous for m in matrices):
        return None
    if len({(m.shape[1], m.dtype) for m in matrices}) != 1:
        return None
    if any(a.ctypes.data + a.nbytes != b.ctypes.data for a, b in zip(matrices, matrices[1:])):
        return None
    first = matrices[0]
    rows = sum(m.shape[0] for m in matrices)
    # The bytes past `first` are the next matrices' own, in the same mapping `first` keeps alive.
    return np.lib.stride_tricks.as_strided(first, shape=(rows, first.shape[1]), strides=first.strides,
                                           writeable=False)


def embed_tokens(embedding: Matrix, tokens: np.ndarray) -> np.ndarray:
    """(T,) token ids -> (T, dim) float32 rows of the embedding table."""
    if isinstance(embedding, QuantizedMatrix):
        return embedding.dequantize_rows(tokens)
    return np.asarray(embedding[tokens], dtype=np.float32)
