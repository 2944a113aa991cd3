"""Hugging Face LlamaForCausalLM folders: config.json and safetensors (one file or sharded).

Tensors are read one at a time through safetensors' numpy API (bfloat16, which numpy lacks,
from the file's own byte range, widened to float32). Hugging Face rotates q/k in rotate-half
order (pairs (i, i + head_dim/2)); its converter permuted Meta's rows to get there, and this
reader undoes that permutation so the rows come in llama2.c's interleaved pairs (2i, 2i+1).

Every config.json key is either read, checked against the one value this runtime implements,
or known to leave inference alone; any other key is refused by name.
"""

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmtp.common.errors import FormatError
from llmtp.common.model.config import ModelConfig
from llmtp.common.model.weights import LayerWeights, ModelWeights

from .detect import HF_CONFIG as CONFIG, is_hf_folder  # noqa: F401 (re-exported)

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"

READ_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings",
             "tie_word_embeddings", "head_dim", "vocab_size", "rope_scaling", "rope_parameters",
             "model_type", "architectures")
FIXED_VALUES = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
# Keys that do not change what inference computes (training, ids the tokenizer also has, dtype
# of the stored tensors, which the files say themselves).
INERT_KEYS = ("transformers_version", "torch_dtype", "dtype", "bos_token_id", "eos_token_id",
              "pad_token_id", "initializer_range", "use_cache", "attention_dropout", "pretraining_tp",
              "_name_or_path", "output_attentions", "output_hidden_states", "return_dict",
              "tokenizer_class", "torchscript")
SUPPORTED_DTYPES = ("F32", "F16", "BF16")

LAYER_TENSORS = {"input_layernorm.weight": "attn_norm", "self_attn.q_proj.weight": "wq",
                 "self_attn.k_proj.weight": "wk", "self_attn.v_proj.weight": "wv",
                 "self_attn.o_proj.weight": "wo", "post_attention_layernorm.weight": "ffn_norm",
                 "mlp.gate_proj.weight": "w1", "mlp.down_proj.weight": "w2", "mlp.up_proj.weight": "w3"}
# old transformers saved RoPE's inverse frequencies as a buffer: derived from rope_theta, unused
DERIVED_BUFFER = "self_attn.rotary_emb.inv_freq"


@dataclass(frozen=True)
class HfModel:
    path: Path
    config: ModelConfig
    weights: ModelWeights
    tensor_types: dict[str, str]  # canonical name -> safetensors dtype ("BF16", ...)
    hf_config: dict[str, Any]
    n_bytes: int


def read_config(folder: Path) -> tuple[ModelConfig, dict[str, Any]]:
    path = folder / CONFIG
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise FormatError(f"{path}: cannot read: {error.strerror or error}") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise FormatError(f"{path}: not valid JSON: {str(error).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise FormatError(f"{path}: expected a JSON object")
    if raw.get("model_type") != "llama":
        raise FormatError(f"{path}: model_type is {raw.get('model_type')!r}; only 'llama' is supported")
    architectures = raw.get("architectures") or ["LlamaForCausalLM"]
    if architectures != ["LlamaForCausalLM"]:
        raise FormatError(f"{path}: architectures is {architectures!r}; only ['LlamaForCausalLM'] is supported")
    for key, value in raw.items():
        if key in FIXED_VALUES and value != FIXED_VALUES[key]:
            raise FormatError(f"{path}: {key} is {value!r}; only {FIXED_VALUES[key]!r} is supported")
        if key not in READ_KEYS + INERT_KEYS + tuple(FIXED_VALUES):
            raise FormatError(f"{path}: key {key} is not supported")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(raw.get(key), int):
            raise FormatError(f"{path}: {key} is missing or not an integer")
    n_heads = raw["num_attention_heads"]
    config = ModelConfig(dim=raw["hidden_size"], hidden_dim=raw["intermediate_size"],
                         n_layers=raw["num_hidden_layers"], n_heads=n_heads,
                         n_kv_heads=raw.get("num_key_value_heads") or n_heads, vocab_size=raw["vocab_size"],
                         seq_len=raw.get("max_position_embeddings", 2048),
                         shared_classifier=bool(raw.get("tie_word_embeddings", False)),  # LlamaConfig's default
                         rope_theta=float(_rope_theta(path, raw)), norm_eps=float(raw.get("rms_norm_eps", 1e-6)))
    config.validate(str(path))
    head_dim = raw.get("head_dim")
    if head_dim is not None and head_dim != config.head_dim:
        raise FormatError(f"{path}: head_dim is {head_dim}, but hidden_size / num_attention_heads is "
                          f"{config.head_dim}; a separate head_dim is not supported")
    return config, raw


def _rope_theta(path: Path, raw: dict) -> float:
    """rope_theta from the top level (transformers 4) or rope_parameters (transformers 5);
    any frequency scaling refused by name."""
    scaling = raw.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if kind != "default":
            raise FormatError(f"{path}: rope_scaling of type {kind!r} is not supported"
                              + (" (Llama 3.1/3.2 frequency scaling)" if kind == "llama3" else ""))
    parameters = raw.get("rope_parameters")
    if parameters is None:
        return raw.get("rope_theta", 10000.0)
    if not isinstance(parameters, dict):
        raise FormatError(f"{path}: rope_parameters is {parameters!r}, expected an object")
    kind = parameters.get("rope_type", "default")
    if kind != "default":
        raise FormatError(f"{path}: rope_parameters.rope_type {kind!r} is not supported"
                          + (" (Llama 3.1/3.2 frequency scaling)" if kind == "llama3" else ""))
    for key in parameters:
        if key not in ("rope_type", "rope_theta"):
            raise FormatError(f"{path}: rope_parameters.{key} is not supported")
    return parameters.get("rope_theta", raw.get("rope_theta", 10000.0))


def weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index_path = folder / INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise FormatError(f"{index_path}: no readable weight_map ({type(error).__name__})") from None
        files = {name: folder / shard for name, shard in weight_map.items()}
        for name, shard in files.items():
            if not shard.is_file():
                raise FormatError(f"{index_path}: shard {shard.name} (holding {name}) is missing")
        return files
    single = folder / SINGLE
    if not single.is_file():
        raise FormatError(f"{folder}: neither {SINGLE} nor {INDEX} is present")
    from safetensors import safe_open
    with _open(single, safe_open) as handle:
        return {name: single for name in handle.keys()}


def _open(path: Path, safe_open):
    try:
        return safe_open(str(path), framework="numpy")
    except Exception as error:  # safetensors raises its own SafetensorError for bad headers
        raise FormatError(f"{path}: not a readable safetensors file ({str(error).splitlines()[0]})") from None


def canonical_name(hf_name: str) -> str | None:
    if hf_name == "model.embed_tokens.weight":
        return "token_embedding"
    if hf_name == "model.norm.weight":
        return "final_norm"
    if hf_name == "lm_head.weight":
        return "classifier"
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in LAYER_TENSORS:
        return f"layers.{int(parts[2])}.{LAYER_TENSORS[parts[3]]}"
    return None


def interleave_pairs(w: np.ndarray, n_heads: int) -> np.ndarray:
    """q/k rows from Hugging Face's rotate-half order back to llama2.c's (2i, 2i+1) pairs."""
    rows, cols = w.shape
    return np.ascontiguousarray(w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols))


