"""Shard files: one worker's weights, cut by SPLIT_TABLE and memory-mapped back.

A shard file (also used for the coordinator's embedding table):

  bytes 0..8    b"LLMTPSHD"
  bytes 8..12   uint32 SHARD_FORMAT_VERSION (little-endian)
  bytes 12..16  uint32 length of the msgpack header that follows
  header        {kind, config, spec, model_sha256, group_size, tensors: [{name, dtype, shape, offset}]}
  data          each tensor as raw little-endian C-order bytes at a 64-byte-aligned absolute
                offset; the file ends exactly where the last tensor ends.

An fp32 matrix is one tensor (`layers.3.wq`); an int8 matrix is two (`layers.3.wq.values`,
`layers.3.wq.scales`). Column slices (wo, w2) are copied into contiguous blocks when
written, so a worker's arrays are plain C-contiguous views of the mapped file.

A directory of shards has `manifest.json`: the model config, the source checkpoint's
size and sha256, and each file's spec, size and sha256.
"""

import dataclasses
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import msgpack
import numpy as np

from .config import ModelConfig
from .errors import ConfigError, FormatError
from .split import SPLIT_TABLE, SliceSpec, plan_split
from .weights import LayerWeights, Matrix, ModelWeights, QuantizedMatrix, ShardWeights

SHARD_MAGIC = b"LLMTPSHD"
SHARD_FORMAT_VERSION = 1
MANIFEST_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
EMBEDDING_NAME = "embedding.bin"
ALIGNMENT = 64
PRELUDE = 16  # magic, format version, header length
HASH_CHUNK = 1 << 20
PROGRESS_MIN_BYTES = 100 * 1000 * 1000

LAYER_FIELDS = tuple(field.name for field in dataclasses.fields(LayerWeights))
CONFIG_FIELDS = tuple(field.name for field in dataclasses.fields(ModelConfig))
DTYPES = {"float32": np.dtype("<f4"), "int8": np.dtype("i1")}
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


def shard_file_name(index: int, count: int) -> str:
    return f"shard-{index}-of-{count}.bin"


# --- cutting ------------------------------------------------------------------------------

def full_shape(name: str, config: ModelConfig) -> tuple[int, ...]:
    """The whole model's shape of tensor `name` (a SPLIT_TABLE key), (out, in) for matrices."""
    dim, hidden = config.dim, config.hidden_dim
    return {"attn_norm": (dim,), "ffn_norm": (dim,), "final_norm": (dim,),
            "wq": (config.n_heads * config.head_dim, dim), "wk": (config.kv_dim, dim), "wv": (config.kv_dim, dim),
            "wo": (dim, config.n_heads * config.head_dim),
            "w1": (hidden, dim), "w3": (hidden, dim), "w2": (dim, hidden),
            "classifier": (config.vocab_size, dim)}[name]


def cut_range(name: str, config: ModelConfig, spec: SliceSpec) -> tuple[int, int, int] | None:
    """(axis, start, stop) of the rows or columns of `name` that `spec` keeps; None if replicated."""
    axis, unit = SPLIT_TABLE[name]
    if axis is None:
        return None
    unit_size = config.head_dim if unit in ("heads", "kv_heads") else 1
    first, stop = spec.unit_range(unit)
    return axis, first * unit_size, stop * unit_size


def local_shape(name: str, config: ModelConfig, spec: SliceSpec) -> tuple[int, ...]:
    shape = list(full_shape(name, config))
    cut = cut_range(name, config, spec)
    if cut is not None:
        axis, start, stop = cut
        shape[axis] = stop - start
    return tuple(shape)


