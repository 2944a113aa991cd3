"""Which float order a SliceModel's step rounds in: one op set, chosen once at load from the
weights' storage (`choose_numerics`), used by every step of the single-process engine and of
every worker alike.

- NumpyOps, the default: common/model/ops.py (numpy's pairwise sums, BLAS attention, a RoPE
  table), fast and within float32 rounding of run.c.
- RunqOps, for a llama2.c version 2 file (every matrix a GroupedQ8Matrix): runq.c's own order
  and rounding (common/kernels' runq_* ops: sums left to right, glibc's expf/cosf/sinf/powf,
  RoPE angles per position), so the engine's greedy text is runq.c's token for token.

Each op set also says how a row-parallel product (wo, w2: `Y = sum_w X_w A_w^T`) is split into
what a worker computes (`partial`), how partials add up in worker order (`fold`), and how the
step's all-reduce makes the product of them (`reduce`). NumpyOps sends the worker's product
through one all-reduce. runq.c adds its groups of columns left to right, which a sum of
per-worker products would regroup; so RunqOps' partial is the terms runq.c adds for this worker's
groups, (T, rows, G_local) with G_local = its columns / group_size, and `reduce` carries one
running sum down the workers in index order (which is group order): at sync w worker w folds its
terms into the sum so far and every other worker sends zeros (s + 0 = s), so after `count` syncs
every worker holds runq.c's bits. The all-reduce still carries (T, rows) arrays, which every
exchange (shm, peers, star, the tests' threads) carries; the price is count - 1 extra syncs per
product, which `syncs_per_product` reports (the coordinator's star relay and the bench count them).
"""

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

import llmtp.common.kernels as kernels

from .config import ModelConfig
from .matrices import Matrix
from .ops import apply_rope, attention, rmsnorm, rope_rotations, silu
from .q8_grouped import GroupedQ8Matrix
from .split import SliceSpec
from .weights import ShardWeights

OneSequenceAttention = Callable[[np.ndarray, np.ndarray, np.ndarray, int], np.ndarray]


def attend_each(attention: OneSequenceAttention, q: np.ndarray, k: np.ndarray, v: np.ndarray, keys: np.ndarray,
                values: np.ndarray, sequences: Sequence) -> np.ndarray:
    """A step's attention one sequence at a time: its keys and values into its slot of the layer's
    cache (keys, values: (n_slots, n_kv_local, seq_len, D)), then `attention` of its queries.
    q (T, H_local, D), k and v (T, n_kv_local, D), sequences (StepSequence) in row order."""
    heads_out = np.empty_like(q)
    row = 0
    for seq in sequences:
        rows = slice(row, row + seq.n_tokens)
        end = seq.start_position + seq.n_tokens
        cached_keys, cached_values = keys[seq.slot], values[seq.slot]  # (n_kv_local, seq_len, D)
        cached_keys[:, seq.start_position:end] = k[rows].transpose(1, 0, 2)
        cached_values[:, seq.start_position:end] = v[rows].transpose(1, 0, 2)
        heads_out[rows] = attention(q[rows], cached_keys, cached_values, seq.start_position)
        row += seq.n_tokens
    return heads_out


