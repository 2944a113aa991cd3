"""stories260K exported to GGUF and to a Hugging Face folder gives run.c's greedy tokens and text
(../shared/models/stories260K/REFERENCE.md) through load_model and the file's own tokenizer."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from llmtp.common.formats.checkpoint import load_checkpoint  # noqa: E402
from llmtp.common.formats.load import GGUF, HUGGING_FACE, load_model, load_model_tokenizer  # noqa: E402
from llmtp.common.model.transformer import StepSequence  # noqa: E402
from llmtp.coordinator.local_engine import LocalEngine  # noqa: E402

from gguf_factory import sentencepiece_metadata, write_gguf  # noqa: E402
from inproc_cluster import ThreadedCluster  # noqa: E402

STORIES = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "stories260K"
pytestmark = pytest.mark.skipif(not (STORIES / "stories260K.bin").is_file(), reason="stories260K is absent")


def reference_run(name: str) -> tuple[str, list[int], list[int]]:
    """(stdout without run.c's final newline, PROMPT_IDS, ALL_IDS) of one REFERENCE.md run."""
    section = (STORIES / "REFERENCE.md").read_text().split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]
    stdout = re.search(r"stdout:\n```\n(.*?)\n```", section, re.S).group(1)
    prompt_ids = [int(i) for i in re.search(r"PROMPT_IDS: `([\d ]+)`", section).group(1).split()]
    all_ids = [int(i) for i in re.search(r"ALL_IDS: `([\d ]+)`", section).group(1).split()]
    return stdout, prompt_ids, all_ids


def greedy(engine, prompt_ids: list[int], steps: int) -> list[int]:
    """run.c's loop: feed the prompt, then the argmax, until `steps` positions; ids after BOS."""
    fed = list(prompt_ids)
    logits = engine.step(np.array(fed), [StepSequence(0, 0, len(fed))])[0]
    while True:
        token = int(np.argmax(logits))
        if token == 1:
            break
        fed.append(token)
        if len(fed) > steps:  # the token the forward at position steps - 1 chose, not fed again
            break
        logits = engine.step(np.array([token]), [StepSequence(0, len(fed) - 1, 1)])[0]
    return fed[1:]


def interleaved_to_hf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama2.c's pair rows -> Hugging Face rotate-half rows (convert_llama_weights_to_hf's permute)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_hf_folder(folder: Path, checkpoint, tokenizer_json: str) -> Path:
    from safetensors.numpy import save_file

    config, weights = checkpoint.config, checkpoint.weights
    tensors = {"model.embed_tokens.weight": weights.token_embedding, "model.norm.weight": weights.final_norm}
    names = {"attn_norm": "input_layernorm", "wq": "self_attn.q_proj", "wk": "self_attn.k_proj",
             "wv": "self_attn.v_proj", "wo": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}
    for i, layer in enumerate(weights.layers):
        for field, hf_name in names.items():
            value = getattr(layer, field)
            if field in ("wq", "wk"):
                value = interleaved_to_hf(value, config.n_heads if field == "wq" else config.n_kv_heads)
            tensors[f"model.layers.{i}.{hf_name}.weight"] = value
    folder.mkdir()
    save_file({name: np.ascontiguousarray(value, dtype=np.float32) for name, value in tensors.items()},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "vocab_size": config.vocab_size, "max_position_embeddings": config.seq_len, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": True, "hidden_act": "silu", "bos_token_id": 1,
        "eos_token_id": 2, "torch_dtype": "float32"}))
    (folder / "tokenizer.json").write_text(tokenizer_json)
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                              "add_bos_token": True}))
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """stories260K as GGUF (with tok512 as llama.cpp's converter writes it) and as an HF folder
    (tokenizer.json: the GGUF's tokenizer as the tokenizers library saves it)."""
    tmp = tmp_path_factory.mktemp("stories")
    checkpoint = load_checkpoint(STORIES / "stories260K.bin")
    gguf_path = write_gguf(tmp / "stories260K.gguf", checkpoint.config, checkpoint.weights, "F32",
                           tokenizer=sentencepiece_metadata(STORIES / "tok512.model"))
    from_gguf = load_model(gguf_path)
    tokenizer_json = load_model_tokenizer(from_gguf).tokenizer.to_str()
    from_folder = load_model(write_hf_folder(tmp / "stories260K-hf", checkpoint, tokenizer_json))
    return {GGUF: from_gguf, HUGGING_FACE: from_folder}


