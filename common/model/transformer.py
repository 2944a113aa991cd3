"""One worker's share of the Llama-2 forward pass; the whole model when it is the only one.

The step reads top to bottom like run.c's forward(), except that the two sums of
row-parallel outputs (after wo, after w2) go through `allreduce`: the identity for
one process, a round trip to the coordinator for a worker. Its arithmetic is one op set
(common/model/numerics.py) chosen at load from the weights' storage: numpy's, or runq.c's
for a llama2.c version 2 file.
"""

import mmap
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .blas_threads import BlasThreads
from .config import ModelConfig
from llmtp.common.errors import ProtocolError
from .matrices import Matrix, stack_rows
from .numerics import choose_numerics
from .split import SliceSpec
from .weights import ShardWeights

AllReduce = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class StepSequence:
    """One sequence's part of a step: `n_tokens` rows of the step's input, placed at
    positions start_position.. of KV-cache slot `slot`."""

    slot: int
    start_position: int
    n_tokens: int


def no_reduce(partial: np.ndarray) -> np.ndarray:
    return partial


MAX_NORM_BUFFERS = 4  # step sizes whose norm buffers are kept (decode's 1 row, the last prefills)

# Each layer ends its attention (after wo) and its FFN (after w2) in a sum over workers.
SYNCS_PER_LAYER = 2


def syncs_per_step(n_layers: int, syncs_per_product: int = 1) -> int:
    """How many all-reduces one step of `n_layers` layers makes (SliceModel.forward's count);
    syncs_per_product: the numerics' (a v2 file's op set carries runq.c's sum over the workers)."""
    return SYNCS_PER_LAYER * n_layers * syncs_per_product


def small_page_zeros(shape: tuple[int, ...]) -> np.ndarray:
    """float32 zeros on an anonymous map of ordinary pages. np.zeros asks the kernel for 2 MiB
    pages on anything from 4 MiB (MADV_HUGEPAGE), and with THP defrag on "madvise" each first
    write to such a page may compact memory first: a step's first writes to the cache (one
    page per head and layer) took ~100 ms of a 5-token prompt's first step, for no later gain
    (attention reads the cache in long sequential runs)."""
    n_bytes = int(np.prod(shape)) * np.dtype(np.float32).itemsize
    if n_bytes == 0:
        return np.zeros(shape, dtype=np.float32)
    return np.frombuffer(mmap.mmap(-1, n_bytes, flags=mmap.MAP_PRIVATE), dtype=np.float32).reshape(shape)