def split_qkv(qkv: np.ndarray, n_heads: int, n_kv: int, head_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One product's (T, (n_heads + 2 n_kv) D) rows -> q (T, n_heads, D), k and v (T, n_kv, D), views."""
    n_tokens, q_cols, kv_cols = qkv.shape[0], n_heads * head_dim, n_kv * head_dim
    return (qkv[:, :q_cols].reshape(n_tokens, n_heads, head_dim),
            qkv[:, q_cols:q_cols + kv_cols].reshape(n_tokens, n_kv, head_dim),
            qkv[:, q_cols + kv_cols:].reshape(n_tokens, n_kv, head_dim))


def rope_then_attend(ops, qkv: np.ndarray, keys: np.ndarray, values: np.ndarray, sequences: Sequence,
                     positions: np.ndarray) -> np.ndarray:
    """An op set's rope() on q and k of one product's rows (T, (H_local + 2 n_kv_local) D), then its
    attend(): (T, H_local, D)."""
    q, k, v = split_qkv(qkv, ops.kv_of_head.size, keys.shape[1], ops.config.head_dim)
    return ops.attend(ops.rope(q, positions), ops.rope(k, positions), v, keys, values, sequences, positions)


def token_slots(sequences: Sequence) -> np.ndarray:
    """(T,) int32: the cache slot of each row's sequence."""
    if len(sequences) == 1:  # decode's usual step: np.repeat's lists cost 7 us of every layer
        return np.full(sequences[0].n_tokens, sequences[0].slot, dtype=np.int32)
    return np.repeat(np.array([s.slot for s in sequences], dtype=np.int32), [s.n_tokens for s in sequences])


def kv_head_of_each_head(spec: SliceSpec, config: ModelConfig) -> np.ndarray:
    """(n_heads_local,) int32: the local kv head each local query head reads."""
    kv_of_head = np.empty(spec.n_heads_local, dtype=np.int32)
    for kv_local, first_head, stop_head in spec.kv_groups(config):
        kv_of_head[first_head:stop_head] = kv_local
    return kv_of_head

RUNQ_STORAGE = GroupedQ8Matrix.type_tag  # llama2.c version 2: every matrix int8 in groups


@dataclass(frozen=True)
class NumpyOps:
    """common/model/ops.py's arithmetic, with a step's attention in C where the float32 kernels run
    (kernels.attend: one call per layer for every sequence, not one numpy call per sequence; 12 of
    a 54 ms 110M step of 8 decoding sequences went to those). kv_groups: (local kv head, first,
    stop local query head)."""

    config: ModelConfig
    kv_groups: tuple[tuple[int, int, int], ...]
    kv_of_head: np.ndarray = field(repr=False)  # (n_heads_local,) int32
    rotations: np.ndarray = field(repr=False)  # (seq_len, head_dim / 2) complex64
    heads_per_kv_head: int | None  # set when every local kv head serves as many query heads

    name = "numpy"

    syncs_per_product = 1

    @classmethod
    def for_slice(cls, config: ModelConfig, spec: SliceSpec) -> "NumpyOps":
        kv_groups = tuple(spec.kv_groups(config))
        return cls(config, kv_groups, kv_head_of_each_head(spec, config),
                   rope_rotations(config.seq_len, config.head_dim, config.rope_theta), _uniform_group_size(kv_groups))

    def rmsnorm(self, x: np.ndarray, weight: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if kernels.has_numpy_steps():  # the same bits in one call
            return kernels.rmsnorm(x, weight, self.config.norm_eps, out=out)
        return rmsnorm(x, weight, self.config.norm_eps, out=out)

    def rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """x: (T, H, D) -> rotated (T, H, D)."""
        return apply_rope(x, self.rotations[positions])

    def attend(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, keys: np.ndarray, values: np.ndarray,
               sequences: Sequence, positions: np.ndarray) -> np.ndarray:
        """A step's k, v into the layer's cache (n_slots, n_kv_local, seq_len, D), then every
        sequence's attention: (T, H_local, D). positions: (T,) each row's position."""
        if not kernels.has_f32_kernel():
            return attend_each(self.attention, q, k, v, keys, values, sequences)
        return kernels.attend(q, k, v, keys, values, self.kv_of_head, token_slots(sequences), positions)

    def attend_qkv(self, qkv: np.ndarray, keys: np.ndarray, values: np.ndarray, sequences: Sequence,
                   positions: np.ndarray) -> np.ndarray:
        """rope() on q and k of one product's rows (T, (H_local + 2 n_kv_local) D), then attend():
        (T, H_local, D). In C in one call where the kernels run (the same bits)."""
        if kernels.has_f32_kernel() and qkv.flags.c_contiguous and qkv.flags.writeable:
            return kernels.attend_qkv(qkv, self.kv_of_head.size, self.rotations, keys, values, self.kv_of_head,
                                      token_slots(sequences), positions)
        return rope_then_attend(self, qkv, keys, values, sequences, positions)

    def attention(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray, start_position: int) -> np.ndarray:
        """numpy's attention (where the C kernels do not run). q: (T, H_local, D) of one sequence at start_position..; keys, values: its slot's cache
        (n_kv_local, seq_len, D). Returns (T, H_local, D)."""
        n_tokens, head_dim = q.shape[0], q.shape[2]
        end = start_position + n_tokens
        keys, values = keys[:, :end], values[:, :end]
        if self.heads_per_kv_head:  # every kv head serves as many query heads: one batched call
            n_kv, group = keys.shape[0], self.heads_per_kv_head
            q_grouped = q.transpose(1, 0, 2).reshape(n_kv, group, n_tokens, head_dim)
            out = attention(q_grouped, keys, values, start_position)
            return out.reshape(-1, n_tokens, head_dim).transpose(1, 0, 2)
        heads_out = np.empty_like(q)  # a cut through a group left uneven groups: one call per kv head
        for kv_local, first_head, stop_head in self.kv_groups:
            out = attention(q[:, first_head:stop_head].transpose(1, 0, 2), keys[kv_local], values[kv_local],
                            start_position)
            heads_out[:, first_head:stop_head] = out.transpose(1, 0, 2)
        return heads_out

    def swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """silu(gate) * up, (T, hidden_local)."""
        out = silu(gate)
        out *= up
        return out

    def partial(self, x: np.ndarray, weight: Matrix) -> np.ndarray:
        """This worker's share of a row-parallel product (weight: its columns of the matrix)."""
        return weight.matmul(x)

    def fold(self, partial: np.ndarray, running: np.ndarray | None) -> np.ndarray:
        """The sum of the workers' partials so far with this one added: (T, rows)."""
        return partial if running is None else running + partial

    def reduce(self, partial: np.ndarray, allreduce: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """This worker's `partial` -> the product (T, rows), summed over every worker."""
        return allreduce(partial)


@dataclass(frozen=True)
class RunqOps:
    """runq.c's arithmetic (kernels.runq_*). kv_of_head: the local kv head of each local query head."""

    config: ModelConfig
    kv_of_head: np.ndarray = field(repr=False)
    worker: tuple[int, int] | None  # (index, count) when the slice is a part: products go by group terms

    name = "runq"

    @classmethod
    def for_slice(cls, config: ModelConfig, spec: SliceSpec) -> "RunqOps":
        kv_of_head = kv_head_of_each_head(spec, config)
        # one slice holding every head and FFN unit: its product already adds every group in
        # order (runq.c's matmul), so the per-group terms would only cost time
        whole = spec.heads == (0, config.n_heads) and spec.hidden == (0, config.hidden_dim)
        return cls(config, kv_of_head, None if whole else (spec.index, spec.count))

    @property
    def syncs_per_product(self) -> int:
        return 1 if self.worker is None else self.worker[1]

    def rmsnorm(self, x: np.ndarray, weight: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return kernels.runq_rmsnorm(x, weight, self.config.norm_eps, out=out)

    def rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return kernels.runq_rope(np.array(x, dtype=np.float32, order="C"), positions, self.config.rope_theta)

    def attend(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, keys: np.ndarray, values: np.ndarray,
               sequences: Sequence, positions: np.ndarray) -> np.ndarray:
        return attend_each(self.attention, q, k, v, keys, values, sequences)

    def attend_qkv(self, qkv: np.ndarray, keys: np.ndarray, values: np.ndarray, sequences: Sequence,
                   positions: np.ndarray) -> np.ndarray:
        """rope() on q and k of one product's rows (T, (H_local + 2 n_kv_local) D), then attend()."""
        return rope_then_attend(self, qkv, keys, values, sequences, positions)

    def attention(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray, start_position: int) -> np.ndarray:
        positions = np.arange(start_position, start_position + q.shape[0])
        return kernels.runq_attention(q, keys, values, self.kv_of_head, positions)

    def swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return kernels.runq_swiglu(np.array(gate, dtype=np.float32, order="C"), up)

    def partial(self, x: np.ndarray, weight: Matrix) -> np.ndarray:
        """(T, rows, G_local): runq.c's terms of this worker's groups (a whole slice: its product)."""
        if self.worker is None:
            return weight.matmul(x)
        return weight.group_terms(x, 0, weight.shape[1])

    def fold(self, partial: np.ndarray, running: np.ndarray | None) -> np.ndarray:
        """runq.c's running sum carried on over this worker's groups: (T, rows)."""
        if self.worker is None:
            return partial
        return kernels.runq_ordered_sum(partial, running)

    def reduce(self, partial: np.ndarray, allreduce: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """runq.c's running sum over the groups of every worker, carried worker by worker: one
        all-reduce per worker, in which only that worker sends anything but zeros."""
        if self.worker is None:
            return allreduce(partial)
        index, count = self.worker
        running = None  # the sum of the groups of workers 0..w-1 (runq.c starts from 0.0f)
        nothing = np.zeros(partial.shape[:-1], dtype=np.float32)
        for worker in range(count):
            running = allreduce(self.fold(partial, running) if worker == index else nothing)
        return running


Numerics = NumpyOps | RunqOps


def storage_numerics(weights: ShardWeights) -> type[NumpyOps] | type[RunqOps]:
    """RunqOps when every matrix is stored as llama2.c version 2 stores it, else NumpyOps."""
    matrices = [weights.classifier] + [getattr(layer, name) for layer in weights.layers
                                       for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")]
    return RunqOps if {matrix.type_tag for matrix in matrices} == {RUNQ_STORAGE} else NumpyOps


def choose_numerics(config: ModelConfig, spec: SliceSpec, weights: ShardWeights) -> Numerics:
    return storage_numerics(weights).for_slice(config, spec)


def _uniform_group_size(kv_groups) -> int | None:
    """The number of query heads per kv head when every local kv head g serves the same
    number of consecutive local query heads starting at g * that number, else None."""
    size = kv_groups[0][2] - kv_groups[0][1]
    uniform = all(first == kv_local * size and stop - first == size for kv_local, first, stop in kv_groups)
    return size if uniform else None
