"""One layer's attention for a whole step in C (kernels.attend, the float32 op set's where AVX2
runs) and numpy's per-sequence loop (numerics.attend_each, elsewhere), both against causal
attention in float64; and what batching relies on: a query gets the same bits whatever else the
step holds (other sequences, a prefill chunk of any size, any thread count)."""

import numpy as np
import pytest

from llmtp.common import kernels
from llmtp.common.model.numerics import attend_each
from llmtp.common.model.ops import attention
from llmtp.common.model.transformer import StepSequence

needs_c = pytest.mark.skipif(not kernels.has_f32_kernel(), reason=f"no AVX2 kernels here ({kernels.backend_info()})")

# (n_heads, n_kv, head_dim): a 110M layer's, grouped queries, head_dim below one vector, not a
# multiple of 8, one lane
HEADS = [(12, 12, 64), (8, 4, 8), (6, 2, 13), (4, 1, 24), (1, 1, 1), (3, 3, 130)]


def float64_attention(q, keys, values, kv_of_head, token_slots, token_positions):
    """softmax(q . k / sqrt(D)) v over positions 0..position, in float64, from the filled cache."""
    tokens, n_heads, head_dim = q.shape
    out = np.zeros((tokens, n_heads, head_dim))
    for t in range(tokens):
        seen = token_positions[t] + 1
        for h in range(n_heads):
            k = keys[token_slots[t], kv_of_head[h], :seen].astype(np.float64)
            v = values[token_slots[t], kv_of_head[h], :seen].astype(np.float64)
            scores = k @ q[t, h].astype(np.float64) / np.sqrt(head_dim)
            weights = np.exp(scores - scores.max())
            out[t, h] = (weights / weights.sum()) @ v
    return out


def step_of(rng, sequences, n_heads, n_kv, head_dim, n_slots=3, seq_len=70):
    """A cache with earlier positions filled, and the step's q, k, v for `sequences`."""
    keys = (rng.standard_normal((n_slots, n_kv, seq_len, head_dim)) * 2).astype(np.float32)
    values = rng.standard_normal(keys.shape).astype(np.float32)
    tokens = sum(s.n_tokens for s in sequences)
    q = (rng.standard_normal((tokens, n_heads, head_dim)) * 2).astype(np.float32)
    k = rng.standard_normal((tokens, n_kv, head_dim)).astype(np.float32)
    v = rng.standard_normal((tokens, n_kv, head_dim)).astype(np.float32)
    kv_of_head = (np.arange(n_heads) * n_kv // n_heads).astype(np.int32)
    token_slots = np.repeat([s.slot for s in sequences], [s.n_tokens for s in sequences]).astype(np.int32)
    positions = np.concatenate([np.arange(s.start_position, s.start_position + s.n_tokens) for s in sequences])
    return q, k, v, keys, values, kv_of_head, token_slots, positions.astype(np.int32)


# decode of three slots, a prefill from 0 beside a decode, a prefill chunk at position 40, position 0 alone
STEPS = [
    [StepSequence(0, 17, 1), StepSequence(1, 63, 1), StepSequence(2, 5, 1)],
    [StepSequence(2, 0, 9), StepSequence(0, 30, 1)],
    [StepSequence(1, 40, 21)],
    [StepSequence(0, 0, 1)],
]


def bound(values, positions):
    """float32 rounding of a softmax-weighted mean of up to P value rows: a few units of 2^-24
    per term (score, exp within 2 units, weight, sum), relative to the largest |value|."""
    return 4 * (positions.max() + 1 + 16) * 2.0 ** -24 * np.abs(values).max()


@needs_c
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "h{}kv{}d{}".format(*h))
@pytest.mark.parametrize("sequences", STEPS, ids=["decode", "prefill+decode", "chunk", "first"])
def test_c_attention_matches_float64(heads, sequences):
    rng = np.random.default_rng(hash((heads, len(sequences))) % 2 ** 32)
    q, k, v, keys, values, kv_of_head, token_slots, positions = step_of(rng, sequences, *heads)
    out = kernels.attend(q, k, v, keys, values, kv_of_head, token_slots, positions, n_threads=2)
    for t in range(len(positions)):  # the step's keys and values went into the cache first
        np.testing.assert_array_equal(keys[token_slots[t], :, positions[t]], k[t])
        np.testing.assert_array_equal(values[token_slots[t], :, positions[t]], v[t])
    expected = float64_attention(q, keys, values, kv_of_head, token_slots, positions)
    assert np.abs(out - expected).max() <= bound(values, positions)


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "h{}kv{}d{}".format(*h))
@pytest.mark.parametrize("sequences", STEPS, ids=["decode", "prefill+decode", "chunk", "first"])
def test_numpy_attention_matches_float64(heads, sequences):
    rng = np.random.default_rng(hash((heads, len(sequences), "numpy")) % 2 ** 32)
    q, k, v, keys, values, kv_of_head, token_slots, positions = step_of(rng, sequences, *heads)
    n_heads = heads[0]

    def one_sequence(q_rows, cached_keys, cached_values, start):  # NumpyOps.attention's per kv head calls
        out = np.empty_like(q_rows)
        for head in range(n_heads):
            out[:, head] = attention(q_rows[:, head][None], cached_keys[kv_of_head[head]][None, :start + len(q_rows)],
                                     cached_values[kv_of_head[head]][None, :start + len(q_rows)], start)[0]
        return out

    out = attend_each(one_sequence, q, k, v, keys, values, sequences)
    expected = float64_attention(q, keys, values, kv_of_head, token_slots, positions)
    assert np.abs(out - expected).max() <= bound(values, positions)