def read_hf_folder(folder: str | os.PathLike, progress=None) -> HfModel:
    """progress: called as progress(tensors done, tensors in all) after each tensor."""
    from safetensors import safe_open

    from .gguf_file import assemble, expected_shapes

    folder = Path(folder)
    config, raw_config = read_config(folder)
    shapes = expected_shapes(config)
    files = weight_files(folder)
    tensors, types = {}, {}
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with _open(path, safe_open) as handle:
            for hf_name in names:
                name = canonical_name(hf_name)
                if name is None:
                    if hf_name.endswith(DERIVED_BUFFER):
                        continue
                    raise FormatError(f"{path}: tensor {hf_name} is not part of a LlamaForCausalLM "
                                      f"this runtime supports")
                if name == "classifier" and config.shared_classifier:
                    continue  # tied: transformers uses the embedding, whatever a file also stores
                if name not in shapes:
                    raise FormatError(f"{path}: tensor {hf_name} is beyond the config's model")
                value, dtype = _read_tensor(path, handle, hf_name)
                if value.shape != shapes[name]:
                    raise FormatError(f"{path}: tensor {hf_name} has shape {value.shape}, "
                                      f"{CONFIG} implies {shapes[name]}")
                if name.endswith((".wq", ".wk")):
                    value = interleave_pairs(value, config.n_heads if name.endswith("wq") else config.n_kv_heads)
                tensors[name], types[name] = value, dtype
                if progress:
                    progress(len(tensors), len(shapes))
    missing = [name for name in shapes if name not in tensors]
    if missing:
        raise FormatError(f"{folder}: tensor for {missing[0]} is missing ({len(missing)} missing in all)")
    n_bytes = sum(path.stat().st_size for path in by_file)
    return HfModel(folder, config, assemble(config, tensors), types, raw_config, n_bytes)


def _read_tensor(path: Path, handle, hf_name: str) -> tuple[np.ndarray, str]:
    """(float32 array, stored dtype) of one tensor."""
    dtype = handle.get_slice(hf_name).get_dtype()
    if dtype not in SUPPORTED_DTYPES:
        raise FormatError(f"{path}: tensor {hf_name} has dtype {dtype}; supported: {', '.join(SUPPORTED_DTYPES)}")
    if dtype != "BF16":
        return np.asarray(handle.get_tensor(hf_name), dtype=np.float32), dtype
    return _read_bf16(path, hf_name), dtype


def _read_bf16(path: Path, hf_name: str) -> np.ndarray:
    """numpy has no bfloat16: take the tensor's bytes from the range its header gives (the
    format: u64 header length, JSON header, data) and widen each to the top of a float32."""
    with open(path, "rb") as file:
        (header_length,) = struct.unpack("<Q", file.read(8))
        entry = json.loads(file.read(header_length))[hf_name]
        begin, end = entry["data_offsets"]
        file.seek(8 + header_length + begin)
        data = file.read(end - begin)
    if len(data) != end - begin:
        raise FormatError(f"{path}: tensor {hf_name} is truncated")
    values = (np.frombuffer(data, "<u2").astype(np.uint32) << 16).view(np.float32)
    return values.reshape(entry["shape"])
