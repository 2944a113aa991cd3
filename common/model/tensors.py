"""The tensor table: every weight of a Llama model, its shape and how tensor parallelism cuts it.

Every format (llama2.c checkpoints, shard files), the slicer and the loader read this table
instead of stating shapes and name orders themselves. A per-layer tensor is stored under
`layers.{i}.{name}`. Matrices are (out_features, in_features).

How a tensor is cut over workers (Megatron-style): column-parallel weights (wq, wk, wv, w1,
w3, classifier) keep a worker's output rows; row-parallel weights (wo, w2) keep its input
columns and end in one sum over workers; norms are replicated. The token embedding stays
whole with the coordinator, which embeds the step's tokens.

  attention:  Y = concat_w(softmax(Q_w K_w^T) V_w) @ Wo^T = sum_w (attn_w @ Wo_w^T)
  ffn:        Y = sum_w (silu(X W1_w^T) * (X W3_w^T)) @ W2_w^T
  logits:     L = concat_w(X C_w^T)
"""

from dataclasses import dataclass
from typing import Callable

from .config import ModelConfig

ROWS, COLUMNS = 0, 1  # the axis a cut runs along


@dataclass(frozen=True)
class TensorInfo:
    name: str
    per_layer: bool
    shape: Callable[[ModelConfig], tuple[int, ...]]  # the whole model's shape
    is_matrix: bool  # else a float32 vector (a norm's weights)
    cut_axis: int | None = None  # ROWS, COLUMNS, or None: every worker holds all of it
    cut_unit: str | None = None  # what a cut is measured in: "heads", "kv_heads", "hidden", "vocab"
    in_shards: bool = True  # False: held whole by the coordinator (the embedding table)


def _norm(name: str, per_layer: bool) -> TensorInfo:
    return TensorInfo(name, per_layer, lambda c: (c.dim,), is_matrix=False)


def _matrix(name: str, per_layer: bool, shape, cut_axis=None, cut_unit=None, in_shards=True) -> TensorInfo:
    return TensorInfo(name, per_layer, shape, True, cut_axis, cut_unit, in_shards)


def _q_dim(c: ModelConfig) -> int:
    return c.n_heads * c.head_dim


TENSORS = (
    _matrix("token_embedding", False, lambda c: (c.vocab_size, c.dim), in_shards=False),
    _norm("attn_norm", True),
    _matrix("wq", True, lambda c: (_q_dim(c), c.dim), ROWS, "heads"),
    _matrix("wk", True, lambda c: (c.kv_dim, c.dim), ROWS, "kv_heads"),
    _matrix("wv", True, lambda c: (c.kv_dim, c.dim), ROWS, "kv_heads"),
    _matrix("wo", True, lambda c: (c.dim, _q_dim(c)), COLUMNS, "heads"),
    _norm("ffn_norm", True),
    _matrix("w1", True, lambda c: (c.hidden_dim, c.dim), ROWS, "hidden"),
    _matrix("w2", True, lambda c: (c.dim, c.hidden_dim), COLUMNS, "hidden"),
    _matrix("w3", True, lambda c: (c.hidden_dim, c.dim), ROWS, "hidden"),
    _norm("final_norm", False),
    _matrix("classifier", False, lambda c: (c.vocab_size, c.dim), ROWS, "vocab"),
)
TENSOR = {info.name: info for info in TENSORS}
SHARD_TENSORS = tuple(info for info in TENSORS if info.in_shards)

LAYER_TENSORS = tuple(info.name for info in TENSORS if info.per_layer)
LAYER_VECTORS = tuple(name for name in LAYER_TENSORS if not TENSOR[name].is_matrix)
LAYER_MATRICES = tuple(name for name in LAYER_TENSORS if TENSOR[name].is_matrix)

# Products the forward pass makes as one when their matrices lie back to back (q, k, v read the
# same normed input; so do the two halves of SwiGLU); a shard file stores each group so.
STACKED_GROUPS = (("wq", "wk", "wv"), ("w1", "w3"))


def _storage_order() -> tuple[str, ...]:
    """The layer's tensors in table order, each stacked group written together at its first member."""
    order: list[str] = []
    for name in LAYER_TENSORS:
        group = next((g for g in STACKED_GROUPS if name in g), (name,))
        order += [member for member in group if member not in order]
    return tuple(order)


SHARD_LAYER_ORDER = _storage_order()  # attn_norm, wq, wk, wv, wo, ffn_norm, w1, w3, w2


def unit_size(unit: str, config: ModelConfig) -> int:
    """Rows or columns per cut unit: a head is head_dim of them, an FFN unit or a token one."""
    return config.head_dim if unit in ("heads", "kv_heads") else 1


def unit_count(unit: str, config: ModelConfig) -> int:
    return {"heads": config.n_heads, "kv_heads": config.n_kv_heads, "hidden": config.hidden_dim,
            "vocab": config.vocab_size}[unit]


def layer_key(index: int, name: str) -> str:
    """The stored name of layer `index`'s tensor `name`."""
    return f"layers.{index}.{name}"


def stored_keys(config: ModelConfig, order: tuple[str, ...], layers: range | None = None) -> list[str]:
    """Stored names for `order` (table names; a per-layer one stands for that tensor in every
    layer of `layers`, the first layer first), skipping a classifier shared with the embedding."""
    layers = range(config.n_layers) if layers is None else layers
    keys = []
    for name in order:
        if name == "classifier" and config.shared_classifier:
            continue
        keys += [layer_key(i, name) for i in layers] if name in TENSOR and TENSOR[name].per_layer else [name]
    return keys


def table_name(key: str) -> str:
    """`layers.3.wq` -> `wq`; a top-level name is its own."""
    return key.rsplit(".", 1)[-1] if key.startswith("layers.") else key
