"""The float32 decode kernel (kernels.matmul_f32) against float64, and the property serve's
batching relies on: a token's output is the same bits alone and in a batch of up to 8."""

import numpy as np
import pytest

from llmtp.common import kernels
from llmtp.common.model.matrices import F32Matrix

pytestmark = pytest.mark.skipif(not kernels.has_f32_kernel(),
                                reason=f"no AVX2 float32 kernel here ({kernels.backend_info()})")

# rows not a multiple of the 8-row block, columns not a multiple of the 8-lane vector, one row,
# one column, and the shapes of a real layer
SHAPES = [(1, 1), (1, 8), (3, 9), (7, 17), (9, 16), (31, 100), (2304, 768), (768, 2048)]


def error_bound(weights: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A float32 sum of n products rounds by at most ~n units of 2^-24 of sum |w x|: each lane's
    chain has cols/8 terms, then the 8 lanes, then the tail."""
    terms = weights.shape[1] // 8 + 8 + weights.shape[1] % 8 + 2
    return terms * 2.0 ** -24 * (np.abs(x.astype(np.float64)) @ np.abs(weights.astype(np.float64)).T)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 8])
def test_matches_float64_within_rounding(shape, tokens):
    rng = np.random.default_rng(shape[0] * 31 + tokens)
    weights = rng.standard_normal(shape).astype(np.float32)
    x = rng.standard_normal((tokens, shape[1])).astype(np.float32)
    expected = x.astype(np.float64) @ weights.astype(np.float64).T
    for n_threads in (1, 2, 3):
        got = kernels.matmul_f32(weights, x, n_threads=n_threads)
        assert got.shape == (tokens, shape[0])
        assert np.all(np.abs(got - expected) <= error_bound(weights, x)), n_threads


@pytest.mark.parametrize("shape", [(7, 17), (2304, 768), (100, 2048)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_a_token_gets_the_same_bits_alone_and_batched(shape):
    rng = np.random.default_rng(5)
    weights = rng.standard_normal(shape).astype(np.float32)
    x = rng.standard_normal((8, shape[1])).astype(np.float32)
    alone = np.concatenate([kernels.matmul_f32(weights, x[t:t + 1], n_threads=1) for t in range(8)])
    for tokens in range(1, 9):
        for n_threads in (1, 2):
            np.testing.assert_array_equal(kernels.matmul_f32(weights, x[:tokens], n_threads=n_threads),
                                          alone[:tokens])


@pytest.mark.parametrize("rows", [(1,), (1, 1), (7, 1, 33), (768, 128, 128), (5, 2048, 3)], ids=str)
@pytest.mark.parametrize("tokens", [1, 3, 5, 8])
def test_matrices_stacked_by_rows_get_each_ones_own_bits(rows, tokens):
    """Matrices anywhere in memory, multiplied in one call (a llama2.c layer's wq, wk, wv): the
    outputs side by side are each matrix's own product, bit for bit, however the stacked rows
    fall to threads (a thread's share may start or end inside any of them)."""
    rng = np.random.default_rng(sum(rows) + tokens)
    cols = 40
    parts = [rng.standard_normal((n, cols)).astype(np.float32) for n in rows]
    x = rng.standard_normal((tokens, cols)).astype(np.float32)
    alone = np.concatenate([kernels.matmul_f32(part, x, n_threads=1) for part in parts], axis=1)
    for n_threads in (1, 2, 3, 7):
        np.testing.assert_array_equal(kernels.matmul_f32(parts, x, n_threads=n_threads), alone)


def test_a_stack_of_bad_parts_is_refused():
    x = np.ones((1, 8), np.float32)
    with pytest.raises(ValueError, match="one cols"):
        kernels.matmul_f32([np.ones((2, 8), np.float32), np.ones((2, 9), np.float32)], x)
    with pytest.raises(ValueError, match="one cols"):
        kernels.matmul_f32([np.ones((2, 8), np.float32), np.ones((2, 16), np.float32)[:, ::2]], x)
    with pytest.raises(ValueError, match="stack"):
        kernels.matmul_f32([np.ones((1, 8), np.float32)] * 9, x)
    with pytest.raises(ValueError, match="stack"):
        kernels.matmul_f32([], x)


def test_a_row_stack_is_the_products_side_by_side_for_decode_and_prefill():
    from llmtp.common.model.matrices import F32RowStack, as_matrix, stack_rows

    rng = np.random.default_rng(8)
    wq, wk = (as_matrix(rng.standard_normal((n, 24)).astype(np.float32)) for n in (16, 8))
    stack = stack_rows([wq, wk])  # two separate arrays: not back to back
    assert isinstance(stack, F32RowStack) and stack.shape == (24, 24)
    for tokens in (1, kernels.F32_MAX_TOKENS, kernels.F32_MAX_TOKENS + 3):
        x = rng.standard_normal((tokens, 24)).astype(np.float32)
        np.testing.assert_array_equal(stack.matmul(x), np.concatenate([wq.matmul(x), wk.matmul(x)], axis=1))


def test_the_matrix_type_uses_it_for_decode_and_blas_beyond():
    rng = np.random.default_rng(6)
    weights = rng.standard_normal((40, 24)).astype(np.float32)
    matrix = F32Matrix(weights)
    few = rng.standard_normal((kernels.F32_MAX_TOKENS, 24)).astype(np.float32)
    np.testing.assert_array_equal(matrix.matmul(few), kernels.matmul_f32(weights, few))
    many = rng.standard_normal((kernels.F32_MAX_TOKENS + 1, 24)).astype(np.float32)
    np.testing.assert_array_equal(matrix.matmul(many), many @ weights.T)
    strided = F32Matrix(weights)[:, ::2]  # not C-contiguous: BLAS takes it
    np.testing.assert_array_equal(strided.matmul(few[:, :12]), few[:, :12] @ weights[:, ::2].T)


@pytest.mark.parametrize("call", [
    lambda w, x: kernels.matmul_f32(w.astype(np.float64), x),
    lambda w, x: kernels.matmul_f32(w[:, ::2], x[:, :12]),
    lambda w, x: kernels.matmul_f32(w, np.zeros((9, 24), np.float32)),
    lambda w, x: kernels.matmul_f32(w, np.zeros((1, 23), np.float32)),
    lambda w, x: kernels.matmul_f32(w, x, out=np.zeros((1, 39), np.float32)),
], ids=["float64", "strided", "9 tokens", "wrong width", "wrong out"])
def test_bad_calls_raise_value_error(call):
    weights = np.ones((40, 24), np.float32)
    with pytest.raises(ValueError):
        call(weights, np.ones((1, 24), np.float32))


@pytest.mark.skipif("vnni" not in kernels.available_backends(), reason="no AVX-512 (VL, VNNI) here")
@pytest.mark.parametrize("shape", [(1, 8), (3, 9), (7, 17), (8, 24), (31, 100), (101, 768), (64, 2048)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_avx512_rows_give_the_avx2_rows_bits(shape):
    """From 5 tokens the vnni backend reads two rows at a time in 16-lane registers (csrc/f32.c);
    every lane must do the AVX2 rows' multiply-adds in their order: odd row counts (a pair and a
    single row), columns with a last 8-column chunk and a scalar tail, every token count."""
    rng = np.random.default_rng(shape[0] * 7 + shape[1])
    weights = rng.standard_normal(shape).astype(np.float32)
    x = rng.standard_normal((kernels.F32_MAX_TOKENS, shape[1])).astype(np.float32)
    previous = kernels.use_backend("avx2")
    try:
        narrow = [kernels.matmul_f32(weights, x[:tokens], n_threads=1) for tokens in range(1, 9)]
        kernels.use_backend("vnni")
        for tokens in range(1, 9):
            for n_threads in (1, 2, 3):
                np.testing.assert_array_equal(kernels.matmul_f32(weights, x[:tokens], n_threads=n_threads),
                                              narrow[tokens - 1], err_msg=f"{tokens} tokens, {n_threads} threads")
    finally:
        kernels.use_backend(previous)
