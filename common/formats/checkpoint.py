"""llama2.c checkpoint files, versions 0, 1 and 2: memory-mapped loading, writing, inspection.

Layouts (little-endian throughout):
- version 0: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
  vocab_size < 0 means a separate classifier), then fp32: token embeddings, attention norms,
  wq, wk, wv, wo, ffn norms, w1, w2, w3 (each for all layers), final norm, the RoPE cos and
  sin tables (seq_len x head_dim/2 each; unused here), classifier if separate.
- version 1: 256-byte header (uint32 magic 0x616b3432, int32 version, the 7 int32 params,
  uint8 shared_classifier, zero padding); then fp32: attention norms, ffn norms, final norm,
  token embeddings, wq, wk, wv, wo, w1, w2, w3 (each for all layers), classifier if separate.
- version 2: as version 1, plus an int32 group_size right after shared_classifier; the norms
  in fp32, then each matrix in the version-1 order as its int8 values immediately followed
  by its fp32 scales (llama2.c runq.c init_quantized_tensors).

`tensor_layout` gives the order, shape and encoding of every tensor (orders from LLAMA2C_ORDERS,
shapes from the model's tensor table); the loader, the size check, the writer and
`describe_checkpoint` all walk it.
"""

import mmap
import os
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np

from llmtp.common.model.config import LLAMA2C_NORM_EPS, LLAMA2C_ROPE_THETA, ModelConfig
from llmtp.common.errors import ConfigError, FormatError
from .mapping import map_readonly
from llmtp.common.model.ops import rope_tables
from llmtp.common.model.matrices import Encoding, F32Matrix, as_matrix, encode_as, packed_nbytes, read_packed
from llmtp.common.model.q8_grouped import GroupedQ8Matrix
from llmtp.common.model.quantize import (as_float32, check_group_size, default_group_size, group_size_problem,
                       valid_group_sizes)
from llmtp.common.model.tensors import (LAYER_MATRICES, LAYER_TENSORS, LAYER_VECTORS, TENSOR, layer_key,
                                       stored_keys, table_name)
from llmtp.common.model.weights import LayerWeights, ModelWeights

__all__ = ["Checkpoint", "TensorSpec", "load_checkpoint", "write_checkpoint", "convert_checkpoint",
           "describe_checkpoint", "tensor_layout", "checkpoint_size",
           "valid_group_sizes", "default_group_size", "VERSIONS", "MAGIC"]

MAGIC = 0x616B3432  # "ak42"
VERSIONS = (0, 1, 2)
HEADER_BYTES = {0: 28, 1: 256, 2: 256}
V0_HEADER = struct.Struct("<7i")  # dim, hidden_dim, n_layers, n_heads, n_kv_heads, +-vocab_size, seq_len
V1_HEADER = struct.Struct("<Ii7iB")  # magic, version, the 7 params, shared_classifier
GROUP_SIZE_FIELD = struct.Struct("<i")  # version 2 only, right after V1_HEADER
PARAM_NAMES = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
# A headerless first int32 above this is not a plausible version-0 dim: the magic is wrong.
MAX_V0_DIM = 1 << 20

FORMAT_NAMES = {
    0: "llama2.c version 0 (legacy: no magic, fp32, RoPE tables)",
    1: "llama2.c version 1 (fp32)",
    2: "llama2.c version 2 (int8 Q8_0 matrices, fp32 norms)",
}


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    version: int  # 0, 1 or 2
    config: ModelConfig
    weights: ModelWeights  # arrays are read-only views into the memory-mapped file
    group_size: int | None  # Q8_0 group size, version 2 only
    n_bytes: int  # file size
    mapping: mmap.mmap | None = None  # the file's map, which every weight views


@dataclass(frozen=True)
class TensorSpec:
    """One tensor as stored. encoding: 'f32', 'q8_0' (int8 values then fp32 scales), or
    'rope' (fp32 table that version 0 stores and nothing reads)."""

    name: str  # "token_embedding", "layers.3.wq", "final_norm", "classifier", "rope_cos", "rope_sin"
    shape: tuple[int, ...]
    encoding: str

    @property
    def size(self) -> int:
        return prod(self.shape)

    def n_bytes(self, group_size: int | None) -> int:
        if self.encoding == "rope" or len(self.shape) == 1:
            return 4 * self.size
        return packed_nbytes(_matrix_encoding(self, group_size), self.shape)


