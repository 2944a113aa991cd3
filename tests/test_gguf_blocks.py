"""GGUF Q8_0 / Q4_0 / Q4_1 matrices kept as their blocks (common/model/gguf_blocks.py), against oracles
that are not ours: gguf's own quantizer and dequantizer (llama.cpp's Python), float64
dequantize-then-multiply, the float64 loop forward of tests/reference_forward.py, and the
in-process engine for every worker count (threads, and ZeroMQ workers over shard files).

Bound of one product y = W x (x quantized to blocks of 32, scale d_b = max|x_b| / 127, W the
float64 expansion of the stored blocks): each activation moves by at most d_b / 2, so
    |y - W x| <= sum_b d_b / 2 * sum_{j in b} |w_j| + (n_blocks + 8) 2^-24 sum_j a_j (|x_j| + d_b)
with a_j = |w_j| (+ 2|m_b| for Q4_1), as tests/test_kernels.py derives it."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from llmtp.common import kernels  # noqa: E402
from llmtp.common.errors import ConfigError  # noqa: E402
from llmtp.common.formats.load import load_model  # noqa: E402
from llmtp.common.formats.shard_file import load_embedding, load_shard, write_shards  # noqa: E402
from llmtp.common.model import gguf_blocks as gguf_blocks_module  # noqa: E402
from llmtp.common.model.config import ModelConfig  # noqa: E402
from llmtp.common.model.matrices import MATRIX_TYPES, stack_rows  # noqa: E402
from llmtp.common.model.transformer import StepSequence  # noqa: E402
from llmtp.coordinator.local_cluster import open_local_engine  # noqa: E402
from llmtp.coordinator.local_engine import LocalEngine  # noqa: E402

from gguf_factory import stored_values, write_gguf  # noqa: E402
from inproc_cluster import ThreadedCluster  # noqa: E402
from model_factory import random_weights  # noqa: E402
from reference_forward import reference_logits  # noqa: E402

U = 2.0 ** -24
FORMATS = ("q8_0", "q4_0", "q4_1")
SHAPES = [(1, 32), (7, 32), (13, 96), (37, 160)]  # one row, one block, rows not a multiple of 8


def gguf_blocks(w: np.ndarray, fmt: str) -> np.ndarray:
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType[fmt.upper()])


def gguf_values(blocks: np.ndarray, fmt: str) -> np.ndarray:
    return gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[fmt.upper()]).astype(np.float64)


def product_bound(w64: np.ndarray, x: np.ndarray, offsets: np.ndarray | None) -> np.ndarray:
    x64 = x.astype(np.float64)
    d = np.repeat(np.abs(x64).reshape(x.shape[0], -1, 32).max(axis=2) / 127.0, 32, axis=1)
    a = np.abs(w64) if offsets is None else np.abs(w64) + 2 * np.abs(offsets)
    return (d / 2) @ np.abs(w64).T * (1 + 2.0 ** -10) + (w64.shape[1] // 32 + 8) * U * ((np.abs(x64) + d) @ a.T)


def q4_1_offsets(blocks: np.ndarray) -> np.ndarray:
    rows = blocks.shape[0]
    m = blocks.reshape(rows, -1, 20)[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float64)
    return np.repeat(m, 32, axis=1)


def random_case(shape, tokens):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    w = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.1, 3.0, (shape[0], 1)).astype(np.float32)
    if shape[0] > 1:
        w[1, :32] = 0.0  # an all-zero block
    x = rng.standard_normal((tokens, shape[1])).astype(np.float32)
    x[0, :32] *= 50.0
    return w, x


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_product_is_dequantize_then_multiply_within_the_bound(backend, fmt, shape):
    w, x = random_case(shape, gguf_blocks_module.PREFILL_TOKENS)  # the most tokens the kernel takes
    matrix = MATRIX_TYPES[fmt].from_float(w, {})
    np.testing.assert_array_equal(matrix.blocks, gguf_blocks(w, fmt))  # llama.cpp's own quantizer
    w64 = gguf_values(matrix.blocks, fmt)
    np.testing.assert_array_equal(matrix.dequantize(), w64.astype(np.float32))
    got = matrix.matmul(x)
    assert got.dtype == np.float32 and got.shape == (len(x), shape[0])
    offsets = q4_1_offsets(matrix.blocks) if fmt == "q4_1" else None
    error = np.abs(got - x.astype(np.float64) @ w64.T)
    bound = product_bound(w64, x, offsets)
    assert np.all(error <= bound), f"worst error / bound {np.max(error / bound):.3f}"
    assert np.max(error) > 1e-4 * np.abs(got).max()  # activations really were quantized (not a float path)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_prefill_product_multiplies_tiles_of_the_exact_weights(backend, fmt, shape, monkeypatch):
    """More than PREFILL_TOKENS tokens: tiles of rows expanded for BLAS, x not quantized, so only
    float32 rounding remains: |error| <= (cols + 2) 2^-24 sum_j |x_j||w_j| (a sum of cols terms
    in any order); 2 rows per tile, so the tiles' seams are crossed too."""
    monkeypatch.setattr(gguf_blocks_module, "TILE_VALUES", 2 * shape[1])
    w, x = random_case(shape, gguf_blocks_module.PREFILL_TOKENS + 3)
    matrix = MATRIX_TYPES[fmt].from_float(w, {})
    w64 = gguf_values(matrix.blocks, fmt)
    got = matrix.matmul(x)
    error = np.abs(got - x.astype(np.float64) @ w64.T)
    assert np.all(error <= (shape[1] + 2) * U * (np.abs(x).astype(np.float64) @ np.abs(w64).T))


