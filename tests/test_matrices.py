"""Matrix types: each storage's product, expansion, row lookup, cuts and stored parts,
against float64 arithmetic written here from the storage's definition."""

from dataclasses import dataclass

import numpy as np
import pytest

from llmtp.common.errors import ConfigError
from llmtp.common.model.matrices import (MATRIX_TYPES, Encoding, F32Matrix, Matrix, Part, as_matrix, encode_as,
                                         register_matrix_type, stack_rows)
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
    # runq.c's product quantizes x per group (scale d = max|x_group| / 127), moving each value by
    # at most d / 2; float32 steps add a few ulps of the row sums' scale
    d = np.repeat(np.abs(x.astype(np.float64)).reshape(3, -1, GROUP).max(axis=2) / 127.0, GROUP, axis=1)
    bound = (d / 2) @ np.abs(w).T * (1 + 1e-6) + 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(w).T + 1)
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
    assert stack_rows([top, random_q8((3, 4))]) is None


def test_quantized_matrices_apart_stack_as_one_product_with_their_own_bits(backend):
    """Version 2 matrices never lie back to back: their stack is a product (not a stored Matrix)
    whose columns are each matrix's own product, on every backend, for decode and prefill sizes."""
    parts = [random_q8((rows, 8)) for rows in (3, 1, 5)]
    stacked = stack_rows(parts)
    assert not isinstance(stacked, Matrix) and stacked.shape == (9, 8)
    for tokens in (1, 2, 3, 7):
        x = RNG.standard_normal((tokens, 8)).astype(np.float32)
        np.testing.assert_array_equal(stacked.matmul(x), np.concatenate([p.matmul(x) for p in parts], axis=1))
    assert stack_rows([random_q8((2, 8)), random_q8((2, 16))]) is None  # rows of another width


# --- a new storage type is one registered class -----------------------------------------------

@register_matrix_type
@dataclass
class RowScaledQ8(Matrix):
    """A test-only storage: int8 values and one float32 scale per row. Nothing outside this class
    knows it, yet it is cut, written to shards, read back and multiplied like the shipped ones."""

    type_tag = "test_q8_rows"
    values: np.ndarray
    scales: np.ndarray  # (rows,)

    shape = property(lambda self: self.values.shape)
    nbytes = property(lambda self: self.values.nbytes + self.scales.nbytes)
    encoding = property(lambda self: Encoding(self.type_tag))

    def dequantize(self):
        return self.values.astype(np.float32) * self.scales[:, None]

    def matmul(self, x):
        return x @ self.dequantize().T

    def rows(self, ids):
        return self.dequantize()[ids]

    def _rows_view(self, start, stop):
        return RowScaledQ8(self.values[start:stop], self.scales[start:stop])

    def _cols_view(self, start, stop):
        return RowScaledQ8(self.values[:, start:stop], self.scales)

    @classmethod
    def layout(cls, shape, params):
        return [Part(".values", np.dtype("i1"), tuple(shape)), Part(".scales", np.dtype("<f4"), (shape[0],))]

    def parts(self):
        return [self.values, self.scales]

    @classmethod
    def from_parts(cls, shape, params, arrays):
        return cls(*arrays)

    @classmethod
    def from_float(cls, weights, params):
        scales = (np.abs(weights).max(axis=1) / 127).astype(np.float32)
        return cls(np.rint(weights / scales[:, None]).astype(np.int8), scales)


def test_a_registered_type_goes_through_shards_and_the_forward_pass(tmp_path):
    from types import SimpleNamespace

    from llmtp.common.formats.shard_file import load_embedding, load_shard, write_shards
    from llmtp.common.model.split import full_slice
    from llmtp.common.model.transformer import SliceModel, StepSequence
    from llmtp.common.model.weights import LayerWeights, ModelWeights
    from model_factory import make_config, random_weights

    config = make_config()
    source = random_weights(config, seed=4)
    to_rows = lambda m: RowScaledQ8.from_float(np.asarray(m), {})  # noqa: E731
    layers = [LayerWeights(**{name: (to_rows(getattr(layer, name)) if name.startswith("w") else getattr(layer, name))
                              for name in ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3")})
              for layer in source.layers]
    weights = ModelWeights(to_rows(source.token_embedding), layers, source.final_norm, to_rows(source.classifier))
    path = tmp_path / "source.bin"
    path.write_bytes(b"stands for the source model")
    checkpoint = SimpleNamespace(config=config, weights=weights, group_size=None, path=path, n_bytes=27, version=1)
    manifest = write_shards(checkpoint, 3, tmp_path / "shards", progress=False)

    shards = [load_shard(manifest.shard_path(i)) for i in range(3)]
    assert all(isinstance(s.weights.layers[0].wo, RowScaledQ8) for s in shards)
    assert isinstance(load_embedding(manifest), RowScaledQ8)
    tokens = np.array([3, 1, 4, 1, 5])
    x = weights.embed(tokens)
    sequences = [StepSequence(0, 0, len(tokens))]
    want = SliceModel(config, full_slice(config), weights.as_shard()).forward(x, sequences)
    models = [SliceModel(s.config, s.spec, s.weights) for s in shards]
    # the sharded pass by hand, summing the row-parallel partials (as in test_shard.py)
    positions = np.arange(len(tokens))
    for layer in range(config.n_layers):
        x = x + sum(m.attention_partial(layer, x, sequences, positions) for m in models)
        x = x + sum(m.ffn_partial(layer, x) for m in models)
    from llmtp.common.model.ops import rmsnorm
    h = rmsnorm(x[-1:], weights.final_norm, config.norm_eps)
    got = np.concatenate([m.matmul(h, m.weights.classifier) for m in models], axis=1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
