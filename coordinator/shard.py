"""`llmtp shard CHECKPOINT --workers N -o DIR`: cut a checkpoint into per-worker shard files."""

from pathlib import Path

from llmtp.common.formats.load import load_model
from llmtp.common.formats.manifest import Manifest
from llmtp.common.formats.shard_file import write_shards


def run_shard(checkpoint_path: str | Path, n_workers: int, out_dir: str | Path, progress: bool = True) -> Manifest:
    """Write shard-{i}-of-{N}.bin, embedding.bin and manifest.json into `out_dir`.

    A worker count outside 1..n_heads (or an int8 model whose heads cannot be cut on
    group boundaries) is a ConfigError raised before anything is written."""
    checkpoint = load_model(checkpoint_path)
    return write_shards(checkpoint, n_workers, out_dir, progress=progress)


def describe_manifest(manifest: Manifest) -> str:
    """A few lines for the CLI to print after sharding. Every range a..b includes b, as
    `llmtp inspect`'s layers.{0..N-1} does."""
    config = manifest.config
    encoding = f"int8 (group {manifest.group_size})" if manifest.group_size else "float32"
    lines = [f"{manifest.source_path}: {config.n_layers} layers, {config.n_heads} heads "
             f"({config.n_kv_heads} kv), {encoding}, sha256 {manifest.source_sha256[:16]}",
             f"{manifest.n_workers} shards in {manifest.directory}:"]
    for entry in manifest.shards:
        spec = entry.spec
        lines.append(f"  {entry.file}: heads {spec.heads[0]}..{spec.heads[1] - 1}, "
                     f"kv heads {spec.kv_heads[0]}..{spec.kv_heads[1] - 1}, hidden {spec.hidden[0]}..{spec.hidden[1] - 1}, "
                     f"vocab {spec.vocab[0]}..{spec.vocab[1] - 1}, {entry.n_bytes:,} bytes")
    lines.append(f"  {manifest.embedding.file}: {manifest.embedding.n_bytes:,} bytes")
    return "\n".join(lines)