@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_cuts_and_stacking_keep_blocks(fmt):
    rng = np.random.default_rng(3)
    matrix = MATRIX_TYPES[fmt].from_float(rng.standard_normal((6, 128)).astype(np.float32), {})
    full = gguf_values(matrix.blocks, fmt).astype(np.float32)
    ids = np.array([5, 0, 5])
    np.testing.assert_array_equal(matrix.rows(ids), full[ids])
    np.testing.assert_array_equal(matrix.take_rows(1, 4).dequantize(), full[1:4])
    cut = matrix.take_cols(32, 96)
    assert cut.encoding == matrix.encoding and cut.shape == (6, 64) and cut.blocks.flags.c_contiguous
    np.testing.assert_array_equal(cut.dequantize(), full[:, 32:96])
    with pytest.raises(ConfigError, match=rf"columns 16\.\.96 do not fall on its {fmt} blocks of 32 columns"):
        matrix.take_cols(16, 96)
    top, bottom = matrix.take_rows(0, 2), matrix.take_rows(2, 6)
    stacked = stack_rows([top, bottom])  # rows 0..2 and 2..6 of one array lie back to back
    assert stacked is not None and np.shares_memory(stacked.blocks, matrix.blocks)
    np.testing.assert_array_equal(stacked.dequantize(), full)


# --- whole models ----------------------------------------------------------------------------

def block_config() -> ModelConfig:
    # head_dim 32: every head boundary is a block boundary, so 1..3 workers can cut wo;
    # hidden 96 = 3 blocks, one per worker at 3
    return ModelConfig(dim=128, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=70, seq_len=32,
                       shared_classifier=False, rope_theta=10000.0, norm_eps=1e-5)


PROMPT = [1, 5, 69, 0, 17, 42, 8, 33, 2, 60, 11, 7]  # more than PREFILL_TOKENS: prefill runs on tiles
DECODE = 10


def greedy_tokens(engine) -> list[int]:
    assert len(PROMPT) > gguf_blocks_module.PREFILL_TOKENS
    """Prefill the prompt at once, then DECODE greedy tokens one step at a time."""
    logits = engine.step(np.array(PROMPT), [StepSequence(0, 0, len(PROMPT))])[0]
    tokens = []
    for position in range(len(PROMPT), len(PROMPT) + DECODE):
        tokens.append(int(np.argmax(logits)))
        logits = engine.step(np.array([tokens[-1]]), [StepSequence(0, position, 1)])[0]
    return tokens


