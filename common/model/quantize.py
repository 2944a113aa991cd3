"""llama2.c Q8_0 quantization and the group-size rules that go with it.

A weight matrix (rows, cols) is cut into groups of `group_size` consecutive values
along each row; each group keeps one float32 scale = max|w| / 127 and int8 values
q = round(w / scale), so w ~= q * scale with |error| <= scale / 2.
"""

from math import gcd

import numpy as np

from .config import ModelConfig
from llmtp.common.errors import ConfigError
from .matrices import Matrix
from .q8_grouped import GroupedQ8Matrix
from .split import split_evenly

MAX_DEFAULT_GROUP_SIZE = 64


def valid_group_sizes(config: ModelConfig) -> list[int]:
    """Group sizes that divide every quantized row length: dim (= n_heads * head_dim) and hidden_dim.

    A group never straddles two rows, so any row or column slice of a matrix
    (a worker's shard) still holds whole groups when cut on group boundaries.
    """
    common = gcd(config.dim, config.hidden_dim)
    return [size for size in range(1, common + 1) if common % size == 0]


def cuttable_worker_counts(config: ModelConfig, group_size: int) -> list[int]:
    """Worker counts 1..n_heads whose cuts keep every group of `group_size` whole: each worker's
    first head starts a group (wo's columns are cut at head boundaries) and the FFN has a group
    per worker (w2's columns are cut in whole groups)."""
    return [n for n in range(1, config.n_heads + 1)
            if config.hidden_dim // group_size >= n
            and all(start * config.head_dim % group_size == 0 for start, _ in split_evenly(config.n_heads, n))]


def default_group_size(config: ModelConfig) -> int:
    """The largest valid group size not above 64 (llama2.c's default) that every worker count up
    to n_heads can cut (so it divides head_dim); 1 always can."""
    every = list(range(1, config.n_heads + 1))
    return max((size for size in valid_group_sizes(config)
               if size <= MAX_DEFAULT_GROUP_SIZE and cuttable_worker_counts(config, size) == every), default=1)


def group_size_problem(config: ModelConfig, group_size: int) -> str | None:
    """Why `group_size` cannot be used with `config`, or None if it can."""
    if group_size <= 0:
        return f"group_size must be positive, got {group_size}"
    for name in ("dim", "hidden_dim"):
        length = getattr(config, name)
        if length % group_size:
            return f"group_size {group_size} does not divide {name} {length}"
    return None


def check_group_size(config: ModelConfig, group_size: int) -> None:
    """Raise ConfigError naming the allowed values when `group_size` is unusable."""
    problem = group_size_problem(config, group_size)
    if problem:
        allowed = ", ".join(str(size) for size in valid_group_sizes(config))
        raise ConfigError(f"{problem}; allowed group sizes: {allowed}")


def quantize_q80(w: np.ndarray, group_size: int) -> GroupedQ8Matrix:
    """(rows, cols) float -> Q8_0, computed in float32 like llama2.c's export.py quantize_q80."""
    return GroupedQ8Matrix.from_float(w, {"group_size": group_size})


def as_float32(tensor) -> np.ndarray:
    """A float32 array for a Matrix of any storage (dequantized) or a vector."""
    if isinstance(tensor, Matrix):
        return tensor.dequantize()
    return np.asarray(tensor, dtype=np.float32)
