"""GGUF: block decoders against gguf's own dequantizer, files written by gguf's GGUFWriter in every
supported type, the logits they give, and one-line errors for broken files."""

import struct

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from llmtp.common.errors import FormatError  # noqa: E402
from llmtp.common.formats.ggml_blocks import RawTensor, to_float32  # noqa: E402
from llmtp.common.formats.gguf_file import read_gguf  # noqa: E402
from llmtp.common.model.config import ModelConfig  # noqa: E402
from llmtp.coordinator.local_engine import LocalEngine  # noqa: E402
from llmtp.common.model.transformer import StepSequence  # noqa: E402

from gguf_factory import encode, random_k_blocks, stored_values, write_gguf  # noqa: E402
from model_factory import random_weights  # noqa: E402

TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")


def small_config(shared: bool = False, **changes) -> ModelConfig:
    # every matrix dimension a multiple of 32 (a quantization block); GQA 4/2, head_dim 16
    values = dict(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=70, seq_len=32,
                  shared_classifier=shared, rope_theta=50000.0, norm_eps=1e-6)
    values.update(changes)
    return ModelConfig(**values)


@pytest.mark.parametrize("ggml_type", TYPES)
def test_block_decoder_matches_gguf_dequantize(ggml_type):
    rng = np.random.default_rng(7)
    values = rng.standard_normal((6, 96)).astype(np.float32) * 3
    data, kind = encode(values, ggml_type)
    raw = RawTensor("t", ggml_type, values.shape, np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    ours = to_float32(raw).astype(np.float64)
    theirs = (data.astype(np.float64) if kind is None
              else gguf.quants.dequantize(data, kind).astype(np.float64).reshape(values.shape))
    np.testing.assert_array_equal(ours, theirs)
    if ggml_type.startswith("Q"):  # and the quantization is a real one (not all zeros)
        assert np.abs(ours - values).max() < 0.25 * np.abs(values).max()


@pytest.mark.parametrize("ggml_type", TYPES)
@pytest.mark.parametrize("shared", [False, True])
def test_gguf_loads_config_and_weights(tmp_path, ggml_type, shared):
    config = small_config(shared)
    weights = random_weights(config, 3)
    path = write_gguf(tmp_path / "m.gguf", config, weights, ggml_type)
    model = read_gguf(path)
    assert model.config == config
    assert model.tensor_types["layers.1.wk"] == ggml_type
    assert model.tensor_types["layers.0.attn_norm"] == "F32"
    # Q8_0 / Q4_0 / Q4_1 stay blocks (their own Matrix type); the others are float32
    kept = ggml_type.lower() if ggml_type.startswith("Q") else "f32"
    assert model.weights.layers[1].wk.type_tag == kept and model.weights.token_embedding.type_tag == kept
    np.testing.assert_array_equal(model.weights.layers[1].wk.dequantize(),
                                  stored_values(weights.layers[1].wk, ggml_type))
    np.testing.assert_array_equal(model.weights.token_embedding.dequantize(),
                                  stored_values(weights.token_embedding, ggml_type))
    np.testing.assert_array_equal(model.weights.final_norm, weights.final_norm)
    assert (model.weights.classifier is model.weights.token_embedding) == shared
    if not shared:
        np.testing.assert_array_equal(model.weights.classifier.dequantize(),
                                      stored_values(weights.classifier, ggml_type))


def test_f32_tensors_are_views_of_the_map(tmp_path):
    config = small_config()
    model = read_gguf(write_gguf(tmp_path / "m.gguf", config, random_weights(config, 3), "F32"))
    assert not model.weights.layers[0].wq.flags.owndata
    assert not model.weights.layers[0].wq.flags.writeable


def logits(config, weights, ids):
    engine = LocalEngine(config, weights)
    return engine.step(np.array(ids), [StepSequence(0, 0, len(ids))], all_logits=True)


@pytest.mark.parametrize("ggml_type", ("F32", "F16", "BF16"))
def test_logits_equal_those_of_the_stored_weights(tmp_path, ggml_type):
    """The forward over a GGUF equals the forward over gguf's own dequantization of its tensors
    (the block types, whose products quantize activations: tests/test_gguf_blocks.py)."""
    config = small_config()
    weights = random_weights(config, 5)
    model = read_gguf(write_gguf(tmp_path / "m.gguf", config, weights, ggml_type))
    expected_weights = random_weights(config, 5)
    for layer in expected_weights.layers:
        for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
            setattr(layer, name, stored_values(getattr(layer, name), ggml_type))
    expected_weights.token_embedding = stored_values(expected_weights.token_embedding, ggml_type)
    expected_weights.classifier = stored_values(expected_weights.classifier, ggml_type)
    ids = [1, 5, 69, 0, 17, 42, 8]
    np.testing.assert_allclose(logits(model.config, model.weights, ids),
                               logits(config, expected_weights, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("ggml_type", ["Q4_K", "Q6_K"])
def test_k_quant_decoder_matches_gguf_dequantize(ggml_type):
    blocks = random_k_blocks(np.random.default_rng(11), (4, 512), ggml_type)
    raw = RawTensor("t", ggml_type, (4, 512), blocks.reshape(-1))
    theirs = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[ggml_type]).astype(np.float64)
    assert np.abs(theirs).max() > 0.01
    np.testing.assert_array_equal(to_float32(raw).astype(np.float64), theirs)


@pytest.mark.parametrize("ggml_type", ["Q4_K", "Q6_K"])
def test_k_quant_file(tmp_path, ggml_type):
    """K-quants cover 256 values: a model whose every matrix row is whole blocks."""
    config = small_config(dim=256, hidden_dim=256, n_heads=4, n_kv_heads=2)
    rng = np.random.default_rng(5)
    written = {}

    def random_blocks(name, values, kind):
        written[name] = random_k_blocks(rng, values.shape, kind)
        return written[name], gguf.GGMLQuantizationType[kind]

    path = write_gguf(tmp_path / "k.gguf", config, random_weights(config, 3), ggml_type, encoder=random_blocks)
    model = read_gguf(path)
    assert model.tensor_types["layers.0.w2"] == ggml_type
    expected = gguf.quants.dequantize(written["blk.1.ffn_down.weight"], gguf.GGMLQuantizationType[ggml_type])
    np.testing.assert_array_equal(model.weights.layers[1].w2, expected)
    assert np.isfinite(logits(model.config, model.weights, [1, 2, 3])).all()


# ---------------------------------------------------------------------------------------------
# broken and unsupported files: one line naming the file and the field


def one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture
def good_file(tmp_path):
    config = small_config()
    return write_gguf(tmp_path / "m.gguf", config, random_weights(config, 3), "Q8_0")


@pytest.mark.parametrize("keep", [3, 20, 200, 0.5, 0.999])
def test_truncated_file(tmp_path, good_file, keep):
    data = good_file.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(FormatError) as error:
        read_gguf(cut)
    one_line(error, str(cut))
    if isinstance(keep, float) and keep > 0.9:
        one_line(error, "truncated", "tensor ")


def test_unknown_tensor_type(tmp_path, good_file):
    data = bytearray(good_file.read_bytes())
    name = b"blk.0.attn_q.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", data, at)
    type_at = at + 4 + 8 * n_dims
    assert struct.unpack_from("<I", data, type_at)[0] == gguf.GGMLQuantizationType.Q8_0
    struct.pack_into("<I", data, type_at, 250)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError) as error:
        read_gguf(bad)
    one_line(error, str(bad), "blk.0.attn_q.weight", "unknown GGML type 250")


