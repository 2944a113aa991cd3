"""The multi-token llama2.c v2 product (csrc/llama2c_tiles.c, prefill) against the one-token one
(the row kernels of csrc/dot.c, decode): the same bits for every token, on every backend, at row
counts around the 32-row blocks, token counts around the 6-token passes, and group sizes the
vector path takes (multiples of 4) and one it does not."""

import numpy as np
import pytest

from llmtp.common import kernels

F32 = np.float32
ROWS = [1, 7, 33]
TOKENS = [2, 3, 5, 9, 17, 64]
GROUP_SIZES = [32, 64, 8, 24, 6]  # 6: not a multiple of 4, so the row kernels take every token count


def random_v2(rng, rows, cols, group_size):
    """int8 values over the whole range (-128 too: a file may hold it) and uneven group scales."""
    values = rng.integers(-128, 128, (rows, cols), dtype=np.int8)
    values[0, :group_size] = 0  # an all-zero group
    scales = (rng.uniform(0.001, 0.05, rows * cols // group_size) * rng.choice([1, 30], rows * cols // group_size))
    return values, scales.astype(F32)


def random_x(rng, tokens, cols, group_size):
    x = rng.standard_normal((tokens, cols)).astype(F32)
    x[0, :group_size] *= 80.0  # one group at a much larger scale
    x[-1, -group_size:] = 0.0  # an all-zero activation group
    return x


def one_token_at_a_time(values, scales, group_size, x):
    return np.stack([kernels.matmul_llama2c_q8(values, scales, group_size, row)[0] for row in x])


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_every_token_of_a_batch_is_the_token_alone(backend, group_size):
    rng = np.random.default_rng(group_size)
    for rows in ROWS:
        cols = group_size * (3 if group_size >= 32 else 13)
        values, scales = random_v2(rng, rows, cols, group_size)
        for tokens in TOKENS:
            x = random_x(rng, tokens, cols, group_size)
            got = kernels.matmul_llama2c_q8(values, scales, group_size, x, n_threads=2)
            np.testing.assert_array_equal(got, one_token_at_a_time(values, scales, group_size, x),
                                          err_msg=f"rows {rows}, tokens {tokens}")


def test_every_backend_gives_the_same_bits():
    rng = np.random.default_rng(7)
    values, scales = random_v2(rng, 70, 256, 64)
    x = random_x(rng, 13, 256, 64)
    results = {}
    for name in kernels.available_backends():
        previous = kernels.use_backend(name)
        try:
            results[name] = kernels.matmul_llama2c_q8(values, scales, 64, x, n_threads=3)
        finally:
            kernels.use_backend(previous)
    for name, got in results.items():
        np.testing.assert_array_equal(got, results["portable" if "portable" in results else name], err_msg=name)


def test_thread_counts_split_rows_without_changing_bits(backend):
    rng = np.random.default_rng(11)
    values, scales = random_v2(rng, 100, 192, 32)  # 4 blocks of 32 rows, the last one short
    x = random_x(rng, 9, 192, 32)
    one = kernels.matmul_llama2c_q8(values, scales, 32, x, n_threads=1)
    for n_threads in (2, 3, 8):
        np.testing.assert_array_equal(kernels.matmul_llama2c_q8(values, scales, 32, x, n_threads=n_threads), one)


def test_activation_quantization_rounds_ties_away_from_zero(backend):
    """Groups whose max is 127 have scale 1: x = k + 0.5 is a tie that roundf sends away from zero
    (numpy's rint would send half of them to even), and -0.0 must quantize as 0."""
    rng = np.random.default_rng(5)
    halves = rng.integers(-254, 255, (9, 128)).astype(F32) / F32(2)
    halves[:, ::32] = 127.0
    halves[1, 1:32] = -0.0
    values, scales = random_v2(rng, 40, 128, 32)
    got = kernels.matmul_llama2c_q8(values, scales, 32, halves)
    np.testing.assert_array_equal(got, one_token_at_a_time(values, scales, 32, halves))


@pytest.mark.parametrize("group_size", [8, 64])
def test_within_bound_of_float64(backend, group_size):
    """|y - x @ W.T| <= what quantizing x costs (half a step d per value, d = max|x| / 127 of its group,
    times |w|) plus float32 rounding: one relative 2^-24 per multiply and per sum of the group order."""
    rng = np.random.default_rng(group_size + 1)
    rows, cols, tokens = 45, 384, 17
    values, scales = random_v2(rng, rows, cols, group_size)
    w = (values.reshape(-1, group_size).astype(np.float64) * scales[:, None]).reshape(rows, cols)
    x = random_x(rng, tokens, cols, group_size)
    d = np.repeat(np.abs(x.astype(np.float64)).reshape(tokens, -1, group_size).max(axis=2) / 127.0, group_size, axis=1)
    u = 2.0 ** -24
    bound = (d / 2) @ np.abs(w).T * (1 + 2.0 ** -10) + (cols // group_size + 8) * u * ((np.abs(x) + d) @ np.abs(w).T)
    error = np.abs(kernels.matmul_llama2c_q8(values, scales, group_size, x, n_threads=2) - x.astype(np.float64) @ w.T)
    assert np.all(error <= bound)
    assert np.any(error > 0)  # the bound is not vacuous here: quantizing x does cost something


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_group_terms_are_the_numpy_terms_and_sum_to_the_product(backend, group_size):
    """runq_group_terms (a row-parallel product's partial): the tiles from 3 tokens, the rows for 1 and 2."""
    rng = np.random.default_rng(group_size + 2)
    for rows in ROWS:
        cols = group_size * (3 if group_size >= 32 else 13)
        values, scales = random_v2(rng, rows, cols, group_size)
        for tokens in (1, 2, 5, 17):
            x = random_x(rng, tokens, cols, group_size)
            terms = kernels.runq_group_terms(values, scales, group_size, x, 2, cols // group_size + 5)
            previous = kernels.use_backend("numpy")
            try:
                expected = kernels.runq_group_terms(values, scales, group_size, x, 2, cols // group_size + 5)
            finally:
                kernels.use_backend(previous)
            np.testing.assert_array_equal(terms, expected, err_msg=f"rows {rows}, tokens {tokens}")
            np.testing.assert_array_equal(kernels.runq_ordered_sum(terms),
                                          kernels.matmul_llama2c_q8(values, scales, group_size, x))