# llama2.c's file orders in tensor-table names (common/model/tensors.py): a per-layer name stands
# for that tensor in every layer, layer 0 first; the classifier is stored only when separate.
ROPE_TABLES = ("rope_cos", "rope_sin")  # version 0 only: (seq_len, head_dim / 2) fp32 each
LLAMA2C_ORDERS = {
    0: ("token_embedding", *LAYER_TENSORS, "final_norm", *ROPE_TABLES, "classifier"),
    1: (*LAYER_VECTORS, "final_norm", "token_embedding", *LAYER_MATRICES, "classifier"),
}
LLAMA2C_ORDERS[2] = LLAMA2C_ORDERS[1]


def tensor_layout(config: ModelConfig, version: int) -> list[TensorSpec]:
    """Every tensor of a version-`version` file, in file order; shapes from the tensor table."""
    matrix = "q8_0" if version == 2 else "f32"
    layout = []
    for key in stored_keys(config, LLAMA2C_ORDERS[version]):
        name = table_name(key)
        if name in ROPE_TABLES:
            layout.append(TensorSpec(key, (config.seq_len, config.head_dim // 2), "rope"))
        else:
            info = TENSOR[name]
            layout.append(TensorSpec(key, info.shape(config), matrix if info.is_matrix else "f32"))
    return layout


def checkpoint_size(config: ModelConfig, version: int, group_size: int | None = None) -> int:
    """The exact file size in bytes that a header with these values implies."""
    return HEADER_BYTES[version] + sum(spec.n_bytes(group_size) for spec in tensor_layout(config, version))


# ---------------------------------------------------------------------------------------------
# loading


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Validate the header and the exact file size, then map the file: no tensor is copied."""
    path = Path(path)
    try:
        n_bytes = path.stat().st_size
        with open(path, "rb") as file:
            head = file.read(HEADER_BYTES[1])
            version, config, group_size = _parse_header(path, head, n_bytes)
            expected = checkpoint_size(config, version, group_size)
            if n_bytes != expected:
                problem = "truncated" if n_bytes < expected else "trailing bytes"
                raise FormatError(f"{path}: size {n_bytes} bytes, header implies {expected} ({problem})")
        buffer = map_readonly(path)
    except OSError as error:
        raise FormatError(f"{path}: cannot read checkpoint: {error.strerror or error}") from None
    tensors = {}
    offset = HEADER_BYTES[version]
    for spec in tensor_layout(config, version):
        if spec.encoding != "rope":
            tensors[spec.name] = _view(buffer, offset, spec, group_size)
        offset += spec.n_bytes(group_size)
    return Checkpoint(path, version, config, _assemble(config, tensors), group_size, n_bytes, buffer)


def _parse_header(path: Path, head: bytes, n_bytes: int) -> tuple[int, ModelConfig, int | None]:
    """(version, config, group_size) from the first bytes of the file; FormatError if wrong."""
    if len(head) < 4:
        raise FormatError(f"{path}: size {n_bytes} bytes, shorter than the "
                          f"{HEADER_BYTES[0]}-byte version-0 header")
    (magic,) = struct.unpack_from("<I", head)
    if magic == MAGIC:
        return _parse_v1_header(path, head, n_bytes)
    (first,) = struct.unpack_from("<i", head)
    if first > MAX_V0_DIM:
        raise FormatError(f"{path}: magic 0x{magic:08x}, expected 0x{MAGIC:08x} "
                          f"(nor is it a version-0 file: dim {first} is implausible)")
    if len(head) < V0_HEADER.size:
        raise FormatError(f"{path}: size {n_bytes} bytes, shorter than the "
                          f"{HEADER_BYTES[0]}-byte version-0 header")
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, signed_vocab, seq_len = V0_HEADER.unpack_from(head)
    config = ModelConfig(dim, hidden_dim, n_layers, n_heads, n_kv_heads, abs(signed_vocab), seq_len,
                         shared_classifier=signed_vocab > 0)
    config.validate(str(path))
    return 0, config, None


def _parse_v1_header(path: Path, head: bytes, n_bytes: int) -> tuple[int, ModelConfig, int | None]:
    if len(head) < HEADER_BYTES[1]:
        raise FormatError(f"{path}: size {n_bytes} bytes, shorter than the "
                          f"{HEADER_BYTES[1]}-byte version-1/2 header")
    _, version, *params, shared = V1_HEADER.unpack_from(head)
    if version not in (1, 2):
        raise FormatError(f"{path}: version {version} after magic 0x{MAGIC:08x}, expected 1 or 2")
    if shared not in (0, 1):
        raise FormatError(f"{path}: shared_classifier byte {shared}, expected 0 or 1")
    config = ModelConfig(*params, shared_classifier=bool(shared))
    config.validate(str(path))
    if version == 1:
        return 1, config, None
    (group_size,) = GROUP_SIZE_FIELD.unpack_from(head, V1_HEADER.size)
    problem = group_size_problem(config, group_size)
    if problem:
        allowed = ", ".join(str(size) for size in valid_group_sizes(config))
        raise FormatError(f"{path}: {problem} (expected one of {allowed})")
    return 2, config, group_size


def _view(buffer: mmap.mmap, offset: int, spec: TensorSpec, group_size: int | None):
    """A read-only vector or Matrix over the mapped bytes at `offset`."""
    if len(spec.shape) == 2:
        return read_packed(buffer, offset, _matrix_encoding(spec, group_size), spec.shape)[0]
    return np.frombuffer(buffer, "<f4", spec.size, offset).reshape(spec.shape)


def _matrix_encoding(spec: TensorSpec, group_size: int | None) -> Encoding:
    if spec.encoding == "q8_0":
        return Encoding(GroupedQ8Matrix.type_tag, {"group_size": group_size})
    return Encoding(F32Matrix.type_tag)


def _assemble(config: ModelConfig, tensors: dict) -> ModelWeights:
    layers = [LayerWeights(**{name: tensors[layer_key(i, name)] for name in LAYER_TENSORS})
              for i in range(config.n_layers)]
    embedding = tensors["token_embedding"]
    classifier = embedding if config.shared_classifier else tensors["classifier"]
    return ModelWeights(token_embedding=embedding, layers=layers, final_norm=tensors["final_norm"],
                        classifier=classifier)


def _tensor(weights: ModelWeights, name: str):
    """The tensor a TensorSpec name refers to."""
    if name.startswith("layers."):
        _, index, field = name.split(".")
        return getattr(weights.layers[int(index)], field)
    return getattr(weights, name)


# ---------------------------------------------------------------------------------------------
# writing


def write_checkpoint(path: str | os.PathLike, config: ModelConfig, weights: ModelWeights, version: int,
                     group_size: int | None = None) -> Path:
    """Write a version 0/1 (fp32) or 2 (Q8_0) file, one tensor at a time.

    Version 2 re-uses quantized source matrices that already have the requested group size
    (default: the source's, else `default_group_size`); versions 0 and 1 dequantize them.
    The file appears under `path` only once complete, so converting a file onto itself is safe.
    """
    path = Path(path)
    for name, fixed in (("rope_theta", LLAMA2C_ROPE_THETA), ("norm_eps", LLAMA2C_NORM_EPS)):
        if getattr(config, name) != fixed:  # run.c hard-codes them: the file has no field for them
            raise FormatError(f"{path}: a llama2.c file cannot hold {name} {getattr(config, name)!r} "
                              f"(run.c fixes it at {fixed!r})")
    group_size = _output_group_size(config, weights, version, group_size)
    if config.shared_classifier and weights.classifier is not weights.token_embedding:
        raise ValueError("config says shared_classifier but weights.classifier is not token_embedding")
    # version 0 stores the RoPE tables llama2.c's model.py computes; ours are the same numbers
    rope = (dict(zip(("rope_cos", "rope_sin"), rope_tables(config.seq_len, config.head_dim, config.rope_theta)))
            if version == 0 else {})
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as out:
            out.write(_encode_header(config, version, group_size))
            for spec in tensor_layout(config, version):
                tensor = rope[spec.name] if spec.encoding == "rope" else _tensor(weights, spec.name)
                _write_tensor(out, spec, tensor, group_size)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def _output_group_size(config: ModelConfig, weights: ModelWeights, version: int,
                       group_size: int | None) -> int | None:
    if version not in VERSIONS:
        raise ConfigError(f"checkpoint version {version} is not supported; allowed: 0, 1, 2")
    if version != 2:
        if group_size is not None:
            raise ConfigError(f"group size {group_size} applies only to version 2, not version {version}")
        return None
    if group_size is None:
        source = weights.token_embedding.encoding  # keep a quantized source's group size
        group_size = source.params["group_size"] if source.type == GroupedQ8Matrix.type_tag \
            else default_group_size(config)
    check_group_size(config, group_size)
    return group_size


def _encode_header(config: ModelConfig, version: int, group_size: int | None) -> bytes:
    params = [getattr(config, name) for name in PARAM_NAMES]
    if version == 0:
        params[PARAM_NAMES.index("vocab_size")] *= 1 if config.shared_classifier else -1
        return V0_HEADER.pack(*params)
    head = V1_HEADER.pack(MAGIC, version, *params, int(config.shared_classifier))
    if version == 2:
        head += GROUP_SIZE_FIELD.pack(group_size)
    return head.ljust(HEADER_BYTES[version], b"\0")


def _write_tensor(out, spec: TensorSpec, tensor, group_size: int | None) -> None:
    if tuple(tensor.shape) != spec.shape:
        raise ValueError(f"{spec.name}: shape {tuple(tensor.shape)}, config implies {spec.shape}")
    if len(spec.shape) == 1 or spec.encoding == "rope":
        out.write(np.ascontiguousarray(as_float32(tensor), dtype="<f4").data)
        return
    encoding = _matrix_encoding(spec, group_size)
    stored = encode_as(as_matrix(tensor), encoding)  # itself when already so stored: a v2 rewrite is bit-identical
    for part, array in zip(type(stored).layout(spec.shape, encoding.params), stored.parts(), strict=True):
        out.write(np.ascontiguousarray(array, dtype=part.dtype).data)


def convert_checkpoint(in_path: str | os.PathLike, out_path: str | os.PathLike, version: int,
                       group_size: int | None = None) -> Checkpoint:
    """`llmtp convert IN OUT --version V [--group-size G]`: returns the written file, loaded."""
    source = load_checkpoint(in_path)
    write_checkpoint(out_path, source.config, source.weights, version, group_size)
    return load_checkpoint(out_path)


# ---------------------------------------------------------------------------------------------
# inspection


def describe_checkpoint(ckpt: Checkpoint) -> str:
    """Multi-line text for `llmtp inspect`."""
    config = ckpt.config
    lines = [f"path:          {ckpt.path}",
             f"format:        {FORMAT_NAMES[ckpt.version]}",
             f"group size:    {ckpt.group_size if ckpt.group_size else '- (not quantized)'}"]
    lines += [f"{name + ':':<15}{getattr(config, name)}" for name in PARAM_NAMES]
    lines += [f"head_dim:      {config.head_dim}",
              f"kv_dim:        {config.kv_dim} ({config.kv_mul} query head{'s' if config.kv_mul > 1 else ''} per kv head)",
              f"classifier:    {'shared with token_embedding' if config.shared_classifier else 'separate'}",
              "tensors:"]
    lines += _tensor_table(tensor_layout(config, ckpt.version), config.n_layers, ckpt.group_size)
    lines += [f"parameters:    {config.n_params():,}",
              f"file bytes:    {ckpt.n_bytes:,}"]
    return "\n".join(lines)


def _tensor_table(layout: list[TensorSpec], n_layers: int, group_size: int | None) -> list[str]:
    """One row per tensor, a per-layer tensor listed once for all layers, in file order."""
    rows: dict[str, list] = {}  # display name -> [spec, total bytes]
    every = f"layers.{{0..{n_layers - 1}}}." if n_layers > 1 else "layers.0."
    for spec in layout:
        name = every + spec.name.split(".")[2] if spec.name.startswith("layers.") else spec.name
        rows.setdefault(name, [spec, 0])[1] += spec.n_bytes(group_size)
    dtypes = {"f32": "float32", "rope": "float32 (unused)",
              "q8_0": f"int8, float32 scale per {group_size}"}
    width = max(len(name) for name in rows)
    header = f"  {'name':<{width}}  {'shape':<14}{'dtype':<30}{'bytes':>12}"
    return [header] + [f"  {name:<{width}}  {str(spec.shape):<14}{dtypes[spec.encoding]:<30}{n_bytes:>12,}"
                       for name, (spec, n_bytes) in rows.items()]
