"""GGUF files (llama.cpp's format), architecture `llama`: metadata -> ModelConfig, tensors -> ModelWeights.

The header, metadata and tensor infos are parsed by the `gguf` package (llama.cpp's own
reader), which memory-maps the file; every tensor is checked (known type, shape the config
implies, bytes inside the file) before anything is read. `raw_tensors` is the boundary to
block-preserving matrix types: it yields each tensor as stored. `read_gguf` keeps Q8_0, Q4_0
and Q4_1 matrices as their blocks (views of the map, multiplied by the block kernels) and F32
ones as views; F16, BF16, Q4_K and Q6_K are expanded to float32 one tensor at a time.

Q/K row order: llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute) reorders the
rows of Hugging Face's q_proj/k_proj from rotate-half back to Meta's interleaved pairs, and
llama.cpp rotates adjacent pairs (2i, 2i+1) for llama (LLAMA_ROPE_TYPE_NORM). That is
llama2.c's order, so GGUF's attn_q/attn_k rows are taken as they are
(tests/test_gguf.py checks it against transformers).
"""

import os
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from llmtp.common.errors import FormatError
from llmtp.common.model.config import ModelConfig
from llmtp.common.model.weights import LAYER_FIELDS, LayerWeights, ModelWeights

from .detect import GGUF_MAGIC as MAGIC, is_gguf  # noqa: F401 (re-exported)
from .ggml_blocks import ENCODINGS, RawTensor, n_bytes, to_float32, to_matrix

ARCHITECTURE = "llama"

# GGUF tensor name (blk.N. prefix dropped) -> canonical name of common/model/weights.py
GLOBAL_TENSORS = {"token_embd.weight": "token_embedding", "output_norm.weight": "final_norm",
                  "output.weight": "classifier"}
LAYER_TENSORS = {"attn_norm.weight": "attn_norm", "attn_q.weight": "wq", "attn_k.weight": "wk",
                 "attn_v.weight": "wv", "attn_output.weight": "wo", "ffn_norm.weight": "ffn_norm",
                 "ffn_gate.weight": "w1", "ffn_down.weight": "w2", "ffn_up.weight": "w3"}

# llama.* metadata keys that are read; any other llama.* key is refused by name, since it
# would change the model in a way this runtime does not implement.
REQUIRED_KEYS = ("embedding_length", "block_count", "attention.head_count", "feed_forward_length",
                 "context_length", "attention.layer_norm_rms_epsilon")
OPTIONAL_KEYS = ("attention.head_count_kv", "rope.freq_base", "vocab_size", "rope.dimension_count",
                 "attention.key_length", "attention.value_length", "rope.scaling.type",
                 "rope.scaling.factor", "expert_count", "expert_used_count")


@dataclass(frozen=True)
class GgufModel:
    path: Path
    config: ModelConfig
    weights: ModelWeights
    tensor_types: dict[str, str]  # canonical name -> GGML type as stored ("Q4_1", "F32", ...)
    metadata: dict[str, Any] = field(repr=False)  # every key except the tokenizer's big arrays
    reader: Any = field(repr=False)  # the gguf.GGUFReader (its memmap backs the weights)
    n_bytes: int = 0


def add_llama_metadata(writer, config: ModelConfig) -> None:
    """The llama.* keys gguf_config reads back, on a gguf.GGUFWriter (bench's quantized
    copies and the tests' GGUF files write the same header through this)."""
    writer.add_context_length(config.seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)