def test_unsupported_tensor_type(tmp_path):
    config = small_config()
    path = write_gguf(tmp_path / "q5.gguf", config, random_weights(config, 3), "Q5_0")  # gguf can make it
    with pytest.raises(FormatError) as error:
        read_gguf(path)
    one_line(error, str(path), "type Q5_0", "not supported")


def test_architecture_not_llama(tmp_path):
    config = small_config()
    path = write_gguf(tmp_path / "qwen.gguf", config, random_weights(config, 3), arch="qwen2")
    with pytest.raises(FormatError) as error:
        read_gguf(path)
    one_line(error, str(path), "general.architecture", "qwen2")


@pytest.mark.parametrize("key, value", [("llama.rope.scaling.type", "linear"),
                                        ("split.count", (gguf.GGUFValueType.UINT16, 3)),
                                        ("llama.expert_count", 4),
                                        ("llama.attention.sliding_window", 16),
                                        ("llama.attention.key_length", 8)])
def test_unsupported_metadata(tmp_path, key, value):
    config = small_config()
    path = write_gguf(tmp_path / "m.gguf", config, random_weights(config, 3), extra={key: value})
    with pytest.raises(FormatError) as error:
        read_gguf(path)
    one_line(error, str(path), key)


def test_missing_metadata_and_tensor(tmp_path):
    config = small_config()
    weights = random_weights(config, 3)
    weights.layers = weights.layers[:1]
    path = write_gguf(tmp_path / "m.gguf", config, weights)
    with pytest.raises(FormatError) as error:
        read_gguf(path)
    one_line(error, str(path), "layers.1.")


def test_not_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF" + b"\xff" * 40)
    with pytest.raises(FormatError) as error:
        read_gguf(path)
    one_line(error, str(path))


def test_array_count_beyond_the_file(tmp_path):
    config = small_config()
    path = write_gguf(tmp_path / "m.gguf", config, random_weights(config, 3),
                      tokenizer={"model": "gpt2", "tokens": ["a", "b", "ab"], "merges": ["a b"]})
    data = bytearray(path.read_bytes())
    key = b"tokenizer.ggml.tokens"
    at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key) + 4 + 4  # past key, type, item type
    assert struct.unpack_from("<Q", data, at)[0] == 3
    struct.pack_into("<Q", data, at, 1 << 60)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError) as error:
        read_gguf(bad)
    one_line(error, str(bad), "claims 1152921504606846976 items")


def test_progress_reports_every_tensor(tmp_path):
    config = small_config()
    path = write_gguf(tmp_path / "m.gguf", config, random_weights(config, 3), "Q4_0")
    calls = []
    read_gguf(path, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(done, 21) for done in range(1, 22)]  # 2 layers of 9, embedding, norm, output