@pytest.fixture(scope="module", params=[fmt.upper() for fmt in FORMATS])
def block_model(request, tmp_path_factory):
    config = block_config()
    weights = random_weights(config, 5)
    path = write_gguf(tmp_path_factory.mktemp("blocks") / f"m-{request.param}.gguf", config, weights, request.param)
    model = load_model(path)
    return request.param, model, weights


def test_load_keeps_blocks_and_logits_are_near_the_float64_reference(block_model):
    ggml_type, model, weights = block_model
    assert model.weights.layers[0].w2.type_tag == ggml_type.lower()
    assert model.weights.classifier.type_tag == ggml_type.lower()
    expected = random_weights(model.config, 5)  # the same weights, as gguf dequantizes what was stored
    for stored, layer in zip(expected.layers, weights.layers):
        for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
            setattr(stored, name, stored_values(getattr(layer, name), ggml_type))
    expected.token_embedding = stored_values(weights.token_embedding, ggml_type)
    expected.classifier = stored_values(weights.classifier, ggml_type)
    reference = reference_logits(model.config, expected, PROMPT)
    got = LocalEngine(model.config, model.weights).step(np.array(PROMPT), [StepSequence(0, 0, len(PROMPT))],
                                                        all_logits=True)
    # Each product moves by at most ~1/254 of sum |x||w| (activation quantization, above); over
    # two layers and the classifier these seeded weights land at 2.0-2.2% of the logits' scale,
    # as much as float32 weights with x quantized the same way in float64 do (checked by hand),
    # so 3% is that with a margin; a wrong block layout or scale is off by the whole scale.
    scale = np.abs(reference).max()
    assert np.abs(got - reference).max() <= 0.03 * scale


def test_every_worker_count_gives_the_in_process_tokens(block_model, tmp_path):
    ggml_type, model, _ = block_model
    expected = greedy_tokens(LocalEngine(model.config, model.weights))
    for n_workers in (1, 2, 3):
        assert greedy_tokens(ThreadedCluster(model.config, model.weights, n_workers, 32)) == expected, n_workers
    folder = tmp_path / "shards"
    write_shards(model, 2, folder, progress=False)
    shard = load_shard(folder / "shard-1-of-2.bin")
    assert shard.weights.layers[0].wo.type_tag == ggml_type.lower()  # stored and read back as blocks
    assert load_embedding(folder).type_tag == ggml_type.lower()
    engine = open_local_engine(folder, 2)
    try:
        assert greedy_tokens(engine) == expected
    finally:
        engine.close()


def test_a_worker_count_that_cuts_a_block_is_refused_by_name(tmp_path):
    config = ModelConfig(dim=64, hidden_dim=96, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=70, seq_len=16,
                         shared_classifier=True)  # head_dim 16: 3 workers cut wo at column 16 * 3 = 48
    model = load_model(write_gguf(tmp_path / "m.gguf", config, random_weights(config, 1), "Q8_0"))
    with pytest.raises(ConfigError, match="cannot cut q8_0 wo for worker 1 of 3"):
        write_shards(model, 3, tmp_path / "shards", progress=False)
    with pytest.raises(ConfigError, match="cannot cut q8_0 wo"):  # so does the in-process slicer
        ThreadedCluster(model.config, model.weights, 3, 32)


@pytest.mark.parametrize("fmt", FORMATS)
def test_expansion_equals_gguf_dequantize_on_every_backend(backend, fmt):
    w, _ = random_case((37, 160), 1)
    blocks = gguf_blocks(w, fmt)
    np.testing.assert_array_equal(kernels.dequantize_gguf(fmt, blocks), gguf_values(blocks, fmt).astype(np.float32))


def test_llama2c_expansion_is_values_times_their_group_scale(backend):
    rng = np.random.default_rng(4)
    values = rng.integers(-127, 128, (5, 96), dtype=np.int8)
    scales = rng.random(5 * 96 // 32, dtype=np.float32)
    expected = (values.astype(np.float64).reshape(5, 3, 32) * scales.reshape(5, 3, 1)).reshape(5, 96)
    np.testing.assert_array_equal(kernels.dequantize_llama2c(values, scales, 32), expected.astype(np.float32))