RUNS = {"s260_once_t0_n64": ("Once upon a time", 64), "s260_noprompt_t0_n256": ("", 256)}


@pytest.mark.parametrize("run", sorted(RUNS))
@pytest.mark.parametrize("source", [GGUF, HUGGING_FACE])
@pytest.mark.parametrize("n_workers", [1, 3])
def test_greedy_equals_run_c(exported, run, source, n_workers):
    stdout, prompt_ids, all_ids = reference_run(run)
    prompt, steps = RUNS[run]
    model = exported[source]
    assert model.source_format == source
    tokenizer = load_model_tokenizer(model)
    assert tokenizer.encode(prompt) == prompt_ids
    engine = (LocalEngine.from_checkpoint(model) if n_workers == 1
              else ThreadedCluster(model.config, model.weights, n_workers))
    ids = greedy(engine, prompt_ids, steps)
    assert ids == all_ids
    assert tokenizer.decode([1] + ids) == stdout


def test_folder_with_only_tokenizer_model(exported, tmp_path):
    """A folder with tokenizer.model and no tokenizer.json: read by sentencepiece as before."""
    import shutil

    from llmtp.common.formats.load import describe_model

    folder = tmp_path / "hf"
    shutil.copytree(exported[HUGGING_FACE].path, folder)
    (folder / "tokenizer.json").unlink()
    shutil.copy(STORIES / "tok512.model", folder / "tokenizer.model")
    model = load_model(folder)
    tokenizer = load_model_tokenizer(model)
    stdout, prompt_ids, all_ids = reference_run("s260_once_t0_n64")
    assert tokenizer.encode("Once upon a time") == prompt_ids
    assert greedy(LocalEngine.from_checkpoint(model), prompt_ids, 64) == all_ids
    assert "SentencePiece (tokenizer.model), 512 tokens" in describe_model(model, tokenizer)