@needs_c
def test_a_query_gets_the_same_bits_alone_batched_and_in_any_chunk():
    rng = np.random.default_rng(11)
    n_heads, n_kv, head_dim = 6, 2, 40
    sequences = [StepSequence(0, 0, 33), StepSequence(1, 12, 1), StepSequence(2, 50, 1)]
    q, k, v, keys, values, kv_of_head, token_slots, positions = step_of(rng, sequences, n_heads, n_kv, head_dim)
    start_keys, start_values = keys.copy(), values.copy()
    together = kernels.attend(q, k, v, keys, values, kv_of_head, token_slots, positions, n_threads=2)
    # the prefill of slot 0 in chunks of 1, 5 and 27 tokens, one thread; the decodes alone
    keys[:], values[:] = start_keys, start_values
    pieces = []
    for first, stop in ((0, 1), (1, 6), (6, 33), (33, 34), (34, 35)):
        rows = slice(first, stop)
        pieces.append(kernels.attend(q[rows], k[rows], v[rows], keys, values, kv_of_head, token_slots[rows],
                                     positions[rows], n_threads=1))
    np.testing.assert_array_equal(np.concatenate(pieces), together)


@needs_c
@pytest.mark.parametrize("change", ["slot", "position", "kv head", "k shape", "read-only cache", "float64 q"])
def test_bad_calls_raise_value_error(change):
    """Indices reach the kernel from a step that may come off the network: each is checked in C
    too, never read past the cache."""
    rng = np.random.default_rng(3)
    q, k, v, keys, values, kv_of_head, token_slots, positions = step_of(rng, [StepSequence(1, 4, 2)], 4, 2, 8)
    if change == "slot":
        token_slots[1] = 3
    elif change == "position":
        positions[1] = 70
    elif change == "kv head":
        kv_of_head[0] = -1
    elif change == "k shape":
        k = k[:, :1]
    elif change == "read-only cache":
        keys.flags.writeable = False
    else:
        q = q.astype(np.float64)
    with pytest.raises(ValueError):
        kernels.attend(q, k, v, keys, values, kv_of_head, token_slots, positions)
