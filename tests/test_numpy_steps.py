"""The float32 op set's steps moved into C with numpy's bits (kernels.rmsnorm, kernels.attend_qkv)
and the products checked once (kernels.F32Product, BlockProduct): each against what it replaces
(ops.rmsnorm's numpy calls; RoPE in float64 and then kernels.attend; matmul on every backend)."""

import numpy as np
import pytest

from llmtp.common import kernels
from llmtp.common.model import ops
from llmtp.common.model.gguf_blocks import Q4_0Matrix, Q4_1Matrix, Q8_0Matrix
from llmtp.common.model.matrices import F32Matrix, F32RowStack
from llmtp.common.model.q8_grouped import GroupedQ8Matrix
from llmtp.common.model.transformer import StepSequence

from test_attend import STEPS, step_of

needs_c = pytest.mark.skipif(not kernels.has_f32_kernel(), reason=f"no AVX2 kernels here ({kernels.backend_info()})")
needs_steps = pytest.mark.skipif(not kernels.has_numpy_steps(), reason=f"no C extension ({kernels.backend_info()})")

# a 110M row; fewer than 8 values; the pairwise sum's cases: one block of 8, up to 128 with a tail,
# one split, several splits with tails
DIMS = [768, 1, 5, 8, 100, 128, 129, 288, 1000, 4099]


@needs_steps
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_rmsnorm_has_numpys_bits(dim, tokens):
    rng = np.random.default_rng(dim * 10 + tokens)
    x = (rng.standard_normal((tokens, dim)) * rng.uniform(1e-3, 1e3, (tokens, 1))).astype(np.float32)
    weight = rng.standard_normal(dim).astype(np.float32)
    expected = ops.rmsnorm(x, weight, 1e-5)
    np.testing.assert_array_equal(kernels.rmsnorm(x, weight, 1e-5), expected)
    in_place = x.copy()
    assert kernels.rmsnorm(in_place, weight, 1e-5, out=in_place) is in_place
    np.testing.assert_array_equal(in_place, expected)


@needs_steps
def test_rmsnorm_of_zeros_is_zeros_not_nan():
    x = np.zeros((2, 16), dtype=np.float32)
    np.testing.assert_array_equal(kernels.rmsnorm(x, np.ones(16, dtype=np.float32), 1e-5), x)


@needs_steps
@pytest.mark.parametrize("change", ["weight length", "float64 x", "1-D x", "out shape"])
def test_rmsnorm_bad_calls_raise_value_error(change):
    x, weight, out = np.ones((2, 8), np.float32), np.ones(8, np.float32), None
    if change == "weight length":
        weight = weight[:7]
    elif change == "float64 x":
        x = x.astype(np.float64)
    elif change == "1-D x":
        x = x[0]
    else:
        out = np.empty((2, 7), np.float32)
    with pytest.raises(ValueError):
        kernels.rmsnorm(x, weight, 1e-5, out=out)


def float64_rope(x, rotations):
    """(T, H, D) pairs (2i, 2i+1) times cos + i sin in float64."""
    pairs = x.astype(np.float64).reshape(*x.shape[:2], -1, 2)
    cos, sin = rotations.real.astype(np.float64)[:, None], rotations.imag.astype(np.float64)[:, None]
    return np.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 0] * sin + pairs[..., 1] * cos], -1)


# (n_heads, n_kv, head_dim): a 110M layer's, grouped queries with a head below one vector and a
# head of 8 pairs plus 1 (a vector and a tail), one pair
QKV_HEADS = [(12, 12, 64), (8, 4, 6), (6, 2, 18), (4, 1, 2)]


@needs_c
@pytest.mark.parametrize("heads", QKV_HEADS, ids=lambda h: "h{}kv{}d{}".format(*h))
@pytest.mark.parametrize("sequences", STEPS, ids=["decode", "prefill+decode", "chunk", "first"])
def test_attend_qkv_is_rope_then_attend(heads, sequences):
    n_heads, n_kv, head_dim = heads
    rng = np.random.default_rng(hash((heads, len(sequences), "qkv")) % 2 ** 32)
    q, k, v, keys, values, kv_of_head, token_slots, positions = step_of(rng, sequences, *heads)
    rotations = ops.rope_rotations(keys.shape[2], head_dim, 10000.0)
    qkv = np.concatenate([a.reshape(len(positions), -1) for a in (q, k, v)], axis=1)
    keys_before, values_before = keys.copy(), values.copy()
    out = kernels.attend_qkv(qkv, n_heads, rotations, keys, values, kv_of_head, token_slots, positions, n_threads=2)
    # RoPE in place, within float32's rounding of the rotation in float64 (one fused step: < 1 ulp of
    # the larger product, bounded here by 2^-23 of the pair's size)
    rotated_q = qkv[:, :n_heads * head_dim].reshape(q.shape)
    rotated_k = qkv[:, n_heads * head_dim:(n_heads + n_kv) * head_dim].reshape(k.shape)
    for rotated, before in ((rotated_q, q), (rotated_k, k)):
        exact = float64_rope(before, rotations[positions]).reshape(before.shape)
        size = np.repeat(np.hypot(before[..., 0::2], before[..., 1::2]), 2, axis=-1)
        assert np.all(np.abs(rotated - exact) <= 2.0 ** -23 * size + 1e-30)
    np.testing.assert_array_equal(qkv[:, (n_heads + n_kv) * head_dim:].reshape(v.shape), v)
    # then exactly attend() on the rotated rows
    expected = kernels.attend(rotated_q, rotated_k, v, keys_before, values_before, kv_of_head, token_slots, positions,
                              n_threads=1)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(keys, keys_before)
    np.testing.assert_array_equal(values, values_before)