@pytest.mark.parametrize("workers", [None, 2])
@pytest.mark.parametrize("source", [GGUF, HUGGING_FACE])
def test_cli_generates_run_c_text_from_gguf_and_folder(exported, source, workers, tmp_path):
    """Every command that takes a model takes these too: the file's own tokenizer, no -z."""
    from cli_runner import run_llmtp

    stdout, _, _ = reference_run("s260_once_t0_n64")
    path = exported[source].path
    flags = ["--workers", workers] if workers else []
    result = run_llmtp("generate", path, "-t", 0, "-n", 64, "-i", "Once upon a time", *flags,
                       env_extra={"LLMTP_CACHE_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout == stdout + "\n"


@pytest.mark.parametrize("source", [GGUF, HUGGING_FACE])
def test_cli_inspect_and_shard_take_gguf_and_folder(exported, source, tmp_path):
    from cli_runner import run_llmtp

    path = exported[source].path
    inspected = run_llmtp("inspect", path)
    assert inspected.returncode == 0, inspected.stderr
    assert "rope_theta:" in inspected.stdout and "512 tokens" in inspected.stdout
    sharded = run_llmtp("shard", path, "--workers", 2, "-o", tmp_path / "shards")
    assert sharded.returncode == 0, sharded.stderr
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "embedding.bin", "manifest.json", "shard-0-of-2.bin", "shard-1-of-2.bin"]


@pytest.mark.parametrize("source", [GGUF, HUGGING_FACE])
def test_convert_writes_the_llama2c_file_and_tokenizer_run_c_reads(exported, source, tmp_path):
    """Oracles: llama2.c's own export of the same model and tokenizer (stories260K.bin converted
    directly, and tok512.bin), byte for byte; then run.c's text through the converted pair."""
    import shutil

    from cli_runner import run_llmtp

    path = exported[source].path
    if source == HUGGING_FACE:  # run.c merges by score: the folder's tokenizer.model has them
        folder = tmp_path / "hf"
        shutil.copytree(path, folder)
        shutil.copy(STORIES / "tok512.model", folder / "tokenizer.model")
        path = folder
    direct = run_llmtp("convert", STORIES / "stories260K.bin", tmp_path / "direct.bin", "--version", 1)
    assert direct.returncode == 0, direct.stderr
    out = tmp_path / "out" / "model.bin"
    out.parent.mkdir()
    result = run_llmtp("convert", path, out, "--version", 1)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == (tmp_path / "direct.bin").read_bytes()
    assert (out.parent / "tokenizer.bin").read_bytes() == (STORIES / "tok512.bin").read_bytes()
    stdout, _, _ = reference_run("s260_once_t0_n64")
    generated = run_llmtp("generate", out, "-z", out.parent / "tokenizer.bin", "-t", 0, "-n", 64,
                          "-i", "Once upon a time")
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout == stdout + "\n"
    again = run_llmtp("convert", path, tmp_path / "out" / "v2.bin", "--version", 2)  # same tokenizer.bin: kept
    assert again.returncode == 0, again.stderr


def test_convert_refuses_what_llama2c_cannot_hold_before_writing(exported, tmp_path):
    import shutil

    from cli_runner import run_llmtp
    from test_cli_input import assert_one_line_error

    folder = tmp_path / "hf"
    shutil.copytree(exported[HUGGING_FACE].path, folder)
    # tokenizer.json alone: BPE merges, no scores for run.c
    assert_one_line_error(run_llmtp("convert", folder, tmp_path / "a.bin", "--version", 1),
                          "no tokenizer.model", "scores")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"rope_theta": 500000.0}))
    assert_one_line_error(run_llmtp("convert", folder, tmp_path / "b.bin", "--version", 1),
                          "rope_theta is 500000.0", "llama2.c file cannot hold it")
    other = tmp_path / "c" / "tokenizer.bin"
    other.parent.mkdir()
    other.write_bytes(b"another model's tokenizer")
    assert_one_line_error(run_llmtp("convert", exported[GGUF].path, other.parent / "m.bin", "--version", 1),
                          "holds another tokenizer", "--tokenizer-out")
    assert other.read_bytes() == b"another model's tokenizer"
    assert sorted(p.name for p in tmp_path.rglob("*.bin")) == ["tokenizer.bin"]  # nothing else written


@pytest.mark.parametrize("source", [GGUF, HUGGING_FACE])
def test_cluster_yaml_takes_gguf_and_folder(exported, source, tmp_path):
    """model: and tokenizer: of a cluster YAML name the GGUF file or folder; shard --config,
    the config's workers and generate --config give run.c's text."""
    from cli_runner import run_llmtp
    from config_cluster_tools import free_ports, start_config_workers, stop_workers, write_config

    path = exported[source].path
    ports = free_ports(4)
    workers = [{"host": "127.0.0.1", "port": ports[2 * i], "peer_port": ports[2 * i + 1], "shard": i}
               for i in range(2)]
    config = write_config(tmp_path / "cluster.yaml", {"model": path, "tokenizer": path}, "127.0.0.1", workers)
    sharded = run_llmtp("shard", "--config", config)
    assert sharded.returncode == 0, sharded.stderr
    processes = start_config_workers(config, 2, tmp_path)
    try:
        result = run_llmtp("generate", "--config", config, "-t", 0, "-n", 64, "-i", "Once upon a time")
    finally:
        stop_workers(processes)
    stdout, _, _ = reference_run("s260_once_t0_n64")
    assert result.returncode == 0, result.stderr
    assert result.stdout == stdout + "\n"
