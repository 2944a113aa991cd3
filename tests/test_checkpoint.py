"""llama2.c checkpoints: round trips between versions 0/1/2, the real stories260K file,
memory mapping, header validation and group-size rules.

Expected sizes and header offsets are worked out by hand here, not taken from the module.
"""

import mmap
import struct
from pathlib import Path

import numpy as np
import pytest

from llmtp.common.formats.checkpoint import (Checkpoint, convert_checkpoint, default_group_size, describe_checkpoint,
                               load_checkpoint, valid_group_sizes, write_checkpoint)
from llmtp.common.model.config import ModelConfig
from llmtp.common.errors import ConfigError, FormatError
from llmtp.common.model.q8_grouped import GroupedQ8Matrix as QuantizedMatrix
from model_factory import make_config, random_weights, write_random_checkpoint

MODELS_DIR = Path(__file__).resolve().parents[2] / "shared" / "models"
STORIES = MODELS_DIR / "stories260K" / "stories260K.bin"
needs_stories = pytest.mark.skipif(not STORIES.is_file(), reason=f"{STORIES} not present (shared models folder)")

STORIES_CONFIG = ModelConfig(dim=64, hidden_dim=172, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512,
                             seq_len=512, shared_classifier=True)
LAYER_FIELDS = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3")

CONFIGS = {
    "gqa-separate": make_config(),
    "gqa-shared": make_config(shared_classifier=True),
    "stories-shape": make_config(dim=64, hidden_dim=172, n_layers=3, n_heads=8, n_kv_heads=4, vocab_size=53,
                                 seq_len=16, shared_classifier=True),
    # group size 3, int8 blocks of 2 mod 4 bytes: every later fp32 array is unaligned
    "tiny-odd": make_config(dim=6, hidden_dim=9, n_layers=1, n_heads=3, n_kv_heads=1, vocab_size=7, seq_len=5),
}
each_config = pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())


def named_tensors(weights):
    yield "token_embedding", weights.token_embedding
    for i, layer in enumerate(weights.layers):
        for name in LAYER_FIELDS:
            yield f"layers.{i}.{name}", getattr(layer, name)
    yield "final_norm", weights.final_norm
    yield "classifier", weights.classifier


def dequantized(matrix: QuantizedMatrix) -> np.ndarray:
    groups = matrix.values.astype(np.float32).reshape(-1, matrix.group_size)
    return (groups * matrix.scales[:, None]).reshape(matrix.values.shape)


def assert_same_tensors(actual, expected):
    for (name, got), (_, want) in zip(named_tensors(actual), named_tensors(expected), strict=True):
        assert isinstance(got, np.ndarray) and got.dtype == np.float32, name
        assert np.array_equal(got, want), name


def assert_mapped(array: np.ndarray, name: str):
    """A read-only view whose base chain ends in a memory map."""
    assert not array.flags.owndata and not array.flags.writeable, name
    base = array
    while isinstance(base, (np.ndarray, memoryview)):
        base = base.obj if isinstance(base, memoryview) else base.base
    assert isinstance(base, (mmap.mmap, np.memmap)), f"{name}: base is {type(base)}"


def assert_all_mapped(weights):
    for name, tensor in named_tensors(weights):
        parts = [tensor.values, tensor.scales] if isinstance(tensor, QuantizedMatrix) else [tensor]
        for part in parts:
            assert_mapped(part, name)


# --- round trips -------------------------------------------------------------------------


@each_config
def test_fp32_versions_round_trip(config, tmp_path):
    weights = random_weights(config, seed=1)
    for version in (0, 1):
        ckpt = load_checkpoint(write_checkpoint(tmp_path / f"v{version}.bin", config, weights, version))
        assert (ckpt.version, ckpt.config, ckpt.group_size) == (version, config, None)
        assert_same_tensors(ckpt.weights, weights)
        assert_all_mapped(ckpt.weights)
        assert (ckpt.weights.classifier is ckpt.weights.token_embedding) == config.shared_classifier
    # v0 -> v1 -> v0 and v1 -> v0 -> v1 give back the same bytes
    convert_checkpoint(tmp_path / "v0.bin", tmp_path / "v0-v1.bin", 1)
    convert_checkpoint(tmp_path / "v0-v1.bin", tmp_path / "v0-v1-v0.bin", 0)
    convert_checkpoint(tmp_path / "v1.bin", tmp_path / "v1-v0.bin", 0)
    assert (tmp_path / "v0-v1.bin").read_bytes() == (tmp_path / "v1.bin").read_bytes()
    assert (tmp_path / "v0-v1-v0.bin").read_bytes() == (tmp_path / "v0.bin").read_bytes()
    assert (tmp_path / "v1-v0.bin").read_bytes() == (tmp_path / "v0.bin").read_bytes()