@needs_c
@pytest.mark.parametrize("head_dim", [64, 18])
def test_attend_qkv_rotates_as_numpys_complex_product_here(head_dim):
    """The float32 op set's RoPE elsewhere (numerics.NumpyOps.rope, numpy's complex64 product) and
    here: the same bits on this machine, so moving it into C changed no text (18: the pair after
    two vectors goes one at a time)."""
    rng = np.random.default_rng(5)
    n_heads, n_kv = 12, 4
    q, k, v, keys, values, kv_of_head, token_slots, positions = step_of(rng, [StepSequence(0, 3, 9)], n_heads, n_kv,
                                                                        head_dim)
    rotations = ops.rope_rotations(keys.shape[2], head_dim, 10000.0)
    qkv = np.concatenate([a.reshape(len(positions), -1) for a in (q, k, v)], axis=1)
    kernels.attend_qkv(qkv, n_heads, rotations, keys, values, kv_of_head, token_slots, positions)
    numpy_q = ops.apply_rope(q, rotations[positions])
    if not np.array_equal(numpy_q, fused_rope(q, rotations[positions])):
        pytest.skip("numpy's complex64 product rounds otherwise on this CPU (no fused multiply-add in it)")
    np.testing.assert_array_equal(qkv[:, :n_heads * head_dim].reshape(q.shape), numpy_q)


def fused_rope(x, rotations):
    """(a cos - b sin, a sin + b cos) with one rounding of a cos (or a sin) plus the other product
    rounded to float32: a fused multiply-add, emulated in float64 (a product of two float32s is
    exact there)."""
    a, b = x[..., 0::2].astype(np.float64), x[..., 1::2].astype(np.float64)
    cos, sin = rotations.real.astype(np.float64)[:, None], rotations.imag.astype(np.float64)[:, None]
    out = np.empty_like(x)
    out[..., 0::2] = a * cos - (b * sin).astype(np.float32)
    out[..., 1::2] = a * sin + (b * cos).astype(np.float32)
    return out


@needs_c
@pytest.mark.parametrize("change", ["slot", "position", "qkv width", "rotations shape", "read-only qkv", "float64"])
def test_attend_qkv_bad_calls_raise_value_error(change):
    rng = np.random.default_rng(3)
    q, k, v, keys, values, kv_of_head, token_slots, positions = step_of(rng, [StepSequence(1, 4, 2)], 4, 2, 8)
    qkv = np.concatenate([a.reshape(2, -1) for a in (q, k, v)], axis=1)
    rotations = ops.rope_rotations(keys.shape[2], 8, 10000.0)
    if change == "slot":
        token_slots[1] = 3
    elif change == "position":
        positions[1] = 70
    elif change == "qkv width":
        qkv = qkv[:, :-8].copy()
    elif change == "rotations shape":
        rotations = rotations[:10]
    elif change == "read-only qkv":
        qkv.flags.writeable = False
    else:
        qkv = qkv.astype(np.float64)
    with pytest.raises(ValueError):
        kernels.attend_qkv(qkv, 4, rotations, keys, values, kv_of_head, token_slots, positions)


def functional_product(matrix, x):
    """The product by the kernels' functions, which check every argument at every call."""
    if isinstance(matrix, GroupedQ8Matrix):
        return kernels.matmul_llama2c_q8(matrix.values, matrix.scales, matrix.group_size, x, n_threads=kernels.threads())
    return kernels.matmul_gguf(matrix.fmt, matrix.blocks, x, n_threads=kernels.threads())


@pytest.mark.parametrize("kind", [Q8_0Matrix, Q4_0Matrix, Q4_1Matrix, GroupedQ8Matrix], ids=lambda k: k.type_tag)
def test_a_quantized_matrixs_product_follows_the_backend(kind, backend):
    """The product a matrix keeps after its first call still runs on whichever backend is chosen
    now, and equals the functional kernel's."""
    rng = np.random.default_rng(9)
    params = {"group_size": 32} if kind is GroupedQ8Matrix else {}
    matrix = kind.from_float(rng.standard_normal((37, 96)).astype(np.float32), params)
    x = rng.standard_normal((3, 96)).astype(np.float32)
    kept = matrix.matmul(x)
    np.testing.assert_array_equal(kept, functional_product(matrix, x))
    expected = matrix.dequantize().astype(np.float64) @ x.astype(np.float64).T
    assert np.abs(kept - expected.T).max() <= 0.05 * np.abs(expected).max()


