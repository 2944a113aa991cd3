"""Cutting weights for one worker: applies common/split.py's SPLIT_TABLE to the model's tensors.

An axis-0 cut keeps a range of output rows, an axis-1 cut a range of input columns (in whole
quantization groups for int8); a replicated tensor is kept whole. Cuts are views where possible,
so nothing is read from a mapped checkpoint until it is used or written.
"""

from typing import Iterator

import numpy as np

from .config import ModelConfig
from llmtp.common.errors import ConfigError
from .split import SPLIT_TABLE, SliceSpec
from .weights import LAYER_FIELDS, LayerWeights, Matrix, ModelWeights, QuantizedMatrix, ShardWeights



def full_shape(name: str, config: ModelConfig) -> tuple[int, ...]:
    """The whole model's shape of tensor `name` (a SPLIT_TABLE key), (out, in) for matrices."""
    dim, hidden = config.dim, config.hidden_dim
    return {"attn_norm": (dim,), "ffn_norm": (dim,), "final_norm": (dim,),
            "wq": (config.n_heads * config.head_dim, dim), "wk": (config.kv_dim, dim), "wv": (config.kv_dim, dim),
            "wo": (dim, config.n_heads * config.head_dim),
            "w1": (hidden, dim), "w3": (hidden, dim), "w2": (dim, hidden),
            "classifier": (config.vocab_size, dim)}[name]


def cut_range(name: str, config: ModelConfig, spec: SliceSpec) -> tuple[int, int, int] | None:
    """(axis, start, stop) of the rows or columns of `name` that `spec` keeps; None if replicated."""
    axis, unit = SPLIT_TABLE[name]
    if axis is None:
        return None
    unit_size = config.head_dim if unit in ("heads", "kv_heads") else 1
    first, stop = spec.unit_range(unit)
    return axis, first * unit_size, stop * unit_size


def local_shape(name: str, config: ModelConfig, spec: SliceSpec) -> tuple[int, ...]:
    shape = list(full_shape(name, config))
    cut = cut_range(name, config, spec)
    if cut is not None:
        axis, start, stop = cut
        shape[axis] = stop - start
    return tuple(shape)


def check_group_alignment(config: ModelConfig, spec: SliceSpec, group_size: int | None) -> None:
    """Column cuts of int8 matrices must fall on group boundaries (a group never straddles two workers)."""
    if not group_size or group_size == 1:
        return
    for name, (axis, unit) in SPLIT_TABLE.items():
        if axis != 1:
            continue
        _, start, stop = cut_range(name, config, spec)
        if start % group_size == 0 and stop % group_size == 0:
            continue
        why = (f"head_dim {config.head_dim} is not a multiple of group_size {group_size}" if unit == "heads"
               else f"{unit} range {start}..{stop} is not a multiple of group_size {group_size}")
        raise ConfigError(f"cannot cut int8 {name} for worker {spec.index} of {spec.count} at columns "
                          f"{start}..{stop}: {why}; use a worker count whose head boundaries fall on groups, "
                          f"or re-quantize with a group size dividing {config.head_dim}")


def slice_weights(weights: ModelWeights | ShardWeights, spec: SliceSpec, config: ModelConfig) -> ShardWeights:
    """One worker's share of the whole model, as SPLIT_TABLE says: views where possible
    (row cuts and fp32 column cuts), so nothing is read until it is used or written."""
    group_size = next((m.group_size for _, m in named_matrices(weights) if isinstance(m, QuantizedMatrix)), None)
    check_group_alignment(config, spec, group_size)
    layers = [LayerWeights(**{name: slice_tensor(name, getattr(layer, name), config, spec) for name in LAYER_FIELDS})
              for layer in weights.layers]
    return ShardWeights(layers=layers, final_norm=slice_tensor("final_norm", weights.final_norm, config, spec),
                        classifier=slice_tensor("classifier", weights.classifier, config, spec))


def slice_tensor(name: str, matrix: Matrix, config: ModelConfig, spec: SliceSpec) -> Matrix:
    cut = cut_range(name, config, spec)
    if cut is None:
        return matrix
    axis, start, stop = cut
    if isinstance(matrix, QuantizedMatrix):
        return _slice_quantized(matrix, axis, start, stop)
    return matrix[start:stop] if axis == 0 else matrix[:, start:stop]


def _slice_quantized(matrix: QuantizedMatrix, axis: int, start: int, stop: int) -> QuantizedMatrix:
    """Rows are cut as rows; columns in whole groups (scales are row-major, one per group)."""
    rows, cols = matrix.shape
    group_size = matrix.group_size
    scales = matrix.scales.reshape(rows, cols // group_size)
    if axis == 0:
        return QuantizedMatrix(values=matrix.values[start:stop], scales=scales[start:stop].reshape(-1),
                               group_size=group_size)
    assert start % group_size == 0 and stop % group_size == 0, (start, stop, group_size)
    # the scales of a column slice are strided; copy them (1/group_size of the values' count)
    local_scales = np.ascontiguousarray(scales[:, start // group_size:stop // group_size]).reshape(-1)
    return QuantizedMatrix(values=matrix.values[:, start:stop], scales=local_scales, group_size=group_size)


# wq, wk, wv and then w1, w3 back to back, so a loaded shard can multiply each group as one
# stacked matrix (weights.stacked_view): fewer, larger BLAS calls.
FILE_ORDER = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w3", "w2")
assert sorted(FILE_ORDER) == sorted(LAYER_FIELDS)


def named_matrices(weights: ModelWeights | ShardWeights) -> Iterator[tuple[str, Matrix]]:
    """(file name, tensor) of every tensor a worker holds, in file order."""
    for index, layer in enumerate(weights.layers):
        for name in FILE_ORDER:
            yield f"layers.{index}.{name}", getattr(layer, name)
    yield "final_norm", weights.final_norm
    yield "classifier", weights.classifier
