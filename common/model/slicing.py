"""Cutting weights for one worker: applies the tensor table's cuts (common/model/tensors.py).

An axis-0 cut keeps a range of output rows, an axis-1 cut a range of input columns (only on
the matrix type's block boundaries: whole groups for int8); a replicated tensor is kept whole.
Cuts are views where possible, so nothing is read from a mapped checkpoint until it is used or
written.
"""

from math import lcm
from typing import Iterator

from .config import ModelConfig
from llmtp.common.errors import ConfigError
from .split import SliceSpec, plan_split
from .tensors import SHARD_LAYER_ORDER, TENSOR, layer_key, table_name, unit_size
from .weights import LAYER_FIELDS, LayerWeights, Matrix, ModelWeights, ShardWeights


def full_shape(name: str, config: ModelConfig) -> tuple[int, ...]:
    """The whole model's shape of tensor `name` (a table name), (out, in) for matrices."""
    return TENSOR[name].shape(config)


def cut_range(name: str, config: ModelConfig, spec: SliceSpec) -> tuple[int, int, int] | None:
    """(axis, start, stop) of the rows or columns of `name` that `spec` keeps; None if replicated."""
    info = TENSOR[name]
    if info.cut_axis is None:
        return None
    size = unit_size(info.cut_unit, config)
    first, stop = spec.unit_range(info.cut_unit)
    return info.cut_axis, first * size, stop * size


def local_shape(name: str, config: ModelConfig, spec: SliceSpec) -> tuple[int, ...]:
    shape = list(full_shape(name, config))
    cut = cut_range(name, config, spec)
    if cut is not None:
        axis, start, stop = cut
        shape[axis] = stop - start
    return tuple(shape)


def check_cuts(weights: ModelWeights | ShardWeights, config: ModelConfig, spec: SliceSpec) -> None:
    """Refuse (ConfigError) a spec whose cuts do not fall on every matrix type's block
    boundaries (a quantization block never straddles two workers)."""
    for key, matrix in named_matrices(weights):
        name = table_name(key)
        cut = cut_range(name, config, spec)
        if cut is None:  # replicated (every norm is)
            continue
        axis, start, stop = cut
        problem = matrix.cut_problem(axis, start, stop)
        if problem is None:
            continue
        unit = TENSOR[name].cut_unit
        granule = matrix.row_granule if axis == 0 else matrix.col_granule
        why = (f"head_dim {config.head_dim} is not a multiple of {granule}" if unit in ("heads", "kv_heads")
               else f"the {unit} range is not a multiple of {granule}")
        counts = ", ".join(str(n) for n in worker_counts_that_cut(weights, config))
        raise ConfigError(f"cannot cut {matrix.type_tag} {name} for worker {spec.index} of {spec.count}: "
                          f"{problem} ({why}); worker counts that keep its blocks whole: {counts} "
                          f"(or re-quantize with a block size dividing {config.head_dim})")


def _cut_problem(weights, config: ModelConfig, spec: SliceSpec) -> str | None:
    for key, matrix in named_matrices(weights):
        cut = cut_range(table_name(key), config, spec)
        if cut is not None and matrix.cut_problem(*cut):
            return matrix.cut_problem(*cut)
    return None


def worker_counts_that_cut(weights: ModelWeights | ShardWeights, config: ModelConfig) -> list[int]:
    """The worker counts 1..n_heads whose every cut falls on every matrix's block boundaries."""
    granule = column_granule(weights)
    counts = []
    for n in range(1, config.n_heads + 1):
        if config.hidden_dim // granule >= n and all(
                _cut_problem(weights, config, spec) is None for spec in plan_split(config, n, granule)):
            counts.append(n)
    return counts


def column_granule(weights: ModelWeights | ShardWeights) -> int:
    """The granule the hidden (FFN) ranges must be cut in: whole column blocks of w2 and
    whole row blocks of w1 and w3, in every layer."""
    return lcm(*(granule for layer in weights.layers
                 for granule in (layer.w2.col_granule, layer.w1.row_granule, layer.w3.row_granule)))


def slice_weights(weights: ModelWeights | ShardWeights, spec: SliceSpec, config: ModelConfig) -> ShardWeights:
    """One worker's share of the whole model, as the tensor table says: views where possible
    (row cuts and fp32 column cuts), so nothing is read until it is used or written."""
    check_cuts(weights, config, spec)
    first, stop = spec.layers
    layers = [LayerWeights(**{name: slice_tensor(name, getattr(layer, name), config, spec) for name in LAYER_FIELDS})
              for layer in weights.layers[first:stop]]
    return ShardWeights(layers=layers, final_norm=slice_tensor("final_norm", weights.final_norm, config, spec),
                        classifier=slice_tensor("classifier", weights.classifier, config, spec))


def slice_tensor(name: str, matrix: Matrix, config: ModelConfig, spec: SliceSpec) -> Matrix:
    cut = cut_range(name, config, spec)
    if cut is None:
        return matrix
    axis, start, stop = cut
    return matrix.take_rows(start, stop) if axis == 0 else matrix.take_cols(start, stop)


def named_matrices(weights: ModelWeights | ShardWeights, first_layer: int = 0) -> Iterator[tuple[str, Matrix]]:
    """(stored name, tensor) of every tensor a worker holds, in shard file order (each stacked
    group back to back, so a loaded shard multiplies it as one matrix: weights.stacked_view).
    `weights.layers[0]` is the model's layer `first_layer`."""
    for index, layer in enumerate(weights.layers, start=first_layer):
        for name in SHARD_LAYER_ORDER:
            yield layer_key(index, name), getattr(layer, name)
    yield "final_norm", weights.final_norm
    yield "classifier", weights.classifier
