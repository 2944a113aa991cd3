"""manifest.json: what a directory of shards holds, and checking the files against it.

The manifest records the model config, the source checkpoint (path, size, sha256, llama2.c
version), the int8 group size (null for fp32), and for each worker's shard and for the
embedding file its name in the directory, size and sha256 (a shard also its slice spec).
load_manifest checks all of it, including that the shards' specs tile the model in order.
The config and spec readers here also check the headers of the shard files themselves.
"""

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from llmtp.common.model.config import LLAMA2C_NORM_EPS, LLAMA2C_ROPE_THETA, ModelConfig
from llmtp.common.errors import ConfigError, FormatError
from llmtp.common.model.split import SliceSpec

MANIFEST_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
HASH_CHUNK = 16 << 20

CONFIG_FIELDS = tuple(field.name for field in dataclasses.fields(ModelConfig))
# Exact types: msgpack/JSON give int, float and bool apart, and True must not pass as 1.
CONFIG_FIELD_TYPES = {field.name: {"int": int, "bool": bool, "float": float}[field.type if isinstance(field.type, str) else field.type.__name__]
                      for field in dataclasses.fields(ModelConfig)}
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


# --- reading ------------------------------------------------------------------------------

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
    config = config_from_dict(_field(data, "config", dict, where), where)
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
    group_size = group_size_from(data["group_size"], where)
    shard_list = _field(data, "shards", list, where)
    if len(shard_list) != n_workers:
        raise FormatError(f"{where}: {len(shard_list)} shards listed, n_workers is {n_workers}")
    shards = []
    for index, item in enumerate(shard_list):
        item_where = f"{where}: shards[{index}]"
        name, sha256, n_bytes = _file_entry(item, item_where)
        if _field(item, "index", int, item_where) != index:
            raise FormatError(f"{item_where}: index {item['index']}, expected {index}")
        spec = spec_from_dict(_field(item, "spec", dict, item_where), config, f"{item_where}.spec")
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


# --- config, spec and group size (also read from shard file headers) ----------------------

def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def config_from_dict(data, where: str) -> ModelConfig:
    if not isinstance(data, dict):
        raise FormatError(f"{where}: config is not a map")
    # Shards written before rope_theta and norm_eps were fields came from llama2.c files only.
    data = {"rope_theta": LLAMA2C_ROPE_THETA, "norm_eps": LLAMA2C_NORM_EPS, **data}
    unknown, missing = set(data) - set(CONFIG_FIELDS), set(CONFIG_FIELDS) - set(data)
    if unknown or missing:
        raise FormatError(f"{where}: config fields unknown {sorted(unknown)}, missing {sorted(missing)}")
    for name in CONFIG_FIELDS:
        wanted = CONFIG_FIELD_TYPES[name]
        value = data[name]
        if type(value) is not wanted:
            raise FormatError(f"{where}: config.{name} is {value!r}, expected {wanted.__name__}")
    config = ModelConfig(**data)
    config.validate(where)
    return config


def spec_from_dict(data, config: ModelConfig, where: str) -> SliceSpec:
    """A SliceSpec whose ranges lie inside the model and whose kv heads serve its heads."""
    try:
        spec = SliceSpec.from_dict(data, config.n_layers)
        ranges = {unit: tuple(spec.unit_range(unit)) for unit in ("heads", "kv_heads", "hidden", "vocab", "layers")}
        valid = (is_count(spec.index) and is_count(spec.count) and spec.index < spec.count
                 and all(len(r) == 2 and all(is_count(n) for n in r) for r in ranges.values()))
    except (TypeError, KeyError, ValueError):
        valid = False
    if not valid:
        raise FormatError(f"{where}: spec {data!r} is not a valid slice spec")
    totals = {"heads": config.n_heads, "kv_heads": config.n_kv_heads, "hidden": config.hidden_dim,
              "vocab": config.vocab_size, "layers": config.n_layers}
    for unit, (start, stop) in ranges.items():
        if not start <= stop <= totals[unit]:
            raise FormatError(f"{where}: spec.{unit} {start}..{stop} is outside 0..{totals[unit]}")
    if spec.layers != (0, config.n_layers):
        raise FormatError(f"{where}: spec.layers {spec.layers[0]}..{spec.layers[1]} is not all "
                          f"{config.n_layers} layers (pipeline stages are not supported yet)")
    first, stop = spec.heads
    needed_kv = (first // config.kv_mul, (stop - 1) // config.kv_mul + 1)
    if stop <= first or spec.kv_heads != needed_kv:
        raise FormatError(f"{where}: spec.kv_heads {spec.kv_heads} do not serve heads {spec.heads} "
                          f"(expected {needed_kv})")
    return spec


def group_size_from(value, where: str) -> int | None:
    if value is None or (is_count(value) and value > 0):
        return value
    raise FormatError(f"{where}: group_size {value!r} is not a positive integer or null")


# --- checking files -----------------------------------------------------------------------

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


def sha256_file(path: str | Path) -> str:
    """Hashed through a map advised onto 2 MiB pages rather than read(): a file first read by
    read() sits in the page cache in small folios, and the next process to map it for weights
    would reload it (common/formats/mapping.py)."""
    from .mapping import map_readonly
    if os.path.getsize(path) == 0:
        return hashlib.sha256().hexdigest()
    mapping = map_readonly(path)
    try:
        digest = hashlib.sha256()
        with memoryview(mapping) as view:
            for start in range(0, len(view), HASH_CHUNK):
                digest.update(view[start:start + HASH_CHUNK])
        return digest.hexdigest()
    finally:
        mapping.close()


def sha256_model(path: str | Path) -> str:
    """A model file's sha256; for a folder (Hugging Face), the sha256 of its files' names and
    sha256s in name order, so a changed or renamed file changes it."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        digest.update(f"{file.name}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


# --- writing ------------------------------------------------------------------------------

def manifest_dict(checkpoint, model_sha256: str, group_size: int | None, shards: list[ShardEntry],
                  embedding: FileEntry) -> dict:
    """The JSON object of manifest.json for `shards` (in worker order) cut from `checkpoint`
    (common.checkpoint.Checkpoint)."""
    return {
        "format_version": MANIFEST_FORMAT_VERSION,
        "config": dataclasses.asdict(checkpoint.config),
        "source": {"path": str(Path(checkpoint.path).resolve()), "n_bytes": int(checkpoint.n_bytes),
                   "sha256": model_sha256, "version": int(checkpoint.version)},
        "n_workers": len(shards),
        "group_size": group_size,
        "shards": [{"file": entry.file, "index": entry.index, "spec": entry.spec.to_dict(),
                    "sha256": entry.sha256, "n_bytes": entry.n_bytes} for entry in shards],
        "embedding": {"file": embedding.file, "sha256": embedding.sha256, "n_bytes": embedding.n_bytes},
    }


def write_manifest(out_dir: Path, manifest: dict) -> Manifest:
    """Write `manifest` as out_dir/manifest.json (atomically) and read it back checked."""
    manifest_path = Path(out_dir) / MANIFEST_NAME
    partial = manifest_path.with_name(MANIFEST_NAME + ".partial")
    partial.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(partial, manifest_path)
    return load_manifest(manifest_path)