def check_group_alignment(config: ModelConfig, spec: SliceSpec, group_size: int | None) -> None:
    """Column cuts of int8 matrices must fall on group boundaries (a group never straddles two workers)."""
    if not group_size or group_size == 1:
        return
    for name, (axis, unit) in SPLIT_TABLE.items():
        if axis != 1:
            continue
        _, start, stop = cut_range(name, config, spec)
        if start % group_size == 0 and stop % group_size == 0:
            continue
        why = (f"head_dim {config.head_dim} is not a multiple of group_size {group_size}" if unit == "heads"
               else f"{unit} range {start}..{stop} is not a multiple of group_size {group_size}")
        raise ConfigError(f"cannot cut int8 {name} for worker {spec.index} of {spec.count} at columns "
                          f"{start}..{stop}: {why}; use a worker count whose head boundaries fall on groups, "
                          f"or re-quantize with a group size dividing {config.head_dim}")


def slice_weights(weights: ModelWeights | ShardWeights, spec: SliceSpec, config: ModelConfig) -> ShardWeights:
    """One worker's share of the whole model, as SPLIT_TABLE says: views where possible
    (row cuts and fp32 column cuts), so nothing is read until it is used or written."""
    group_size = next((m.group_size for _, m in named_matrices(weights) if isinstance(m, QuantizedMatrix)), None)
    check_group_alignment(config, spec, group_size)
    layers = [LayerWeights(**{name: slice_tensor(name, getattr(layer, name), config, spec) for name in LAYER_FIELDS})
              for layer in weights.layers]
    return ShardWeights(layers=layers, final_norm=slice_tensor("final_norm", weights.final_norm, config, spec),
                        classifier=slice_tensor("classifier", weights.classifier, config, spec))


def slice_tensor(name: str, matrix: Matrix, config: ModelConfig, spec: SliceSpec) -> Matrix:
    cut = cut_range(name, config, spec)
    if cut is None:
        return matrix
    axis, start, stop = cut
    if isinstance(matrix, QuantizedMatrix):
        return _slice_quantized(matrix, axis, start, stop)
    return matrix[start:stop] if axis == 0 else matrix[:, start:stop]


