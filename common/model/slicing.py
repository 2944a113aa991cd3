"""Cutting weights for one worker: applies common/split.py's SPLIT_TABLE to the model's tensors.

An axis-0 cut keeps a range of output rows, an axis-1 cut a range of input columns (only on
the matrix type's block boundaries: whole groups for int8); a replicated tensor is kept whole.
Cuts are views where possible, so nothing is read from a mapped checkpoint until it is used or
written.
"""

from typing import Iterator

from .config import ModelConfig
from llmtp.common.errors import ConfigError
from .split import SPLIT_TABLE, SliceSpec
from .weights import LAYER_FIELDS, LayerWeights, Matrix, ModelWeights, ShardWeights


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


def check_cuts(weights: ModelWeights | ShardWeights, config: ModelConfig, spec: SliceSpec) -> None:
    """Refuse (ConfigError) a spec whose cuts do not fall on every matrix type's block
    boundaries (a quantization block never straddles two workers)."""
    for name, matrix in named_matrices(weights):
        table_name = name.rsplit(".", 1)[-1]
        cut = cut_range(table_name, config, spec)
        if not isinstance(matrix, Matrix) or cut is None:
            continue
        axis, start, stop = cut
        problem = matrix.cut_problem(axis, start, stop)
        if problem is None:
            continue
        unit = SPLIT_TABLE[table_name][1]
        granule = matrix.row_granule if axis == 0 else matrix.col_granule
        why = (f"head_dim {config.head_dim} is not a multiple of {granule}" if unit in ("heads", "kv_heads")
               else f"the {unit} range is not a multiple of {granule}")
        raise ConfigError(f"cannot cut {matrix.type_tag} {table_name} for worker {spec.index} of {spec.count}: "
                          f"{problem} ({why}); use a worker count whose head boundaries fall on its blocks, "
                          f"or re-quantize with a block size dividing {config.head_dim}")


def column_granule(weights: ModelWeights | ShardWeights) -> int:
    """The granule the hidden (FFN) ranges must be cut in: w2's column blocks."""
    return max((layer.w2.col_granule for layer in weights.layers), default=1)


def slice_weights(weights: ModelWeights | ShardWeights, spec: SliceSpec, config: ModelConfig) -> ShardWeights:
    """One worker's share of the whole model, as SPLIT_TABLE says: views where possible
    (row cuts and fp32 column cuts), so nothing is read until it is used or written."""
    check_cuts(weights, config, spec)
    layers = [LayerWeights(**{name: slice_tensor(name, getattr(layer, name), config, spec) for name in LAYER_FIELDS})
              for layer in weights.layers]
    return ShardWeights(layers=layers, final_norm=slice_tensor("final_norm", weights.final_norm, config, spec),
                        classifier=slice_tensor("classifier", weights.classifier, config, spec))


def slice_tensor(name: str, matrix: Matrix, config: ModelConfig, spec: SliceSpec) -> Matrix:
    cut = cut_range(name, config, spec)
    if cut is None:
        return matrix
    axis, start, stop = cut
    return matrix.take_rows(start, stop) if axis == 0 else matrix.take_cols(start, stop)


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