def open_gguf(path: str | os.PathLike):
    """A gguf.GGUFReader over `path`, or FormatError naming the file and what is wrong."""
    from gguf import GGUFReader, GGMLQuantizationType, GGUFValueType

    path = Path(path)

    class CheckedReader(GGUFReader):
        def _get_field_parts(self, orig_offs, raw_type):
            # An array's count comes first: a count beyond the bytes left would loop for ages.
            if raw_type == GGUFValueType.ARRAY:
                count = int(self._get(orig_offs + 4, np.uint64)[0])
                if count > len(self.data) - orig_offs:
                    raise FormatError(f"{path}: metadata array at byte {orig_offs} claims {count} items, more "
                                      f"than the {len(self.data) - orig_offs} bytes left (corrupt or truncated)")
            return super()._get_field_parts(orig_offs, raw_type)

        def _build_tensors(self, start_offs, fields):
            # Checked before the reader builds views, which on a bad file fail obscurely.
            for info in fields:
                _, name_data, _, dims, raw_type, offset = info.parts
                name = bytes(name_data).decode("utf-8", "replace")
                try:
                    kind = GGMLQuantizationType(int(raw_type[0])).name
                except ValueError:
                    raise FormatError(f"{path}: tensor {name} has unknown GGML type {int(raw_type[0])}") from None
                if kind not in ENCODINGS:
                    raise FormatError(f"{path}: tensor {name} has type {kind}, which is not supported "
                                      f"(supported: {', '.join(ENCODINGS)})")
                n_values = prod(int(d) for d in dims)
                if n_values % ENCODINGS[kind][0]:
                    raise FormatError(f"{path}: tensor {name}: {n_values} values do not fill whole {kind} blocks")
                end = int(start_offs) + int(offset[0]) + n_bytes(kind, n_values)
                if end > len(self.data):
                    raise FormatError(f"{path}: tensor {name} needs bytes up to {end} but the file ends at "
                                      f"{len(self.data)} (truncated)")
            super()._build_tensors(start_offs, fields)

    try:
        return CheckedReader(path)
    except FormatError:
        raise
    except OSError as error:
        raise FormatError(f"{path}: cannot read GGUF file: {error.strerror or error}") from None
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, TypeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise FormatError(f"{path}: not a readable GGUF file (truncated or corrupt header/metadata: "
                          f"{reason})") from None


TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                    "tokenizer.ggml.merges")


def metadata(reader, include_arrays: bool = False) -> dict[str, Any]:
    """Key -> python value (str, int, float, bool, list); the tokenizer's arrays only on request."""
    values = {}
    for key, entry in reader.fields.items():
        if key.startswith("GGUF.") or (key in TOKENIZER_ARRAYS and not include_arrays):
            continue
        values[key] = entry.contents()
    return values


def gguf_config(path: Path, meta: dict[str, Any], vocab_rows: int, has_output: bool) -> ModelConfig:
    """ModelConfig from llama.* metadata; FormatError naming the key that is missing or unsupported."""
    arch = meta.get("general.architecture")
    if arch != ARCHITECTURE:
        raise FormatError(f"{path}: general.architecture is {arch!r}; only {ARCHITECTURE!r} is supported")
    prefix = ARCHITECTURE + "."
    for key in meta:
        if key.startswith(prefix) and key[len(prefix):] not in REQUIRED_KEYS + OPTIONAL_KEYS:
            raise FormatError(f"{path}: metadata key {key} is not supported")
    for key in REQUIRED_KEYS:
        if prefix + key not in meta:
            raise FormatError(f"{path}: metadata key {prefix + key} is missing")

    def get(key: str, default=None):
        return meta.get(prefix + key, default)

    scaling = get("rope.scaling.type", "none")
    if scaling != "none" or get("rope.scaling.factor", 1.0) not in (0.0, 1.0):
        raise FormatError(f"{path}: metadata key {prefix}rope.scaling.type is {scaling!r} "
                          f"(factor {get('rope.scaling.factor')}); RoPE scaling is not supported")
    if get("expert_count", 0):
        raise FormatError(f"{path}: metadata key {prefix}expert_count is {get('expert_count')}; "
                          f"mixture-of-experts models are not supported")
    vocab_size = int(get("vocab_size", vocab_rows))
    if vocab_size != vocab_rows:
        raise FormatError(f"{path}: metadata key {prefix}vocab_size is {vocab_size} but token_embd.weight "
                          f"has {vocab_rows} rows")
    n_heads = int(get("attention.head_count"))
    config = ModelConfig(dim=int(get("embedding_length")), hidden_dim=int(get("feed_forward_length")),
                         n_layers=int(get("block_count")), n_heads=n_heads,
                         n_kv_heads=int(get("attention.head_count_kv", n_heads)), vocab_size=vocab_size,
                         seq_len=int(get("context_length")), shared_classifier=not has_output,
                         rope_theta=_shortest(get("rope.freq_base", 10000.0)),
                         norm_eps=_shortest(get("attention.layer_norm_rms_epsilon")))
    config.validate(str(path))
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if get(key, config.head_dim) != config.head_dim:
            raise FormatError(f"{path}: metadata key {prefix}{key} is {get(key)}, expected head_dim "
                              f"{config.head_dim} (embedding_length / head_count)")
    return config


def _shortest(value) -> float:
    """GGUF stores these as float32: take the shortest decimal that rounds to it (1e-05, not
    9.99999974737875e-06), which is the number the model was made with."""
    return float(str(np.float32(value)))