def _slice_quantized(matrix: QuantizedMatrix, axis: int, start: int, stop: int) -> QuantizedMatrix:
    """Rows are cut as rows; columns in whole groups (scales are row-major, one per group)."""
    rows, cols = matrix.shape
    group_size = matrix.group_size
    scales = matrix.scales.reshape(rows, cols // group_size)
    if axis == 0:
        return QuantizedMatrix(values=matrix.values[start:stop], scales=scales[start:stop].reshape(-1),
                               group_size=group_size)
    assert start % group_size == 0 and stop % group_size == 0, (start, stop, group_size)
    # the scales of a column slice are strided; copy them (1/group_size of the values' count)
    local_scales = np.ascontiguousarray(scales[:, start // group_size:stop // group_size]).reshape(-1)
    return QuantizedMatrix(values=matrix.values[:, start:stop], scales=local_scales, group_size=group_size)


def named_matrices(weights: ModelWeights | ShardWeights) -> Iterator[tuple[str, Matrix]]:
    """(file name, tensor) of every tensor a worker holds, in file order."""
    for index, layer in enumerate(weights.layers):
        for name in LAYER_FIELDS:
            yield f"layers.{index}.{name}", getattr(layer, name)
    yield "final_norm", weights.final_norm
    yield "classifier", weights.classifier


def _file_arrays(name: str, matrix: Matrix) -> list[tuple[str, np.ndarray, np.dtype]]:
    if isinstance(matrix, QuantizedMatrix):
        return [(f"{name}.values", matrix.values, DTYPES["int8"]), (f"{name}.scales", matrix.scales, DTYPES["float32"])]
    return [(name, matrix, DTYPES["float32"])]


# --- writing ------------------------------------------------------------------------------

def _align(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def _layout(header: dict, arrays: list[tuple[str, np.ndarray, np.dtype]]) -> tuple[bytes, int]:
    """Fill header["tensors"] with absolute offsets; returns (packed header, file size).

    Offsets depend on the header's length and vice versa, so repeat until the data start
    stops moving (msgpack integers only grow, so this ends in a step or two)."""
    data_start = 0
    while True:
        offset, tensors = data_start, []
        for name, array, dtype in arrays:
            offset = _align(offset)
            dtype_name = next(key for key, value in DTYPES.items() if value == dtype)
            tensors.append({"name": name, "dtype": dtype_name, "shape": list(array.shape), "offset": offset})
            offset += array.size * dtype.itemsize
        header["tensors"] = tensors
        packed = msgpack.packb(header, use_bin_type=True)
        needed = _align(PRELUDE + len(packed))
        if needed <= data_start:
            return packed, (offset if arrays else PRELUDE + len(packed))
        data_start = needed


class _HashingWriter:
    def __init__(self, file, on_write):
        self.file, self.on_write = file, on_write
        self.sha256 = hashlib.sha256()
        self.n_bytes = 0

    def write(self, data) -> None:
        view = memoryview(data)
        self.file.write(view)
        self.sha256.update(view)
        self.n_bytes += view.nbytes
        self.on_write(view.nbytes)


def _write_tensor_file(path: Path, header: dict, arrays: list[tuple[str, np.ndarray, np.dtype]],
                       on_write) -> tuple[str, int]:
    """Write one shard file tensor by tensor (peak memory: one contiguous tensor). Returns (sha256, size)."""
    packed, _ = _layout(header, arrays)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as file:
            out = _HashingWriter(file, on_write)
            out.write(SHARD_MAGIC + np.array([SHARD_FORMAT_VERSION, len(packed)], dtype="<u4").tobytes())
            out.write(packed)
            for entry, (_, array, dtype) in zip(header["tensors"], arrays):
                out.write(bytes(entry["offset"] - out.n_bytes))
                contiguous = np.ascontiguousarray(array, dtype=dtype)  # copies only column slices
                out.write(contiguous.reshape(-1).view(np.uint8))
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return out.sha256.hexdigest(), out.n_bytes


def _file_header(kind: str, config: ModelConfig, spec: SliceSpec | None, model_sha256: str,
                 group_size: int | None) -> dict:
    return {"kind": kind, "config": dataclasses.asdict(config), "spec": spec.to_dict() if spec else None,
            "model_sha256": model_sha256, "group_size": group_size, "tensors": []}


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _Progress:
    """`\\r[#####.....] 45% shard 2/4` on stderr for a TTY or a large model; silent otherwise."""

    WIDTH = 30

    def __init__(self, total_bytes: int, enabled: bool):
        self.total = max(total_bytes, 1)
        self.enabled = enabled and (sys.stderr.isatty() or total_bytes > PROGRESS_MIN_BYTES)
        self.done, self.label, self.shown = 0, "", None

    def advance(self, n_bytes: int) -> None:
        self.done += n_bytes
        percent = min(100, self.done * 100 // self.total)
        if self.enabled and (percent, self.label) != self.shown:
            filled = percent * self.WIDTH // 100
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {percent:3d}% {self.label}")
            sys.stderr.flush()
            self.shown = (percent, self.label)

    def finish(self) -> None:
        if self.enabled and self.shown is not None:
            sys.stderr.write("\n")
            sys.stderr.flush()


def write_shards(checkpoint, n_workers: int, out_dir: str | Path, model_sha256: str | None = None,
                 progress: bool = True) -> "Manifest":
    """Cut `checkpoint` (common.checkpoint.Checkpoint) for `n_workers` and write the shards,
    embedding.bin and manifest.json into `out_dir`."""
    config, weights = checkpoint.config, checkpoint.weights
    group_size = checkpoint.group_size or None
    specs = plan_split(config, n_workers, group_size or 1)
    for spec in specs:  # refuse before writing anything
        check_group_alignment(config, spec, group_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if model_sha256 is None:
        model_sha256 = sha256_file(checkpoint.path)

    def shard_arrays(spec):  # views of the checkpoint, made per file so only one shard's are alive
        return [entry for name, matrix in named_matrices(slice_weights(weights, spec, config))
                for entry in _file_arrays(name, matrix)]

    jobs = [(shard_file_name(spec.index, n_workers), f"shard {spec.index + 1}/{n_workers}",
             _file_header("shard", config, spec, model_sha256, group_size), lambda spec=spec: shard_arrays(spec))
            for spec in specs]
    jobs.append((EMBEDDING_NAME, "embedding", _file_header("embedding", config, None, model_sha256, group_size),
                 lambda: _file_arrays("token_embedding", weights.token_embedding)))

    bar = _Progress(sum(_layout(header, make_arrays())[1] for _, _, header, make_arrays in jobs), progress)
    written = {}
    try:
        for file_name, label, header, make_arrays in jobs:
            bar.label = label
            written[file_name] = _write_tensor_file(out_dir / file_name, header, make_arrays(), bar.advance)
    finally:
        bar.finish()

    manifest = {
        "format_version": MANIFEST_FORMAT_VERSION,
        "config": dataclasses.asdict(config),
        "source": {"path": str(Path(checkpoint.path).resolve()), "n_bytes": int(checkpoint.n_bytes),
                   "sha256": model_sha256, "version": int(checkpoint.version)},
        "n_workers": n_workers,
        "group_size": group_size,
        "shards": [{"file": name, "index": spec.index, "spec": spec.to_dict(), "sha256": written[name][0],
                    "n_bytes": written[name][1]}
                   for spec, name in ((spec, shard_file_name(spec.index, n_workers)) for spec in specs)],
        "embedding": {"file": EMBEDDING_NAME, "sha256": written[EMBEDDING_NAME][0],
                      "n_bytes": written[EMBEDDING_NAME][1]},
    }
    manifest_path = out_dir / MANIFEST_NAME
    partial = manifest_path.with_name(MANIFEST_NAME + ".partial")
    partial.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(partial, manifest_path)
    return load_manifest(manifest_path)


# --- reading ------------------------------------------------------------------------------

@dataclass
class Shard:
    path: Path
    config: ModelConfig
    spec: SliceSpec
    weights: ShardWeights
    model_sha256: str
    group_size: int | None
    n_bytes: int


def _read_tensor_file(path: Path) -> tuple[dict, dict[str, np.ndarray], int]:
    """Map `path` read-only and check everything but the meaning of the tensors:
    (header, name -> array view of the map, file size)."""
    path = Path(path)
    try:
        n_bytes = path.stat().st_size
    except OSError as error:
        raise FormatError(f"{path}: cannot read shard file: {error.strerror}") from None
    if n_bytes < PRELUDE:
        raise FormatError(f"{path}: file is {n_bytes} bytes, too short for a shard header")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    if bytes(data[:8]) != SHARD_MAGIC:
        raise FormatError(f"{path}: not a shard file (magic {bytes(data[:8])!r}, expected {SHARD_MAGIC!r})")
    version, header_length = (int(v) for v in data[8:PRELUDE].view("<u4"))
    if version != SHARD_FORMAT_VERSION:
        raise FormatError(f"{path}: shard format version {version}, this build reads {SHARD_FORMAT_VERSION}")
    if PRELUDE + header_length > n_bytes:
        raise FormatError(f"{path}: header length {header_length} runs past the end of the {n_bytes}-byte file")
    try:
        header = msgpack.unpackb(bytes(data[PRELUDE:PRELUDE + header_length]), raw=False)
    except Exception as error:  # msgpack raises several unrelated types
        raise FormatError(f"{path}: header is not valid msgpack ({type(error).__name__})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header is a {type(header).__name__}, expected a map")
    for key in ("kind", "config", "spec", "model_sha256", "group_size", "tensors"):
        if key not in header:
            raise FormatError(f"{path}: header has no {key!r}")
    if not isinstance(header["tensors"], list):
        raise FormatError(f"{path}: header 'tensors' is not a list")

    arrays, end = {}, PRELUDE + header_length
    for number, entry in enumerate(header["tensors"]):
        name, dtype, shape, offset = _tensor_entry(path, number, entry)
        if name in arrays:
            raise FormatError(f"{path}: tensor {name} appears twice")
        size = math.prod(shape) * dtype.itemsize
        if offset % ALIGNMENT:
            raise FormatError(f"{path}: tensor {name} at offset {offset} is not {ALIGNMENT}-byte aligned")
        if offset < end:
            raise FormatError(f"{path}: tensor {name} at offset {offset} overlaps the data before it "
                              f"(which ends at {end})")
        if offset + size > n_bytes:
            raise FormatError(f"{path}: tensor {name} ends at byte {offset + size}, past the end of the "
                              f"{n_bytes}-byte file (truncated?)")
        arrays[name] = data[offset:offset + size].view(dtype).reshape(shape)
        end = offset + size
    if end != n_bytes:
        raise FormatError(f"{path}: file is {n_bytes} bytes, its tensors end at byte {end}")
    return header, arrays, n_bytes


def _tensor_entry(path: Path, number: int, entry) -> tuple[str, np.dtype, tuple[int, ...], int]:
    where = f"{path}: tensors[{number}]"
    if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape", "offset"}:
        raise FormatError(f"{where} must be a map of name, dtype, shape, offset")
    name, dtype, shape, offset = entry["name"], entry["dtype"], entry["shape"], entry["offset"]
    if not isinstance(name, str):
        raise FormatError(f"{where}: name is not a string")
    if dtype not in DTYPES:
        raise FormatError(f"{where} ({name}): dtype {dtype!r}, expected one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise FormatError(f"{where} ({name}): shape {shape!r} is not a list of non-negative integers")
    if not _is_count(offset):
        raise FormatError(f"{where} ({name}): offset {offset!r} is not a non-negative integer")
    return name, DTYPES[dtype], tuple(shape), offset


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _config_from_dict(data, where: str) -> ModelConfig:
    if not isinstance(data, dict):
        raise FormatError(f"{where}: config is not a map")
    unknown, missing = set(data) - set(CONFIG_FIELDS), set(CONFIG_FIELDS) - set(data)
    if unknown or missing:
        raise FormatError(f"{where}: config fields unknown {sorted(unknown)}, missing {sorted(missing)}")
    for name in CONFIG_FIELDS:
        wanted = bool if name == "shared_classifier" else int
        value = data[name]
        if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
            raise FormatError(f"{where}: config.{name} is {value!r}, expected {wanted.__name__}")
    config = ModelConfig(**data)
    config.validate(where)
    return config


def _spec_from_dict(data, config: ModelConfig, where: str) -> SliceSpec:
    """A SliceSpec whose ranges lie inside the model and whose kv heads serve its heads."""
    try:
        spec = SliceSpec.from_dict(data)
        ranges = {unit: tuple(spec.unit_range(unit)) for unit in ("heads", "kv_heads", "hidden", "vocab")}
        valid = (_is_count(spec.index) and _is_count(spec.count) and spec.index < spec.count
                 and all(len(r) == 2 and all(_is_count(n) for n in r) for r in ranges.values()))
    except (TypeError, KeyError, ValueError):
        valid = False
    if not valid:
        raise FormatError(f"{where}: spec {data!r} is not a valid slice spec")
    totals = {"heads": config.n_heads, "kv_heads": config.n_kv_heads, "hidden": config.hidden_dim,
              "vocab": config.vocab_size}
    for unit, (start, stop) in ranges.items():
        if not start <= stop <= totals[unit]:
            raise FormatError(f"{where}: spec.{unit} {start}..{stop} is outside 0..{totals[unit]}")
    first, stop = spec.heads
    needed_kv = (first // config.kv_mul, (stop - 1) // config.kv_mul + 1)
    if stop <= first or spec.kv_heads != needed_kv:
        raise FormatError(f"{where}: spec.kv_heads {spec.kv_heads} do not serve heads {spec.heads} "
                          f"(expected {needed_kv})")
    return spec


def _group_size_from(value, where: str) -> int | None:
    if value is None or (_is_count(value) and value > 0):
        return value
    raise FormatError(f"{where}: group_size {value!r} is not a positive integer or null")


def _take_matrix(arrays: dict, name: str, shape: tuple, group_size: int | None, path: Path) -> Matrix:
    """Pop the fp32 tensor `name`, or the int8 pair `name.values`/`name.scales`, checking shapes."""
    if name in arrays:
        array = arrays.pop(name)
        if array.dtype != DTYPES["float32"] or array.shape != shape:
            raise FormatError(f"{path}: tensor {name} is {array.dtype} {array.shape}, expected float32 {shape}")
        return array
    if f"{name}.values" not in arrays or f"{name}.scales" not in arrays:
        raise FormatError(f"{path}: tensor {name} is missing")
    values, scales = arrays.pop(f"{name}.values"), arrays.pop(f"{name}.scales")
    if group_size is None or len(shape) != 2 or shape[1] % group_size:
        raise FormatError(f"{path}: tensor {name} is int8 but the header's group_size {group_size} "
                          f"does not divide its rows of {shape[-1]}")
    scales_shape = (int(np.prod(shape)) // group_size,)
    if values.dtype != DTYPES["int8"] or values.shape != shape:
        raise FormatError(f"{path}: tensor {name}.values is {values.dtype} {values.shape}, expected int8 {shape}")
    if scales.dtype != DTYPES["float32"] or scales.shape != scales_shape:
        raise FormatError(f"{path}: tensor {name}.scales is {scales.dtype} {scales.shape}, "
                          f"expected float32 {scales_shape}")
    return QuantizedMatrix(values=values, scales=scales, group_size=group_size)


def _check_kind(path: Path, header: dict, kind: str) -> None:
    if header["kind"] != kind:
        raise FormatError(f"{path}: file holds {header['kind']!r}, expected {kind!r}")
    if not isinstance(header["model_sha256"], str) or not SHA256_PATTERN.match(header["model_sha256"]):
        raise FormatError(f"{path}: model_sha256 {header['model_sha256']!r} is not 64 hex digits")


def load_shard(path: str | Path) -> Shard:
    """Map a shard file read-only; every weight is a C-contiguous view of the map (no copies)."""
    path = Path(path)
    header, arrays, n_bytes = _read_tensor_file(path)
    _check_kind(path, header, "shard")
    config = _config_from_dict(header["config"], str(path))
    spec = _spec_from_dict(header["spec"], config, str(path))
    group_size = _group_size_from(header["group_size"], str(path))

    def take(file_name: str, table_name: str) -> Matrix:
        return _take_matrix(arrays, file_name, local_shape(table_name, config, spec), group_size, path)

    layers = [LayerWeights(**{name: take(f"layers.{index}.{name}", name) for name in LAYER_FIELDS})
              for index in range(config.n_layers)]
    weights = ShardWeights(layers=layers, final_norm=take("final_norm", "final_norm"),
                           classifier=take("classifier", "classifier"))
    if arrays:
        raise FormatError(f"{path}: unexpected tensors {', '.join(sorted(arrays))}")
    return Shard(path=path, config=config, spec=spec, weights=weights, model_sha256=header["model_sha256"],
                 group_size=group_size, n_bytes=n_bytes)


# --- manifest -----------------------------------------------------------------------------

@dataclass(frozen=True)
class FileEntry:
    file: str  # a name inside the manifest's directory
    sha256: str
    n_bytes: int


@dataclass(frozen=True)
class ShardEntry:
    file: str
    index: int
    spec: SliceSpec
    sha256: str
    n_bytes: int


@dataclass(frozen=True)
class Manifest:
    path: Path  # manifest.json
    format_version: int
    config: ModelConfig
    source_path: str
    source_n_bytes: int
    source_sha256: str
    source_version: int
    n_workers: int
    group_size: int | None  # int8 group size, None for an fp32 model
    shards: tuple[ShardEntry, ...]
    embedding: FileEntry

    @property
    def directory(self) -> Path:
        return self.path.parent

    @property
    def specs(self) -> list[SliceSpec]:
        return [entry.spec for entry in self.shards]

    def shard_path(self, index: int) -> Path:
        return self.directory / self.shards[index].file

    @property
    def embedding_path(self) -> Path:
        return self.directory / self.embedding.file


def _manifest_path(path_or_dir: str | Path) -> Path:
    path = Path(path_or_dir)
    return path / MANIFEST_NAME if path.is_dir() else path


def _field(data: dict, key: str, kind: type, where: str):
    if not isinstance(data, dict):
        raise FormatError(f"{where}: expected an object")
    if key not in data:
        raise FormatError(f"{where}: missing field {key!r}")
    value = data[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise FormatError(f"{where}: field {key!r} is {value!r}, expected {kind.__name__}")
    return value


def _file_entry(data, where: str) -> tuple[str, str, int]:
    name = _field(data, "file", str, where)
    if not name or Path(name).name != name or name in (".", ".."):
        raise FormatError(f"{where}: file {name!r} must be a plain file name in the manifest's directory")
    sha256 = _field(data, "sha256", str, where)
    if not SHA256_PATTERN.match(sha256):
        raise FormatError(f"{where}: sha256 {sha256!r} is not 64 lowercase hex digits")
    n_bytes = _field(data, "n_bytes", int, where)
    if n_bytes < 0:
        raise FormatError(f"{where}: n_bytes {n_bytes} is negative")
    return name, sha256, n_bytes


def load_manifest(path_or_dir: str | Path) -> Manifest:
    """Read and check manifest.json (a path to it, or its directory)."""
    path = _manifest_path(path_or_dir)
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise FormatError(f"{path}: cannot read manifest: {error.strerror}") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise FormatError(f"{path}: manifest is not valid JSON ({error})") from None
    where = str(path)
    version = _field(data, "format_version", int, where)
    if version != MANIFEST_FORMAT_VERSION:
        raise FormatError(f"{path}: manifest format_version {version}, this build reads {MANIFEST_FORMAT_VERSION}")
    config = _config_from_dict(_field(data, "config", dict, where), where)
    source = _field(data, "source", dict, where)
    source_path = _field(source, "path", str, f"{where}: source")
    source_n_bytes = _field(source, "n_bytes", int, f"{where}: source")
    source_sha256 = _field(source, "sha256", str, f"{where}: source")
    if not SHA256_PATTERN.match(source_sha256):
        raise FormatError(f"{where}: source.sha256 {source_sha256!r} is not 64 lowercase hex digits")
    source_version = _field(source, "version", int, f"{where}: source")
    n_workers = _field(data, "n_workers", int, where)
    if not 1 <= n_workers <= config.n_heads:
        raise FormatError(f"{where}: n_workers {n_workers} is outside 1..n_heads={config.n_heads}")
    if "group_size" not in data:
        raise FormatError(f"{where}: missing field 'group_size'")
    group_size = _group_size_from(data["group_size"], where)
    shard_list = _field(data, "shards", list, where)
    if len(shard_list) != n_workers:
        raise FormatError(f"{where}: {len(shard_list)} shards listed, n_workers is {n_workers}")
    shards = []
    for index, item in enumerate(shard_list):
        item_where = f"{where}: shards[{index}]"
        name, sha256, n_bytes = _file_entry(item, item_where)
        if _field(item, "index", int, item_where) != index:
            raise FormatError(f"{item_where}: index {item['index']}, expected {index}")
        spec = _spec_from_dict(_field(item, "spec", dict, item_where), config, f"{item_where}.spec")
        if (spec.index, spec.count) != (index, n_workers):
            raise FormatError(f"{item_where}: spec is worker {spec.index} of {spec.count}, expected "
                              f"{index} of {n_workers}")
        shards.append(ShardEntry(file=name, sha256=sha256, n_bytes=n_bytes, index=index, spec=spec))
    _check_coverage(config, [entry.spec for entry in shards], where)
    embedding = FileEntry(*_file_entry(_field(data, "embedding", dict, where), f"{where}: embedding"))
    return Manifest(path=path, format_version=version, config=config, source_path=source_path,
                    source_n_bytes=source_n_bytes, source_sha256=source_sha256, source_version=source_version,
                    n_workers=n_workers, group_size=group_size, shards=tuple(shards), embedding=embedding)


def _check_coverage(config: ModelConfig, specs: list[SliceSpec], where: str) -> None:
    """The workers' heads, FFN units and vocabulary rows tile the model, in order."""
    totals = {"heads": config.n_heads, "hidden": config.hidden_dim, "vocab": config.vocab_size}
    for unit, total in totals.items():
        position = 0
        for spec in specs:
            start, stop = spec.unit_range(unit)
            if start != position:
                raise FormatError(f"{where}: shards[{spec.index}].spec.{unit} starts at {start}, expected {position}")
            position = stop
        if position != total:
            raise FormatError(f"{where}: shards cover {unit} 0..{position}, expected 0..{total}")


def load_embedding(manifest: "Manifest | str | Path") -> Matrix:
    """The token embedding table, memory-mapped: (vocab_size, dim) float32 or QuantizedMatrix."""
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    path = manifest.embedding_path
    header, arrays, n_bytes = _read_tensor_file(path)
    _check_kind(path, header, "embedding")
    if n_bytes != manifest.embedding.n_bytes:
        raise FormatError(f"{path}: file is {n_bytes} bytes, manifest says {manifest.embedding.n_bytes}")
    if header["model_sha256"] != manifest.source_sha256:
        raise FormatError(f"{path}: made from model {header['model_sha256']}, manifest says {manifest.source_sha256}")
    config = _config_from_dict(header["config"], str(path))
    if config != manifest.config:
        raise FormatError(f"{path}: config differs from the manifest's")
    group_size = _group_size_from(header["group_size"], str(path))
    matrix = _take_matrix(arrays, "token_embedding", (config.vocab_size, config.dim), group_size, path)
    if arrays:
        raise FormatError(f"{path}: unexpected tensors {', '.join(sorted(arrays))}")
    return matrix


def _verify_file(path: Path, entry: FileEntry | ShardEntry) -> None:
    try:
        n_bytes = path.stat().st_size
    except OSError as error:
        raise FormatError(f"{path}: cannot read: {error.strerror}") from None
    if n_bytes != entry.n_bytes:
        raise FormatError(f"{path}: size is {n_bytes} bytes, manifest says {entry.n_bytes}")
    actual = sha256_file(path)
    if actual != entry.sha256:
        raise FormatError(f"{path}: sha256 is {actual}, manifest says {entry.sha256}")


def verify_shard(manifest: Manifest, index: int) -> None:
    """Check shard `index`'s size and sha256 against the manifest (reads the whole file)."""
    if not 0 <= index < manifest.n_workers:
        raise ConfigError(f"shard index {index} is outside 0..{manifest.n_workers - 1}")
    _verify_file(manifest.shard_path(index), manifest.shards[index])


def verify_embedding(manifest: Manifest) -> None:
    _verify_file(manifest.embedding_path, manifest.embedding)
