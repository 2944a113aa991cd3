"""Hugging Face folders written by transformers' save_pretrained (tests/fixtures/hf_folders, made by
tools/make_hf_folder_fixtures.py): logits against transformers' own, in-process and split over
workers; the same weights as GGUF; one-line errors for broken or unsupported folders."""

import json
import shutil
from pathlib import Path

import numpy as np

from llmtp.common.model.matrices import F32Matrix
import pytest

pytest.importorskip("safetensors")

from llmtp.common.errors import FormatError  # noqa: E402
from llmtp.common.formats.gguf_file import read_gguf  # noqa: E402
from llmtp.common.formats.load import GGUF, HUGGING_FACE, LLAMA2C, detect_format, load_model  # noqa: E402
from llmtp.common.model.config import ModelConfig  # noqa: E402
from llmtp.common.model.transformer import StepSequence  # noqa: E402
from llmtp.coordinator.local_engine import LocalEngine  # noqa: E402

from inproc_cluster import ThreadedCluster  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "hf_folders"
NAMES = ("fp32_gqa_tied", "bf16_gqa_sharded", "fp16_mha_untied")
TOLERANCE = 1e-4  # of the logits' scale


def reference(name: str) -> tuple[list[int], np.ndarray]:
    folder = FIXTURES / name
    return json.loads((folder / "fixture.json").read_text())["token_ids"], np.load(folder / "logits.npy")


def all_logits(engine, ids: list[int]) -> np.ndarray:
    return engine.step(np.array(ids), [StepSequence(0, 0, len(ids))], all_logits=True)


def assert_close_to(ours: np.ndarray, theirs: np.ndarray) -> None:
    scale = np.abs(theirs).max()
    assert scale > 1.0  # logits of substance, not near-zero noise
    assert np.abs(ours - theirs).max() <= TOLERANCE * scale, np.abs(ours - theirs).max() / scale


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
    ids, expected = reference(name)
    model = load_model(FIXTURES / name)
    assert model.source_format == HUGGING_FACE
    assert_close_to(all_logits(LocalEngine.from_checkpoint(model), ids), expected)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n_workers", [2, 4])
def test_logits_match_transformers_over_workers(name, n_workers):
    ids, expected = reference(name)
    model = load_model(FIXTURES / name)
    assert_close_to(all_logits(ThreadedCluster(model.config, model.weights, n_workers), ids), expected)


def test_config_and_types_as_saved():
    tied = load_model(FIXTURES / "fp32_gqa_tied")
    assert tied.config == ModelConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64,
                                      seq_len=32, shared_classifier=True, rope_theta=10000.0, norm_eps=1e-5)
    assert tied.weights.classifier is tied.weights.token_embedding
    assert set(tied.tensor_types.values()) == {"F32"}
    sharded = load_model(FIXTURES / "bf16_gqa_sharded")
    assert (sharded.config.rope_theta, sharded.config.norm_eps, sharded.config.shared_classifier) == (50000.0, 1e-6, False)
    assert set(sharded.tensor_types.values()) == {"BF16"} and "classifier" in sharded.tensor_types
    assert load_model(FIXTURES / "fp16_mha_untied").tensor_types["layers.1.wk"] == "F16"


def test_same_weights_as_gguf_give_transformers_logits(tmp_path):
    """GGUF q/k rows are in llama2.c's pair order: a GGUF written as llama.cpp's converter writes
    it (its permute applied to Hugging Face's q_proj/k_proj rows) gives transformers' logits."""
    from safetensors.numpy import load_file

    from gguf_factory import hf_to_interleaved, write_gguf

    ids, expected = reference("fp16_mha_untied")
    model = load_model(FIXTURES / "fp16_mha_untied")
    hf = load_file(FIXTURES / "fp16_mha_untied" / "model.safetensors")
    weights = model.weights
    for i, layer in enumerate(weights.layers):  # independently of hf_folder.py's own permutation
        layer.wq = F32Matrix(hf_to_interleaved(hf[f"model.layers.{i}.self_attn.q_proj.weight"].astype(np.float32), 4))
        layer.wk = F32Matrix(hf_to_interleaved(hf[f"model.layers.{i}.self_attn.k_proj.weight"].astype(np.float32), 4))
        np.testing.assert_array_equal(layer.wq, model.weights.layers[i].wq)
    path = write_gguf(tmp_path / "m.gguf", model.config, weights, "F16")
    assert detect_format(path) == GGUF
    from_gguf = load_model(path)
    assert from_gguf.config == model.config
    assert_close_to(all_logits(LocalEngine(from_gguf.config, from_gguf.weights), ids), expected)
    # and without the permutation the logits are wrong: the test can fail
    for layer in from_gguf.weights.layers:
        layer.wq = F32Matrix(np.ascontiguousarray(hf_to_interleaved(layer.wq, 4)))
    assert np.abs(all_logits(LocalEngine(from_gguf.config, from_gguf.weights), ids) - expected).max() > 0.01


