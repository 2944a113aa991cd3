"""`llmtp bench --quant q8_0,q4_0,q4_1`: the measured model's weights quantized into GGUF block
formats, written once into the cache as GGUF files, so in-process engines and workers read them
the way they read any GGUF (blocks kept, shards of blocks)."""

import sys
from pathlib import Path

from llmtp.common.errors import ConfigError
from llmtp.common.model.matrices import MATRIX_TYPES
from llmtp.common.model.tensors import SHARD_LAYER_ORDER

QUANT_FORMATS = ("q8_0", "q4_0", "q4_1")  # common/model/gguf_blocks.py's types

# canonical layer tensor -> GGUF name (common/formats/gguf_file.py reads them back)
GGUF_LAYER_NAMES = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
                    "ffn_norm": "ffn_norm", "w1": "ffn_gate", "w2": "ffn_down", "w3": "ffn_up"}


def parse_quant(text: str | None) -> list[str]:
    """"q8_0,q4_0" -> ["q8_0", "q4_0"]; ConfigError naming the flag on anything else."""
    if not text:
        return []
    formats = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [f for f in formats if f not in QUANT_FORMATS]
    if unknown or not formats:
        raise ConfigError(f"--quant takes a comma list of {', '.join(QUANT_FORMATS)}, got {text!r}")
    return list(dict.fromkeys(formats))


def quantized_path(source: Path, fmt: str) -> Path:
    from ..local_cluster import cache_dir
    stat = source.stat()
    return cache_dir() / "bench" / f"{source.stem}-{stat.st_size}-{stat.st_mtime_ns}-{fmt}.gguf"


def quantized_model(source: Path, fmt: str) -> Path:
    """`source` (any model load_model reads) with every matrix in `fmt`, norms float32, as a GGUF
    file in the cache; written on first use (under a temporary name, then renamed)."""
    import gguf
    import numpy as np

    from llmtp.common.formats.gguf_file import add_llama_metadata
    from llmtp.common.formats.load import load_model
    path = quantized_path(source, fmt)
    if path.exists():
        return path
    model = load_model(source)
    config, weights = model.config, model.weights
    if config.dim % 32 or config.hidden_dim % 32:
        raise ConfigError(f"--quant {fmt}: dim {config.dim} and hidden_dim {config.hidden_dim} must be multiples "
                          f"of 32 (one block)")
    print(f"bench: writing {source.name} in {fmt} to {path}", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    kind = gguf.GGMLQuantizationType[fmt.upper()]
    writer = gguf.GGUFWriter(str(partial), "llama")
    add_llama_metadata(writer, config)

    def add_matrix(name: str, matrix) -> None:
        blocks = MATRIX_TYPES[fmt].from_float(matrix.dequantize(), {}).blocks  # one matrix at a time
        writer.add_tensor(name, blocks, raw_dtype=kind)

    add_matrix("token_embd.weight", weights.token_embedding)
    for i, layer in enumerate(weights.layers):
        for field in SHARD_LAYER_ORDER:  # q, k, v and w1, w3 back to back: one product each
            name = f"blk.{i}.{GGUF_LAYER_NAMES[field]}.weight"
            if field.endswith("norm"):
                writer.add_tensor(name, np.asarray(getattr(layer, field), dtype=np.float32))
            else:
                add_matrix(name, getattr(layer, field))
    writer.add_tensor("output_norm.weight", np.asarray(weights.final_norm, dtype=np.float32))
    if not config.shared_classifier:
        add_matrix("output.weight", weights.classifier)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path