@each_config
def test_q8_values_within_half_a_step_of_fp32(config, tmp_path):
    weights = random_weights(config, seed=2)
    ckpt = load_checkpoint(write_checkpoint(tmp_path / "q.bin", config, weights, 2))
    group_size = ckpt.group_size
    assert ckpt.version == 2 and config.dim % group_size == 0 and config.hidden_dim % group_size == 0
    assert_all_mapped(ckpt.weights)
    for (name, got), (_, source) in zip(named_tensors(ckpt.weights), named_tensors(weights), strict=True):
        if name.endswith("norm"):
            assert np.array_equal(got, source), name
            continue
        assert isinstance(got, QuantizedMatrix) and got.group_size == group_size, name
        assert got.values.dtype == np.int8 and got.values.shape == source.shape, name
        assert got.scales.dtype == np.float32 and got.scales.shape == (source.size // group_size,), name
        group_max = np.abs(source.reshape(-1, group_size)).max(axis=1)
        assert np.allclose(got.scales, group_max / 127, rtol=1e-6), name
        error = np.abs(dequantized(got) - source).reshape(-1, group_size).max(axis=1)
        assert np.all(error <= group_max / 127 / 2 * (1 + 1e-5) + 1e-12), name
    assert (ckpt.weights.classifier is ckpt.weights.token_embedding) == config.shared_classifier


@each_config
def test_v2_rewrite_is_bit_identical_and_v1_is_its_dequantization(config, tmp_path):
    first = write_random_checkpoint(tmp_path / "a.bin", config, seed=3, version=2)
    ckpt = load_checkpoint(first)
    write_checkpoint(tmp_path / "b.bin", ckpt.config, ckpt.weights, 2)
    write_checkpoint(tmp_path / "c.bin", ckpt.config, ckpt.weights, 2, group_size=ckpt.group_size)
    assert (tmp_path / "b.bin").read_bytes() == first.read_bytes()
    assert (tmp_path / "c.bin").read_bytes() == first.read_bytes()
    fp32 = convert_checkpoint(first, tmp_path / "d.bin", 1)
    for (name, got), (_, quantized) in zip(named_tensors(fp32.weights), named_tensors(ckpt.weights), strict=True):
        want = dequantized(quantized) if isinstance(quantized, QuantizedMatrix) else quantized
        assert np.array_equal(got, want), name


def test_file_sizes_and_header_fields(tmp_path):
    config = make_config()  # dim 48, hidden 100, 2 layers, kv_dim 16, vocab 67, seq 32, separate classifier
    # floats: embedding 67*48 = 3216; per layer 2*48 norms + 48*48 wq + 2*16*48 wk,wv + 48*48 wo
    # + 3*100*48 = 20640; final norm 48; classifier 3216  => 3216 + 2*20640 + 48 + 3216 = 47760
    # v0 adds 28 header bytes and two RoPE tables of 32*4 floats; v1 has a 256-byte header
    # v2 (group 4): 2*2*48 + 48 = 240 fp32 norms; 47520 int8 matrix values + 47520/4 fp32 scales
    expected = {0: 28 + 4 * (47760 + 2 * 32 * 4), 1: 256 + 4 * 47760, 2: 256 + 4 * 240 + 47520 + 4 * 47520 // 4}
    assert expected == {0: 192092, 1: 191296, 2: 96256}
    for version, size in expected.items():
        path = write_random_checkpoint(tmp_path / f"v{version}.bin", config, seed=4, version=version)
        assert path.stat().st_size == size
        assert load_checkpoint(path).n_bytes == size
    v0, v1, v2 = ((tmp_path / f"v{v}.bin").read_bytes() for v in (0, 1, 2))
    assert struct.unpack_from("<7i", v0) == (48, 100, 2, 6, 2, -67, 32)  # negative vocab: separate classifier
    assert struct.unpack_from("<Ii7iB", v1) == (0x616B3432, 1, 48, 100, 2, 6, 2, 67, 32, 0)
    assert struct.unpack_from("<Ii7iBi", v2) == (0x616B3432, 2, 48, 100, 2, 6, 2, 67, 32, 0, 4)
    assert v1[37:256] == bytes(219) and v2[41:256] == bytes(215)


def test_convert_onto_itself(tmp_path):
    config = make_config()
    path = write_random_checkpoint(tmp_path / "m.bin", config, seed=5, version=1)
    ckpt = convert_checkpoint(path, path, 2, group_size=2)
    assert isinstance(ckpt, Checkpoint) and (ckpt.version, ckpt.group_size) == (2, 2)
    assert path.stat().st_size == 256 + 4 * 240 + 47520 + 4 * 47520 // 2
    source = random_weights(config, seed=5)
    assert np.abs(dequantized(ckpt.weights.layers[1].w2) - source.layers[1].w2).max() <= 0.5 / 127
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin"]


# --- the real stories260K ------------------------------------------------------------------


@needs_stories
def test_stories260K_loads_as_memory_mapped_v0():
    ckpt = load_checkpoint(STORIES)
    assert (ckpt.version, ckpt.config, ckpt.group_size) == (0, STORIES_CONFIG, None)
    assert ckpt.n_bytes == 1056540 == STORIES.stat().st_size
    assert ckpt.weights.classifier is ckpt.weights.token_embedding
    assert_all_mapped(ckpt.weights)
    # floats: embedding 512*64 = 32768; per layer 64 + 64*64 + 2*32*64 + 64*64 + 64 + 3*172*64 = 45440
    assert np.array_equal(ckpt.weights.token_embedding,
                          np.fromfile(STORIES, "<f4", 512 * 64, offset=28).reshape(512, 64))
    first_wq = 28 + 4 * (32768 + 5 * 64)
    assert np.array_equal(ckpt.weights.layers[0].wq, np.fromfile(STORIES, "<f4", 64 * 64, offset=first_wq).reshape(64, 64))
    final_norm = 28 + 4 * (32768 + 5 * 45440)
    assert np.array_equal(ckpt.weights.final_norm, np.fromfile(STORIES, "<f4", 64, offset=final_norm))


@needs_stories
def test_stories260K_rewritten_as_v0_reproduces_the_file(tmp_path):
    ckpt = load_checkpoint(STORIES)
    ours = write_checkpoint(tmp_path / "v0.bin", ckpt.config, ckpt.weights, 0).read_bytes()
    theirs = STORIES.read_bytes()
    rope_start = 28 + 4 * (32768 + 5 * 45440 + 64)  # then 2 tables of 512*4 floats up to the end
    assert len(ours) == len(theirs) and rope_start + 2 * 512 * 4 * 4 == len(theirs)
    assert ours[:rope_start] == theirs[:rope_start]
    # RoPE tables are unused; torch's float32 cos/sin may differ from ours in the last bit
    rope_ours, rope_theirs = (np.frombuffer(data[rope_start:], "<f4") for data in (ours, theirs))
    assert np.allclose(rope_ours, rope_theirs, rtol=0, atol=1e-6)


@needs_stories
def test_stories260K_to_v2_uses_group_4_and_refuses_64(tmp_path):
    ckpt = convert_checkpoint(STORIES, tmp_path / "q.bin", 2)
    # norms 5*2*64 + 64 = 704 floats; matrices 32768 + 5*(64*64*2 + 2*32*64 + 3*172*64) = 259328 values
    assert (ckpt.version, ckpt.group_size, ckpt.n_bytes) == (2, 4, 256 + 4 * 704 + 259328 + 4 * 259328 // 4)
    assert ckpt.weights.classifier is ckpt.weights.token_embedding
    with pytest.raises(ConfigError, match=r"group_size 64 does not divide hidden_dim 172.*1, 2, 4"):
        convert_checkpoint(STORIES, tmp_path / "q64.bin", 2, group_size=64)
    assert not (tmp_path / "q64.bin").exists()


# --- validation ------------------------------------------------------------------------------


def patch(fmt: str, offset: int, value):
    def apply(data: bytes) -> bytes:
        buffer = bytearray(data)
        struct.pack_into(fmt, buffer, offset, value)
        return bytes(buffer)
    return apply


# make_config() files: v0 192092 bytes, v1 191296, v2 96256 (see test_file_sizes_and_header_fields).
# v1/v2 header offsets: magic 0, version 4, dim 8, hidden_dim 12, n_layers 16, n_heads 20,
# n_kv_heads 24, vocab_size 28, seq_len 32, shared_classifier 36, group_size 37.
# v0 header offsets: dim 0, hidden_dim 4, n_layers 8, n_heads 12, n_kv_heads 16, vocab_size 20, seq_len 24.
BAD_FILES = {
    "empty": (1, lambda data: b"", ["size 0 bytes", "shorter", "header"]),
    "short-v0": (0, lambda data: data[:10], ["size 10 bytes", "shorter", "28-byte"]),
    "short-v1": (1, lambda data: data[:100], ["size 100 bytes", "shorter", "256-byte"]),
    "wrong-magic": (1, lambda data: b"XXXX" + data[4:], ["magic 0x58585858", "expected 0x616b3432"]),
    "unknown-version": (1, patch("<i", 4, 3), ["version 3", "expected 1 or 2"]),
    "zero-layers": (1, patch("<i", 16, 0), ["n_layers", "positive", "got 0"]),
    "negative-dim-v0": (0, patch("<i", 0, -48), ["dim", "positive", "got -48"]),
    "dim-vs-heads": (1, patch("<i", 20, 5), ["dim 48", "n_heads 5"]),
    "heads-vs-kv-heads": (1, patch("<i", 24, 4), ["n_heads 6", "n_kv_heads 4"]),
    "shared-flag": (1, patch("<B", 36, 2), ["shared_classifier", "2", "expected 0 or 1"]),
    "group-size-zero": (2, patch("<i", 37, 0), ["group_size", "positive", "got 0"]),
    "group-size-vs-dim": (2, patch("<i", 37, 5), ["group_size 5", "dim 48", "1, 2, 4"]),
    "group-size-vs-hidden": (2, patch("<i", 37, 8), ["group_size 8", "hidden_dim 100", "1, 2, 4"]),
    "truncated-v1": (1, lambda data: data[:-4], ["size 191292 bytes, header implies 191296 (truncated)"]),
    "truncated-v2": (2, lambda data: data[:-1], ["size 96255 bytes, header implies 96256 (truncated)"]),
    "trailing-v0": (0, lambda data: data + b"\0" * 4, ["size 192096 bytes, header implies 192092 (trailing"]),
    # 3 layers instead of 2: 20640 more floats than the file holds
    "header-says-more-layers": (1, patch("<i", 16, 3),
                                [f"size 191296 bytes, header implies {191296 + 4 * 20640} (truncated)"]),
}


@pytest.fixture(scope="module")
def good_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    return {version: write_random_checkpoint(folder / f"v{version}.bin", make_config(), seed=6,
                                             version=version).read_bytes() for version in (0, 1, 2)}


@pytest.mark.parametrize("version, corrupt, fragments", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_file_is_one_line_format_error(version, corrupt, fragments, good_files, tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(corrupt(good_files[version]))
    with pytest.raises(FormatError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_missing_file_is_format_error(tmp_path):
    with pytest.raises(FormatError, match="absent.bin"):
        load_checkpoint(tmp_path / "absent.bin")


# --- group sizes and writer arguments ----------------------------------------------------------


@pytest.mark.parametrize("dims, allowed, default", [
    ((64, 172), [1, 2, 4], 4),  # stories260K
    ((48, 100), [1, 2, 4], 4),
    ((6, 9), [1, 3], 3),
    ((128, 384), [1, 2, 4, 8, 16, 32, 64, 128], 64),
    ((288, 768), [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96], 48),  # stories15M
])
def test_group_size_rules(dims, allowed, default):
    dim, hidden_dim = dims
    config = ModelConfig(dim=dim, hidden_dim=hidden_dim, n_layers=1, n_heads=1, n_kv_heads=1, vocab_size=8,
                         seq_len=4)
    assert valid_group_sizes(config) == allowed
    assert default_group_size(config) == default


def test_writer_refuses_bad_arguments(tmp_path):
    config = make_config()
    weights = random_weights(config, seed=7)
    with pytest.raises(ConfigError, match=r"group_size 3 does not divide hidden_dim 100; allowed .*: 1, 2, 4"):
        write_checkpoint(tmp_path / "a.bin", config, weights, 2, group_size=3)
    with pytest.raises(ConfigError, match="only to version 2"):
        write_checkpoint(tmp_path / "b.bin", config, weights, 1, group_size=4)
    with pytest.raises(ConfigError, match="version 3"):
        write_checkpoint(tmp_path / "c.bin", config, weights, 3)
    weights.layers[1].wk = weights.layers[1].wk[:, :-1]
    with pytest.raises(ValueError, match=r"layers.1.wk: shape \(16, 47\), config implies \(16, 48\)"):
        write_checkpoint(tmp_path / "d.bin", config, weights, 1)
    assert list(tmp_path.iterdir()) == []


def test_describe_checkpoint(tmp_path):
    path = write_random_checkpoint(tmp_path / "m.bin", make_config(), seed=8, version=2)
    text = describe_checkpoint(load_checkpoint(path))
    lines = text.splitlines()
    for expected in (str(path), "version 2", "group size:    4", "dim:           48", "hidden_dim:    100",
                     "n_layers:      2", "n_heads:       6", "n_kv_heads:    2", "vocab_size:    67",
                     "seq_len:       32", "head_dim:      8", "kv_dim:        16", "separate",
                     "parameters:    47,760", "file bytes:    96,256"):
        assert any(expected in line for line in lines), expected
    rows = {line.split()[0]: line for line in lines if line.startswith("  ")}
    assert "(67, 48)" in rows["token_embedding"] and "int8" in rows["token_embedding"]
    assert "(67, 48)" in rows["classifier"]
    assert "(16, 48)" in rows["layers.{0..1}.wk"] and "(100, 48)" in rows["layers.{0..1}.w1"]
    assert "(48,)" in rows["final_norm"] and "float32" in rows["final_norm"]


def test_llama2c_files_refuse_a_rope_theta_or_eps_they_cannot_store(tmp_path):
    from dataclasses import replace
    base = make_config()
    for field, value in (("rope_theta", 500000.0), ("norm_eps", 1e-6)):
        config = replace(base, **{field: value})
        with pytest.raises(FormatError) as error:
            write_checkpoint(tmp_path / "out.bin", config, random_weights(config, seed=1), version=1)
        assert field in str(error.value) and "\n" not in str(error.value)
        assert not (tmp_path / "out.bin").exists()


@pytest.mark.parametrize("field, value", [("rope_theta", 0.0), ("norm_eps", float("nan")), ("rope_theta", 10000)])
def test_config_rope_theta_and_eps_must_be_positive_floats(field, value):
    from dataclasses import replace
    with pytest.raises(FormatError, match=field):
        replace(make_config(), **{field: value}).validate("test")


@pytest.mark.parametrize("n_heads, hidden_dim, default, counts_at_64", [
    (4, 384, 32, [1, 2]),  # head_dim 32: a group of 64 spans two heads, so 3 and 4 workers would split one
    (2, 384, 64, [1, 2]),  # head_dim 64: 64 cuts every count
    (8, 384, 16, [1, 2]),  # head_dim 16: 4 workers start at head 2, column 32
])
def test_default_group_size_cuts_for_every_worker_count(n_heads, hidden_dim, default, counts_at_64):
    from llmtp.common.model.quantize import cuttable_worker_counts, quantize_q80
    from llmtp.common.model.slicing import worker_counts_that_cut

    config = ModelConfig(dim=128, hidden_dim=hidden_dim, n_layers=1, n_heads=n_heads, n_kv_heads=n_heads,
                         vocab_size=8, seq_len=4)
    assert default_group_size(config) == default
    assert cuttable_worker_counts(config, default) == list(range(1, n_heads + 1))
    assert cuttable_worker_counts(config, 64) == counts_at_64
    # the same counts as cutting real v2 weights of group 64 finds (the slicer's own checks)
    weights = random_weights(config, seed=1)
    for layer in weights.layers:
        for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
            setattr(layer, name, quantize_q80(getattr(layer, name), 64))
    weights.classifier = quantize_q80(weights.classifier, 64)
    assert worker_counts_that_cut(weights, config) == counts_at_64
