"""Shard files: one worker's weights, cut as the tensor table says and memory-mapped back.

A shard file (also used for the coordinator's embedding table):

  bytes 0..8    b"LLMTPSHD"
  bytes 8..12   uint32 SHARD_FORMAT_VERSION (little-endian)
  bytes 12..16  uint32 length of the msgpack header that follows
  header        {kind, config, spec, model_sha256, group_size, encodings: {matrix name: {type, ...params}},
                 tensors: [{name, dtype, shape, offset}]}
  data          each tensor as raw little-endian C-order bytes at a 64-byte-aligned absolute
                offset; the file ends exactly where the last tensor ends.

A matrix is stored as the parts its type names (common/model/matrices.py): an fp32 matrix
is one tensor (`layers.3.wq`), an int8 one two (`layers.3.wq.values`, `layers.3.wq.scales`);
the header's `encodings` maps each matrix name to its type tag and parameters (files written
before it existed are read as fp32 or int8 by the tensors present). Column slices (wo, w2)
are copied into contiguous blocks when written, so a worker's arrays are plain C-contiguous
views of the mapped file.

write_shards cuts a checkpoint for n workers (common/slicing.py) and writes one shard file
per worker, embedding.bin and the `manifest.json` that lists them (common/manifest.py).
"""

import dataclasses
import hashlib
import math
import mmap
import os
import sys  # noqa: F401  (Progress writes to sys.stderr; tests patch it through here)
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np

from llmtp.common.model.config import ModelConfig
from llmtp.common.errors import FormatError
from .mapping import map_readonly
from .progress import Progress
from .verification import verify_mapped
from .manifest import (SHA256_PATTERN, FileEntry, Manifest, ShardEntry, config_from_dict, group_size_from, is_count,
                       load_manifest, manifest_dict, sha256_file, sha256_model, spec_from_dict, write_manifest)
from llmtp.common.model.matrices import MATRIX_TYPES, Encoding, F32Matrix, Matrix
from llmtp.common.model.q8_grouped import GroupedQ8Matrix
from llmtp.common.model.slicing import check_cuts, column_granule, local_shape, named_matrices, slice_weights
from llmtp.common.model.split import SliceSpec, plan_split
from llmtp.common.model.tensors import LAYER_TENSORS, TENSOR, layer_key, table_name
from llmtp.common.model.weights import LayerWeights, ShardWeights

SHARD_MAGIC = b"LLMTPSHD"
SHARD_FORMAT_VERSION = 1
EMBEDDING_NAME = "embedding.bin"
ALIGNMENT = 64
PRELUDE = 16  # magic, format version, header length
PROGRESS_MIN_BYTES = 100 * 1000 * 1000

DTYPES = {"float32": np.dtype("<f4"), "int8": np.dtype("i1"), "uint8": np.dtype("u1")}


def shard_file_name(index: int, count: int) -> str:
    return f"shard-{index}-of-{count}.bin"


# --- writing ------------------------------------------------------------------------------

def _file_arrays(name: str, tensor) -> list[tuple[str, np.ndarray, np.dtype]]:
    """(file name, array, dtype) of each stored part of a matrix, or of a float32 vector."""
    if not isinstance(tensor, Matrix):
        return [(name, tensor, DTYPES["float32"])]
    layout = type(tensor).layout(tensor.shape, tensor.encoding.params)
    return [(name + part.suffix, array, part.dtype) for part, array in zip(layout, tensor.parts(), strict=True)]


def _contents(named: list[tuple[str, object]]) -> tuple[dict, list]:
    """(the header's encodings map, the arrays to write) of named tensors."""
    encodings = {name: tensor.encoding.to_dict() for name, tensor in named if isinstance(tensor, Matrix)}
    return encodings, [entry for name, tensor in named for entry in _file_arrays(name, tensor)]


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
            "model_sha256": model_sha256, "group_size": group_size, "encodings": {}, "tensors": []}