@needs_c
def test_float32_products_are_made_once_and_match_blas():
    rng = np.random.default_rng(10)
    parts = [rng.standard_normal((rows, 40)).astype(np.float32) for rows in (33, 8, 1)]
    x = rng.standard_normal((5, 40)).astype(np.float32)
    single, stack = F32Matrix(parts[0]), F32RowStack(tuple(parts))
    first = single.matmul(x)
    assert single.__dict__["product"] is not None and single.matmul(x) is not first
    np.testing.assert_allclose(first, x @ parts[0].T, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(stack.matmul(x), np.concatenate([F32Matrix(p).matmul(x) for p in parts], axis=1))
    strided = F32Matrix(np.ascontiguousarray(rng.standard_normal((40, 80)).astype(np.float32)))[:, :40]
    np.testing.assert_allclose(strided.matmul(x), x @ np.asarray(strided).T, rtol=1e-5, atol=1e-5)  # BLAS: not contiguous


@needs_c
@pytest.mark.parametrize("change", ["float64 weights", "strided weights", "mixed cols", "x cols", "9 tokens"])
def test_products_reject_bad_weights_and_activations(change):
    weights, x = [np.ones((4, 16), np.float32)], np.ones((2, 16), np.float32)
    if change == "float64 weights":
        weights = [weights[0].astype(np.float64)]
    elif change == "strided weights":
        weights = [np.ones((4, 32), np.float32)[:, ::2]]
    elif change == "mixed cols":
        weights.append(np.ones((4, 8), np.float32))
    elif change == "x cols":
        x = np.ones((2, 15), np.float32)
    else:
        x = np.ones((9, 16), np.float32)
    with pytest.raises(ValueError):
        kernels.F32Product(weights)(x)
    with pytest.raises(ValueError):
        kernels.BlockProduct("q5_0", np.zeros((2, 36), np.uint8))


@pytest.mark.parametrize("kind", [Q8_0Matrix, Q4_0Matrix, Q4_1Matrix], ids=lambda k: k.type_tag)
def test_gguf_matrices_apart_stack_as_one_product_with_their_own_bits(kind, backend):
    """GGUF tensors with padding between them are not back to back: one stacked product still
    gives each matrix's own bits, for decode sizes (the kernel) and prefill sizes (BLAS tiles)."""
    from llmtp.common.model.gguf_blocks import PREFILL_TOKENS
    from llmtp.common.model.matrices import QuantizedRowStack, stack_rows
    rng = np.random.default_rng(12)
    parts = [kind.from_float(rng.standard_normal((rows, 64)).astype(np.float32), {}) for rows in (5, 2, 9)]
    stacked = stack_rows(parts)
    assert isinstance(stacked, QuantizedRowStack) and stacked.shape == (16, 64)
    for tokens in (1, 4, PREFILL_TOKENS + 1):
        x = rng.standard_normal((tokens, 64)).astype(np.float32)
        np.testing.assert_array_equal(stacked.matmul(x), np.concatenate([p.matmul(x) for p in parts], axis=1))


def test_a_stack_refuses_products_of_different_storage():
    rng = np.random.default_rng(13)
    q8, q4 = (kind.from_float(rng.standard_normal((4, 32)).astype(np.float32), {}) for kind in (Q8_0Matrix, Q4_0Matrix))
    with pytest.raises(ValueError):
        kernels.QuantizedRowStack([q8.product, q4.product])
    with pytest.raises(ValueError):
        kernels.QuantizedRowStack([q8.product] * (kernels.QUANTIZED_MAX_STACK + 1))


@needs_steps
@pytest.mark.parametrize("change", ["short scales", "part rows", "not a pair", "out size", "nine matrices"])
def test_the_c_stack_checks_its_buffers_again(change):
    """The extension checks every length itself: a wrong call raises ValueError, never reads past a buffer."""
    from llmtp.common.kernels import _native
    from llmtp.common.kernels.layout import FORMAT_CODES
    values, scales = np.zeros((4, 32), np.int8), np.ones(4, np.float32)
    parts, x, out = ((values, scales),), np.zeros((1, 32), np.float32), np.zeros((1, 4), np.float32)
    if change == "short scales":
        parts = ((values, scales[:3]),)
    elif change == "part rows":
        parts = ((values.reshape(-1)[:100], scales),)
    elif change == "not a pair":
        parts = ((values,),)
    elif change == "out size":
        out = np.zeros((1, 5), np.float32)
    else:
        parts = ((values, scales),) * 9
    with pytest.raises(ValueError):
        _native.matmul_stack(FORMAT_CODES["llama2c_q8"], 0, 32, 32, parts, x, 1, out, 1)
