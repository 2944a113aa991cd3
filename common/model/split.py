"""How the model is cut across workers: each worker's share of heads, FFN units and vocabulary.

Which tensor is cut along which axis, in which unit, is the tensor table's (common/model/
tensors.py); SPLIT_TABLE is that rule as a name -> (axis, unit) map of the tensors in shards.
"""

from dataclasses import dataclass

from .config import ModelConfig
from llmtp.common.errors import ConfigError
from .tensors import SHARD_TENSORS

# name -> (axis cut, what the cut is measured in). Axis 0 = rows (outputs), 1 = columns (inputs).
SPLIT_TABLE = {info.name: (info.cut_axis, info.cut_unit) for info in SHARD_TENSORS}


@dataclass(frozen=True)
class SliceSpec:
    """The share of one worker, as [start, stop) ranges of global indices.

    `layers` is the range of layers it runs: every layer for now (tensor parallelism only);
    a pipeline stage will hold a part of them."""

    index: int
    count: int
    heads: tuple[int, int]
    kv_heads: tuple[int, int]
    hidden: tuple[int, int]
    vocab: tuple[int, int]
    layers: tuple[int, int]

    @property
    def n_layers_local(self) -> int:
        return self.layers[1] - self.layers[0]

    @property
    def n_heads_local(self) -> int:
        return self.heads[1] - self.heads[0]

    @property
    def n_kv_heads_local(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def hidden_local(self) -> int:
        return self.hidden[1] - self.hidden[0]

    @property
    def vocab_local(self) -> int:
        return self.vocab[1] - self.vocab[0]

    def kv_groups(self, config: ModelConfig) -> list[tuple[int, int, int]]:
        """(local kv head, first local query head, stop) for each local kv head:
        the contiguous run of this worker's query heads that reads that kv head."""
        groups = []
        for kv_local in range(self.n_kv_heads_local):
            kv_global = self.kv_heads[0] + kv_local
            first = max(kv_global * config.kv_mul, self.heads[0])
            stop = min((kv_global + 1) * config.kv_mul, self.heads[1])
            groups.append((kv_local, first - self.heads[0], stop - self.heads[0]))
        return groups

    def unit_range(self, unit: str) -> tuple[int, int]:
        """The [start, stop) range of `unit` ("heads", "kv_heads", "hidden", "vocab", "layers")."""
        return getattr(self, unit)

    def to_dict(self) -> dict:
        return {"index": self.index, "count": self.count, "heads": list(self.heads),
                "kv_heads": list(self.kv_heads), "hidden": list(self.hidden), "vocab": list(self.vocab),
                "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, data: dict, n_layers: int) -> "SliceSpec":
        """`n_layers`: the model's, the layer range of a spec written before specs named one."""
        layers = tuple(data["layers"]) if "layers" in data else (0, n_layers)
        return cls(index=data["index"], count=data["count"], heads=tuple(data["heads"]),
                   kv_heads=tuple(data["kv_heads"]), hidden=tuple(data["hidden"]), vocab=tuple(data["vocab"]),
                   layers=layers)


def split_evenly(total: int, parts: int, granule: int = 1) -> list[tuple[int, int]]:
    """Cut range(total) into `parts` contiguous ranges whose sizes differ by at most one
    granule, larger ones first (6 over 4 -> 2, 2, 1, 1). Boundaries fall on multiples of
    `granule` (the int8 group size keeps quantized rows whole)."""
    assert total % granule == 0, f"{total} is not a multiple of granule {granule}"
    n_granules = total // granule
    base, extra = divmod(n_granules, parts)
    ranges, start = [], 0
    for part in range(parts):
        size = (base + (1 if part < extra else 0)) * granule
        ranges.append((start, start + size))
        start += size
    return ranges


def full_slice(config: ModelConfig) -> SliceSpec:
    """The one-worker share: everything."""
    return plan_split(config, 1)[0]


def plan_split(config: ModelConfig, n_workers: int, group_size: int = 1) -> list[SliceSpec]:
    """Each worker's heads, kv heads, FFN units and vocabulary rows.

    A worker holds every kv head its query heads read, so when n_workers exceeds
    n_kv_heads (or cuts a group) a kv head is replicated on several workers.
    """
    if not 1 <= n_workers <= config.n_heads:
        raise ConfigError(f"--workers must be between 1 and n_heads={config.n_heads}, got {n_workers}")
    if config.hidden_dim // group_size < n_workers:
        raise ConfigError(f"hidden_dim {config.hidden_dim} in groups of {group_size} cannot be cut "
                          f"into {n_workers} parts")
    head_ranges = split_evenly(config.n_heads, n_workers)
    hidden_ranges = split_evenly(config.hidden_dim, n_workers, group_size)
    vocab_ranges = split_evenly(config.vocab_size, n_workers)
    specs = []
    for index in range(n_workers):
        first_head, stop_head = head_ranges[index]
        kv_heads = (first_head // config.kv_mul, (stop_head - 1) // config.kv_mul + 1)
        specs.append(SliceSpec(index=index, count=n_workers, heads=head_ranges[index], kv_heads=kv_heads,
                               hidden=hidden_ranges[index], vocab=vocab_ranges[index],
                               layers=(0, config.n_layers)))
    return specs
