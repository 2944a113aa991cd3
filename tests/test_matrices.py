"""Matrix types: each storage's product, expansion, row lookup, cuts and stored parts,
against float64 arithmetic written here from the storage's definition."""

import numpy as np
import pytest

from llmtp.common.errors import ConfigError
from llmtp.common.model.matrices import (MATRIX_TYPES, Encoding, F32Matrix, Matrix, as_matrix, encode_as,
                                         stack_rows)
from llmtp.common.model.q8_grouped import GroupedQ8Matrix

RNG = np.random.default_rng(11)
SHAPES = [(1, 4), (5, 12), (7, 24)]  # one row, odd rows, several groups per row
GROUP = 4


def by_hand_q8(values: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """w = value * its group's scale, in float64."""
    rows, cols = values.shape
    w = values.astype(np.float64).reshape(rows, cols // group_size, group_size)
    return (w * scales.astype(np.float64).reshape(rows, -1, 1)).reshape(rows, cols)


def random_q8(shape) -> GroupedQ8Matrix:
    values = RNG.integers(-127, 128, size=shape, dtype=np.int8)
    scales = RNG.random(shape[0] * shape[1] // GROUP, dtype=np.float32)
    return GroupedQ8Matrix(values=values, scales=scales, group_size=GROUP)


def test_both_types_are_registered():
    assert MATRIX_TYPES["f32"] is F32Matrix and MATRIX_TYPES["q8_grouped"] is GroupedQ8Matrix


@pytest.mark.parametrize("shape", SHAPES)
def test_q8_product_lookup_and_expansion_match_float64(shape):
    matrix = random_q8(shape)
    w = by_hand_q8(matrix.values, matrix.scales, GROUP)
    x = RNG.standard_normal((3, shape[1])).astype(np.float32)
    got = matrix.matmul(x)
    assert got.dtype == np.float32 and got.shape == (3, shape[0])
    # float32 products of |x| ~ 1 and |w| <= 127: a few float32 ulps of the row sums' scale
    bound = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(w).T + 1)
    assert np.all(np.abs(got - x.astype(np.float64) @ w.T) <= bound)
    np.testing.assert_array_equal(matrix.dequantize(), w.astype(np.float32))
    ids = np.array([0, shape[0] - 1, 0])
    np.testing.assert_array_equal(matrix.rows(ids), w[ids].astype(np.float32))


def test_f32_is_a_zero_copy_view_and_its_arithmetic_is_plain():
    array = RNG.standard_normal((6, 8)).astype(np.float32)
    matrix = as_matrix(array)
    assert isinstance(matrix, F32Matrix) and np.shares_memory(matrix, array) and as_matrix(matrix) is matrix
    x = RNG.standard_normal((2, 8)).astype(np.float32)
    product = matrix.matmul(x)
    assert type(product) is np.ndarray and type(matrix * 2) is np.ndarray
    np.testing.assert_allclose(product, x.astype(np.float64) @ array.astype(np.float64).T, rtol=1e-5, atol=1e-5)
    assert np.shares_memory(matrix.dequantize(), array) and np.shares_memory(matrix.take_cols(2, 5), array)


@pytest.mark.parametrize("make", [lambda shape: as_matrix(RNG.standard_normal(shape).astype(np.float32)),
                                  random_q8], ids=["f32", "q8"])
def test_cuts_are_the_cuts_of_the_expanded_matrix(make):
    matrix = make((6, 16))
    full = matrix.dequantize()
    np.testing.assert_array_equal(matrix.take_rows(1, 4).dequantize(), full[1:4])
    np.testing.assert_array_equal(matrix.take_cols(4, 12).dequantize(), full[:, 4:12])
    assert matrix.take_cols(4, 12).encoding == matrix.encoding


def test_q8_refuses_a_column_cut_through_a_group_and_says_why():
    matrix = random_q8((3, 16))
    assert matrix.cut_problem(1, 4, 8) is None and matrix.cut_problem(0, 1, 2) is None
    with pytest.raises(ConfigError, match=r"columns 2\.\.8 do not fall on its groups of 4 columns \(group_size 4\)"):
        matrix.take_cols(2, 8)
    with pytest.raises(ConfigError, match="outside"):
        matrix.take_rows(0, 9)


@pytest.mark.parametrize("make", [lambda shape: as_matrix(RNG.standard_normal(shape).astype(np.float32)),
                                  random_q8], ids=["f32", "q8"])
def test_parts_round_trip_through_layout(make):
    matrix = make((5, 8))
    cls = MATRIX_TYPES[matrix.encoding.type]
    layout = cls.layout(matrix.shape, matrix.encoding.params)
    parts = [np.ascontiguousarray(array, dtype=part.dtype) for part, array in zip(layout, matrix.parts())]
    assert [p.shape for p in parts] == [part.shape for part in layout]
    assert sum(p.nbytes for p in parts) == matrix.nbytes
    back = cls.from_parts(matrix.shape, matrix.encoding.params, parts)
    np.testing.assert_array_equal(back.dequantize(), matrix.dequantize())
    assert Encoding.from_dict(matrix.encoding.to_dict(), "test") == matrix.encoding


def test_encode_as_keeps_a_matrix_already_so_stored():
    q8 = random_q8((2, 8))
    assert encode_as(q8, q8.encoding) is q8
    f32 = encode_as(q8, Encoding("f32"))
    np.testing.assert_array_equal(f32, q8.dequantize())
    again = encode_as(f32, Encoding("q8_grouped", {"group_size": 8}))
    assert again.encoding.params == {"group_size": 8} and again.shape == (2, 8)


def test_stacking_is_a_view_only_over_back_to_back_f32():
    block = RNG.standard_normal((5, 4)).astype(np.float32)
    top, bottom = as_matrix(block[:2]), as_matrix(block[2:])
    stacked = stack_rows([top, bottom])
    assert isinstance(stacked, Matrix) and np.shares_memory(stacked, block)
    np.testing.assert_array_equal(stacked, block)
    assert stack_rows([random_q8((2, 4)), random_q8((2, 4))]) is None
    assert stack_rows([top, random_q8((3, 4))]) is None