class KVCache:
    """Keys and values of this worker's kv heads: (n_layers, n_slots, n_kv_heads_local, seq_len, head_dim).

    Pages are mapped lazily, so resident memory grows with the positions used."""

    def __init__(self, n_layers: int, n_slots: int, n_kv_heads_local: int, seq_len: int, head_dim: int):
        shape = (n_layers, n_slots, n_kv_heads_local, seq_len, head_dim)
        self.keys = small_page_zeros(shape)
        self.values = small_page_zeros(shape)

    @property
    def n_slots(self) -> int:
        return self.keys.shape[1]

    @property
    def n_bytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class SliceModel:
    def __init__(self, config: ModelConfig, spec: SliceSpec, weights: ShardWeights, n_slots: int = 1):
        self.config = config
        self.spec = spec
        self.weights = weights
        assert len(weights.layers) == spec.n_layers_local, (len(weights.layers), spec.layers)
        self.cache = KVCache(spec.n_layers_local, n_slots, spec.n_kv_heads_local, config.seq_len, config.head_dim)
        self.numerics = choose_numerics(config, spec, weights)  # numpy's float order, or runq.c's
        self.syncs_per_step = syncs_per_step(spec.n_layers_local, self.numerics.syncs_per_product)
        # q, k, v and then w1, w3 as one product each where their storage lies back to back
        self.stacked_qkv = [stack_rows([layer.wq, layer.wk, layer.wv]) for layer in weights.layers]
        self.stacked_w13 = [stack_rows([layer.w1, layer.w3]) for layer in weights.layers]
        self.blas_threads = BlasThreads()  # one busy core must not cost more than its share
        self.blas_threads.warm_up(config.dim, max(config.dim, config.hidden_dim))  # the first prefill as the later ones
        self.norm_buffers: dict[int, np.ndarray] = {}  # step rows -> rmsnorm output (norm_buffer)

    def forward(self, x: np.ndarray, sequences: Sequence[StepSequence], allreduce: AllReduce = no_reduce,
                all_logits: bool = False) -> np.ndarray:
        """x: (T, dim) embeddings of the step's tokens, sequences in row order.

        Returns this worker's logits slice, (n_sequences, vocab_local) for each
        sequence's last token, or (T, vocab_local) with all_logits."""
        self.check_sequences(sequences, x.shape[0])
        with self.blas_threads.step(x.shape[0]):
            return self._forward(x, sequences, allreduce, all_logits)

    def _forward(self, x: np.ndarray, sequences: Sequence[StepSequence], allreduce: AllReduce,
                 all_logits: bool) -> np.ndarray:
        positions = np.concatenate([np.arange(s.start_position, s.start_position + s.n_tokens)
                                    for s in sequences])
        x = np.array(x, dtype=np.float32)  # the residual stream, added to in place (the input may be read-only)
        for layer_index in range(self.spec.n_layers_local):  # indices into this slice's layers
            x += self.numerics.reduce(self.attention_partial(layer_index, x, sequences, positions), allreduce)
            x += self.numerics.reduce(self.ffn_partial(layer_index, x), allreduce)
        if not all_logits:
            last_rows = np.cumsum([s.n_tokens for s in sequences]) - 1
            x = x[last_rows]
        x = self.numerics.rmsnorm(x, self.weights.final_norm)
        return self.matmul(x, self.weights.classifier)

    def attention_partial(self, layer_index: int, x: np.ndarray, sequences: Sequence[StepSequence],
                          positions: np.ndarray) -> np.ndarray:
        """This worker's heads' contribution to the attention output, before the sum over workers
        (numerics.reduce makes it the output)."""
        layer = self.weights.layers[layer_index]
        n_tokens = x.shape[0]
        h = self.numerics.rmsnorm(x, layer.attn_norm, out=self.norm_buffer(n_tokens))
        wqkv = self.stacked_qkv[layer_index]
        if wqkv is not None:  # one product for q, k and v
            qkv = wqkv.matmul(h)
        else:
            qkv = np.concatenate([self.matmul(h, layer.wq), self.matmul(h, layer.wk), self.matmul(h, layer.wv)], axis=1)
        heads_out = self.numerics.attend_qkv(qkv, self.cache.keys[layer_index], self.cache.values[layer_index],
                                             sequences, positions)  # (T, n_heads_local, head_dim)
        return self.numerics.partial(heads_out.reshape(n_tokens, -1), layer.wo)

    def ffn_partial(self, layer_index: int, x: np.ndarray) -> np.ndarray:
        """SwiGLU over this worker's FFN units, before the sum over workers (numerics.reduce makes
        it the output)."""
        layer = self.weights.layers[layer_index]
        h = self.numerics.rmsnorm(x, layer.ffn_norm, out=self.norm_buffer(x.shape[0]))
        w13 = self.stacked_w13[layer_index]
        if w13 is not None:  # one product for both halves of SwiGLU
            both = w13.matmul(h)
            hidden = layer.w1.shape[0]
            gate = self.numerics.swiglu(both[:, :hidden], both[:, hidden:])
        else:
            gate = self.numerics.swiglu(self.matmul(h, layer.w1), self.matmul(h, layer.w3))
        return self.numerics.partial(gate, layer.w2)

    def norm_buffer(self, n_rows: int) -> np.ndarray:
        """Where a layer's normed input goes: one array per step size, reused by every layer of
        every step (products read it before the next norm writes it)."""
        buffer = self.norm_buffers.get(n_rows)
        if buffer is None:
            if len(self.norm_buffers) >= MAX_NORM_BUFFERS:  # prefills of many lengths: keep the last few
                self.norm_buffers.pop(next(iter(self.norm_buffers)))
            buffer = self.norm_buffers[n_rows] = np.empty((n_rows, self.config.dim), dtype=np.float32)
        return buffer

    def matmul(self, x: np.ndarray, weight: Matrix) -> np.ndarray:
        return weight.matmul(x)

    def check_sequences(self, sequences: Sequence[StepSequence], n_rows: int) -> None:
        """Reject a step that would index outside the cache (it may come off the network)."""
        if not sequences:
            raise ProtocolError("step has no sequences")
        if sum(s.n_tokens for s in sequences) != n_rows:
            raise ProtocolError(f"step sequences cover {sum(s.n_tokens for s in sequences)} tokens, "
                                f"input has {n_rows} rows")
        for seq in sequences:
            if not 0 <= seq.slot < self.cache.n_slots:
                raise ProtocolError(f"slot {seq.slot} out of range 0..{self.cache.n_slots - 1}")
            if seq.n_tokens < 1 or seq.start_position < 0 or \
                    seq.start_position + seq.n_tokens > self.config.seq_len:
                raise ProtocolError(f"positions {seq.start_position}..{seq.start_position + seq.n_tokens - 1} "
                                    f"outside the context 0..{self.config.seq_len - 1}")