def canonical_name(gguf_name: str) -> str | None:
    """token_embd.weight -> token_embedding, blk.3.attn_q.weight -> layers.3.wq; None if unknown."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_TENSORS:
        return f"layers.{int(parts[1])}.{LAYER_TENSORS[parts[2]]}"
    return None


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    dim, hidden, kv_dim = config.dim, config.hidden_dim, config.kv_dim
    per_layer = {"attn_norm": (dim,), "ffn_norm": (dim,), "wq": (dim, dim), "wk": (kv_dim, dim),
                 "wv": (kv_dim, dim), "wo": (dim, dim), "w1": (hidden, dim), "w2": (dim, hidden),
                 "w3": (hidden, dim)}
    shapes = {"token_embedding": (config.vocab_size, dim), "final_norm": (dim,)}
    if not config.shared_classifier:
        shapes["classifier"] = (config.vocab_size, dim)
    for i in range(config.n_layers):
        shapes.update({f"layers.{i}.{name}": shape for name, shape in per_layer.items()})
    return shapes


def raw_tensors(path: Path, reader, config: ModelConfig) -> Iterator[tuple[str, RawTensor]]:
    """(canonical name, tensor as stored) for every tensor, each checked against the config."""
    shapes = expected_shapes(config)
    seen = set()
    for tensor in reader.tensors:
        name = canonical_name(tensor.name)
        if name is None or name not in shapes:
            raise FormatError(f"{path}: tensor {tensor.name} is not part of a llama model of this config")
        # GGUF lists dimensions fastest-varying first: (cols, rows) is our (rows, cols)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if shape != shapes[name]:
            raise FormatError(f"{path}: tensor {tensor.name} has shape {shape}, the metadata implies {shapes[name]}")
        data = np.asarray(tensor.data).reshape(-1).view(np.uint8)
        seen.add(name)
        yield name, RawTensor(name, tensor.tensor_type.name, shape, data)
    missing = [name for name in shapes if name not in seen]
    if missing:
        raise FormatError(f"{path}: tensor for {missing[0]} is missing ({len(missing)} missing in all)")


def open_llama_gguf(path: str | os.PathLike):
    """(reader, metadata, config) of a checked llama GGUF, no tensor read yet: with
    `raw_tensors(path, reader, config)` the way in for block-preserving matrix types."""
    path = Path(path)
    reader = open_gguf(path)
    meta = metadata(reader)
    if int(meta.get("split.count", 1)) > 1:  # gguf-split's model-00001-of-0000N.gguf
        raise FormatError(f"{path}: metadata key split.count is {meta['split.count']}; a GGUF split into "
                          f"several files is not supported (merge it with llama.cpp's gguf-split --merge)")
    names = {tensor.name: tensor for tensor in reader.tensors}
    if "token_embd.weight" not in names:
        raise FormatError(f"{path}: tensor token_embd.weight is missing")
    if "rope_freqs.weight" in names:  # Llama 3.1-style frequency factors
        raise FormatError(f"{path}: tensor rope_freqs.weight (RoPE frequency scaling) is not supported")
    vocab_rows = int(names["token_embd.weight"].shape[1])
    return reader, meta, gguf_config(path, meta, vocab_rows, "output.weight" in names)


def read_gguf(path: str | os.PathLike, progress=None) -> GgufModel:
    """progress: called as progress(tensors done, tensors in all) after each tensor."""
    path = Path(path)
    reader, meta, config = open_llama_gguf(path)
    tensors, types = {}, {}
    for name, raw in raw_tensors(path, reader, config):
        types[name] = raw.ggml_type
        # matrices in Q8_0 / Q4_0 / Q4_1 stay blocks; other quantized ones are expanded one at a time
        tensors[name] = to_matrix(raw) if len(raw.shape) == 2 else to_float32(raw)
        if progress:
            progress(len(tensors), len(reader.tensors))
    return GgufModel(path, config, assemble(config, tensors), types, meta, reader, path.stat().st_size)


def assemble(config: ModelConfig, tensors: dict[str, np.ndarray]) -> ModelWeights:
    layers = [LayerWeights(**{name: tensors[f"layers.{i}.{name}"] for name in LAYER_FIELDS})
              for i in range(config.n_layers)]
    embedding = tensors["token_embedding"]
    return ModelWeights(token_embedding=embedding, layers=layers, final_norm=tensors["final_norm"],
                        classifier=embedding if config.shared_classifier else tensors["classifier"])