def test_llama2c_detected(tmp_path):
    from model_factory import make_config, write_random_checkpoint

    path = write_random_checkpoint(tmp_path / "model.gguf.bin", make_config(), 1, version=2, group_size=4)
    model = load_model(path)
    assert (model.source_format, model.config) == (LLAMA2C, make_config())
    assert model.tensor_types["layers.0.wq"] == "int8, group 4 (llama2.c)"


# ---------------------------------------------------------------------------------------------
# broken and unsupported folders


def copy_of(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    return folder


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def refused(path: Path, *fragments: str) -> None:
    with pytest.raises(FormatError) as error:
        load_model(path)
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_shard(tmp_path):
    folder = copy_of(tmp_path, "bf16_gqa_sharded")
    (folder / "model-00003-of-00005.safetensors").unlink()
    refused(folder, "model.safetensors.index.json", "model-00003-of-00005.safetensors", "missing")


@pytest.mark.parametrize("changes, fragments", [
    ({"model_type": "mistral"}, ("config.json", "model_type", "mistral")),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}},
     ("config.json", "rope_parameters.rope_type", "llama3")),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, ("config.json", "rope_scaling", "llama3")),
    ({"sliding_window": 4096}, ("config.json", "sliding_window")),
    ({"attention_bias": True}, ("config.json", "attention_bias")),
    ({"hidden_act": "gelu"}, ("config.json", "hidden_act")),
    ({"head_dim": 16}, ("config.json", "head_dim")),
    ({"num_hidden_layers": 3}, ("layers.2.",)),
    ({"hidden_size": 48, "head_dim": 12}, ("shape",)),
])
def test_unsupported_config(tmp_path, changes, fragments):
    folder = copy_of(tmp_path, "fp32_gqa_tied")
    edit_config(folder, **changes)
    refused(folder, *fragments)


def test_old_style_config_keys(tmp_path):
    """transformers 4 wrote rope_theta at the top level and rope_scaling null."""
    folder = copy_of(tmp_path, "fp16_mha_untied")
    config = json.loads((folder / "config.json").read_text())
    del config["rope_parameters"], config["dtype"]
    config.update(rope_theta=500000.0, rope_scaling=None, torch_dtype="float16")
    (folder / "config.json").write_text(json.dumps(config))
    assert load_model(folder).config.rope_theta == 500000.0


def test_folder_without_config(tmp_path):
    refused(tmp_path, "config.json")


def test_corrupt_safetensors(tmp_path):
    folder = copy_of(tmp_path, "fp32_gqa_tied")
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    refused(folder, "model.safetensors")


def test_describe_for_inspect(tmp_path):
    from llmtp.common.formats.load import describe_model, load_model_tokenizer

    from gguf_factory import write_gguf

    model = load_model(FIXTURES / "bf16_gqa_sharded")
    text = describe_model(model)
    assert "Hugging Face" in text and "rope_theta:    50000" in text and "norm_eps:      1e-06" in text
    assert "layers.{0..1}.wq" in text and "BF16" in text
    path = write_gguf(tmp_path / "m.gguf", model.config, model.weights, "Q8_0",
                      tokenizer={"model": "gpt2", "tokens": ["a", "b", "ab"], "merges": ["a b"], "eos_id": 2})
    from_gguf = load_model(path)
    text = describe_model(from_gguf, load_model_tokenizer(from_gguf))
    assert "GGUF v3" in text and "Q8_0" in text and "F32" in text
    assert "tokenizer:     byte-level BPE, 3 tokens" in text


def test_tie_word_embeddings_defaults_to_false_as_in_transformers(tmp_path):
    folder = copy_of(tmp_path, "fp32_gqa_tied")  # saved without lm_head.weight
    config = json.loads((folder / "config.json").read_text())
    del config["tie_word_embeddings"]
    (folder / "config.json").write_text(json.dumps(config))
    refused(folder, "classifier", "missing")


def test_lone_tokenizer_model_is_read_by_sentencepiece(tmp_path):
    from llmtp.common.formats.load import describe_model, load_model_tokenizer

    source = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "stories260K" / "tok512.model"
    if not source.is_file():
        pytest.skip(f"{source} is absent")
    folder = copy_of(tmp_path, "fp32_gqa_tied")
    edit_config(folder, vocab_size=512)
    shutil.copy(source, folder / "tokenizer.model")
    with pytest.raises(FormatError, match="shape"):  # the fixture's embedding has 64 rows
        load_model(folder)
    edit_config(folder, vocab_size=64)
    model = load_model(folder)
    with pytest.raises(FormatError, match="512 tokens"):
        load_model_tokenizer(model)  # sentencepiece's own check: more tokens than the model


@pytest.mark.parametrize("name", ["bf16_gqa_sharded", "fp32_gqa_tied"])
def test_progress_reports_every_tensor(name):
    calls = []
    load_model(FIXTURES / name, progress=lambda done, total: calls.append((done, total)))
    total = calls[-1][1]
    assert calls == [(done, total) for done in range(1, total + 1)]
    assert total == 2 * 9 + 2 + (name != "fp32_gqa_tied")  # per layer 9, embedding, final norm, lm_head