def write_shards(checkpoint, n_workers: int, out_dir: str | Path, model_sha256: str | None = None,
                 progress: bool = True) -> Manifest:
    """Cut `checkpoint` (common.checkpoint.Checkpoint) for `n_workers` and write the shards,
    embedding.bin and manifest.json into `out_dir`."""
    config, weights = checkpoint.config, checkpoint.weights
    group_size = checkpoint.group_size or None
    specs = plan_split(config, n_workers, column_granule(weights))
    for spec in specs:  # refuse before writing anything
        check_cuts(weights, config, spec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if model_sha256 is None:
        model_sha256 = sha256_model(checkpoint.path)

    def file_contents(kind: str, spec: SliceSpec | None, named) -> tuple[dict, list]:
        header = _file_header(kind, config, spec, model_sha256, group_size)
        header["encodings"], arrays = _contents(list(named))
        return header, arrays

    # views of the checkpoint, made per file so only one shard's are alive
    jobs = [(shard_file_name(spec.index, n_workers), f"shard {spec.index + 1}/{n_workers}",
             lambda spec=spec: file_contents("shard", spec, named_matrices(slice_weights(weights, spec, config),
                                                                             spec.layers[0])))
            for spec in specs]
    jobs.append((EMBEDDING_NAME, "embedding",
                 lambda: file_contents("embedding", None, [("token_embedding", weights.token_embedding)])))

    bar = Progress(sum(_layout(*make_contents())[1] for _, _, make_contents in jobs), progress,
                   PROGRESS_MIN_BYTES)
    written = {}
    try:
        for file_name, label, make_contents in jobs:
            bar.label = label
            written[file_name] = _write_tensor_file(out_dir / file_name, *make_contents(), bar.advance)
    finally:
        bar.finish()

    shards = []
    for spec in specs:
        name = shard_file_name(spec.index, n_workers)
        sha256, n_bytes = written[name]
        shards.append(ShardEntry(file=name, index=spec.index, spec=spec, sha256=sha256, n_bytes=n_bytes))
    embedding = FileEntry(EMBEDDING_NAME, *written[EMBEDDING_NAME])
    return write_manifest(out_dir, manifest_dict(checkpoint, model_sha256, group_size, shards, embedding))


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
    mapping: mmap.mmap | None = None  # the file's map, which every weight views


def _read_tensor_file(path: Path) -> tuple[dict, dict[str, np.ndarray], int, mmap.mmap]:
    """Map `path` read-only and check everything but the meaning of the tensors:
    (header, name -> array view of the map, file size, the map)."""
    path = Path(path)
    try:
        n_bytes = path.stat().st_size
    except OSError as error:
        raise FormatError(f"{path}: cannot read shard file: {error.strerror}") from None
    if n_bytes < PRELUDE:
        raise FormatError(f"{path}: file is {n_bytes} bytes, too short for a shard header")
    try:
        mapping = map_readonly(path)
    except OSError as error:
        raise FormatError(f"{path}: cannot map shard file: {error.strerror}") from None
    data = np.frombuffer(mapping, dtype=np.uint8)
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
    return header, arrays, n_bytes, mapping


def _tensor_entry(path: Path, number: int, entry) -> tuple[str, np.dtype, tuple[int, ...], int]:
    where = f"{path}: tensors[{number}]"
    if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape", "offset"}:
        raise FormatError(f"{where} must be a map of name, dtype, shape, offset")
    name, dtype, shape, offset = entry["name"], entry["dtype"], entry["shape"], entry["offset"]
    if not isinstance(name, str):
        raise FormatError(f"{where}: name is not a string")
    if dtype not in DTYPES:
        raise FormatError(f"{where} ({name}): dtype {dtype!r}, expected one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(is_count(n) for n in shape):
        raise FormatError(f"{where} ({name}): shape {shape!r} is not a list of non-negative integers")
    if not is_count(offset):
        raise FormatError(f"{where} ({name}): offset {offset!r} is not a non-negative integer")
    return name, DTYPES[dtype], tuple(shape), offset


def _file_encodings(header: dict, path: Path) -> dict | None:
    """The header's matrix name -> type map; None for a file written before there was one."""
    encodings = header.get("encodings")
    if encodings is None:
        return None
    if not isinstance(encodings, dict):
        raise FormatError(f"{path}: header 'encodings' is not a map")
    return encodings


def _encoding_of(arrays: dict, name: str, encodings: dict | None, group_size: int | None, path: Path) -> Encoding:
    if encodings is not None:
        if name not in encodings:
            raise FormatError(f"{path}: header 'encodings' has no entry for tensor {name}")
        return Encoding.from_dict(encodings[name], f"{path}: encodings[{name!r}]")
    if name in arrays:  # before the encodings map: fp32 under the name, int8 as .values/.scales
        return Encoding(F32Matrix.type_tag)
    if f"{name}.values" not in arrays or f"{name}.scales" not in arrays:
        raise FormatError(f"{path}: tensor {name} is missing")
    if group_size is None:
        raise FormatError(f"{path}: tensor {name} is int8 but the header's group_size is null")
    return Encoding(GroupedQ8Matrix.type_tag, {"group_size": group_size})


def _take_matrix(arrays: dict, name: str, shape: tuple, encodings: dict | None, group_size: int | None,
                 path: Path) -> Matrix:
    """Pop the parts of matrix `name` (as its encoding names them), checking dtypes and shapes."""
    encoding = _encoding_of(arrays, name, encodings, group_size, path)
    cls = MATRIX_TYPES[encoding.type]
    problem = cls.params_problem(shape, encoding.params)
    if problem:
        raise FormatError(f"{path}: tensor {name} is {encoding.type} but {problem}")
    parts = []
    for part in cls.layout(shape, encoding.params):
        part_name = name + part.suffix
        if part_name not in arrays:
            raise FormatError(f"{path}: tensor {part_name} is missing")
        array = arrays.pop(part_name)
        if array.dtype != part.dtype or array.shape != part.shape:
            raise FormatError(f"{path}: tensor {part_name} has dtype {array.dtype} shape {array.shape}, "
                              f"expected {part.dtype.name} {part.shape}")
        parts.append(array)
    return cls.from_parts(shape, encoding.params, parts)


def _take_vector(arrays: dict, name: str, shape: tuple, path: Path) -> np.ndarray:
    if name not in arrays:
        raise FormatError(f"{path}: tensor {name} is missing")
    array = arrays.pop(name)
    if array.dtype != DTYPES["float32"] or array.shape != shape:
        raise FormatError(f"{path}: tensor {name} has dtype {array.dtype} shape {array.shape}, "
                          f"expected float32 {shape}")
    return array


def _check_kind(path: Path, header: dict, kind: str) -> None:
    if header["kind"] != kind:
        raise FormatError(f"{path}: file holds {header['kind']!r}, expected {kind!r}")
    if not isinstance(header["model_sha256"], str) or not SHA256_PATTERN.match(header["model_sha256"]):
        raise FormatError(f"{path}: model_sha256 {header['model_sha256']!r} is not 64 hex digits")


def load_shard(path: str | Path) -> Shard:
    """Map a shard file read-only; every weight is a C-contiguous view of the map (no copies)."""
    path = Path(path)
    header, arrays, n_bytes, mapping = _read_tensor_file(path)
    _check_kind(path, header, "shard")
    config = config_from_dict(header["config"], str(path))
    spec = spec_from_dict(header["spec"], config, str(path))
    group_size = group_size_from(header["group_size"], str(path))
    encodings = _file_encodings(header, path)

    def take(key: str):
        name = table_name(key)
        shape = local_shape(name, config, spec)
        if not TENSOR[name].is_matrix:
            return _take_vector(arrays, key, shape, path)
        return _take_matrix(arrays, key, shape, encodings, group_size, path)

    layers = [LayerWeights(**{name: take(layer_key(index, name)) for name in LAYER_TENSORS})
              for index in range(*spec.layers)]
    weights = ShardWeights(layers=layers, final_norm=take("final_norm"), classifier=take("classifier"))
    if arrays:
        raise FormatError(f"{path}: unexpected tensors {', '.join(sorted(arrays))}")
    return Shard(path=path, config=config, spec=spec, weights=weights, model_sha256=header["model_sha256"],
                 group_size=group_size, n_bytes=n_bytes, mapping=mapping)


def load_embedding(manifest: Manifest | str | Path, verify: bool = True) -> Matrix:
    """The token embedding table, memory-mapped, as a Matrix of the file's storage type;
    checked against the manifest's sha256 first (common/formats/verification.py)."""
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    path = manifest.embedding_path
    header, arrays, n_bytes, mapping = _read_tensor_file(path)
    if verify:
        verify_mapped(path, mapping, manifest.embedding.n_bytes, manifest.embedding.sha256)
    _check_kind(path, header, "embedding")
    if n_bytes != manifest.embedding.n_bytes:
        raise FormatError(f"{path}: file is {n_bytes} bytes, manifest says {manifest.embedding.n_bytes}")
    if header["model_sha256"] != manifest.source_sha256:
        raise FormatError(f"{path}: made from model {header['model_sha256']}, manifest says {manifest.source_sha256}")
    config = config_from_dict(header["config"], str(path))
    if config != manifest.config:
        raise FormatError(f"{path}: config differs from the manifest's")
    group_size = group_size_from(header["group_size"], str(path))
    matrix = _take_matrix(arrays, "token_embedding", TENSOR["token_embedding"].shape(config),
                          _file_encodings(header, path), group_size, path)
    if arrays:
        raise FormatError(f"{path}: unexpected tensors {', '.join(sorted(arrays))}")
    return matrix
