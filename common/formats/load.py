"""`load_model(path)`: a llama2.c file, a GGUF file or a Hugging Face folder, told apart by content.

Every reader returns the same thing, a `LoadedModel`: ModelConfig and ModelWeights under the
canonical names (q/k rows in llama2.c's pair order, matrices (out, in)), so nothing downstream
learns the source format. It carries what `inspect` shows (source format, each tensor's
stored type) and can be handed to LocalEngine.from_checkpoint like a Checkpoint.
"""

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtp.common.errors import FormatError
from llmtp.common.model.config import ModelConfig
from llmtp.common.model.weights import LAYER_FIELDS, ModelWeights

from .checkpoint import FORMAT_NAMES, Checkpoint, load_checkpoint, tensor_layout
from .detect import GGUF, HUGGING_FACE, LLAMA2C, carries_tokenizer, detect_format  # noqa: F401 (re-exported)
from .gguf_file import read_gguf
from .hf_folder import read_hf_folder


@dataclass(frozen=True)
class LoadedModel:
    path: Path
    source_format: str  # LLAMA2C, GGUF or HUGGING_FACE
    format_detail: str  # e.g. "llama2.c version 2 (int8 ...)", "GGUF v3", "Hugging Face safetensors, 3 shards"
    config: ModelConfig
    weights: ModelWeights
    tensor_types: dict[str, str]  # canonical name -> type as stored ("F32", "Q4_1", "BF16", ...)
    n_bytes: int
    mapping: mmap.mmap | None = None  # llama2.c files: the map every weight views
    source: Any = field(default=None, repr=False)  # Checkpoint, GgufModel or HfModel

    # What the shard writer and its manifest read of a Checkpoint.
    @property
    def group_size(self) -> int | None:
        return self.source.group_size if self.source_format == LLAMA2C else None

    @property
    def version(self) -> int:
        """The llama2.c version; -1 for a GGUF file or Hugging Face folder (manifests record it)."""
        return self.source.version if self.source_format == LLAMA2C else -1


def load_model(path: str | os.PathLike, progress=None) -> LoadedModel:
    """progress: for a progress bar, called as progress(tensors done, tensors in all) while a
    GGUF file or Hugging Face folder is read (a llama2.c file is only mapped)."""
    path = Path(path)
    kind = detect_format(path)
    if kind == GGUF:
        model = read_gguf(path, progress)
        version = model.reader.fields["GGUF.version"].contents()
        return LoadedModel(path, GGUF, f"GGUF v{version}, architecture llama", model.config, model.weights,
                           model.tensor_types, model.n_bytes, None, model)
    if kind == HUGGING_FACE:
        model = read_hf_folder(path, progress)
        n_files = len(set(p for p in path.glob("*.safetensors")))
        detail = f"Hugging Face LlamaForCausalLM, safetensors in {n_files} file{'s' if n_files != 1 else ''}"
        return LoadedModel(path, HUGGING_FACE, detail, model.config, model.weights, model.tensor_types,
                           model.n_bytes, None, model)
    checkpoint = load_checkpoint(path)
    return LoadedModel(path, LLAMA2C, FORMAT_NAMES[checkpoint.version], checkpoint.config, checkpoint.weights,
                       _llama2c_types(checkpoint), checkpoint.n_bytes, checkpoint.mapping, checkpoint)


def _llama2c_types(checkpoint: Checkpoint) -> dict[str, str]:
    return {spec.name: "F32" if spec.encoding == "f32" else f"int8, group {checkpoint.group_size} (llama2.c)"
            for spec in tensor_layout(checkpoint.config, checkpoint.version) if spec.encoding != "rope"}


def load_model_tokenizer(model: LoadedModel):
    """The tokenizer a GGUF file or Hugging Face folder carries (an HfTokenizer); None for a
    llama2.c file, whose tokenizer.bin / .model lies beside it (tokenizer.load_tokenizer)."""
    if model.source_format == GGUF:
        from .gguf_file import metadata
        from .gguf_tokenizer import gguf_tokenizer
        tokenizer = gguf_tokenizer(metadata(model.source.reader, include_arrays=True), str(model.path))
    elif model.source_format == HUGGING_FACE:
        from .hf_tokenizer import load_hf_tokenizer
        if not (model.path / "tokenizer.json").is_file() and (model.path / "tokenizer.model").is_file():
            from .tokenizer import load_tokenizer  # a SentencePiece model alone, read as before
            return load_tokenizer(model.path / "tokenizer.model", model.config.vocab_size, allow_longer=False)
        tokenizer = load_hf_tokenizer(model.path)
    else:
        return None
    if tokenizer.vocab_size > model.config.vocab_size:  # fewer is fine: padded embeddings
        raise FormatError(f"{tokenizer.source}: the tokenizer has {tokenizer.vocab_size} tokens, more than the "
                          f"model's {model.config.vocab_size} embedding rows")
    return tokenizer


def describe_model(model: LoadedModel, tokenizer=None) -> str:
    """Multi-line text for `llmtp inspect`: source format, hyper-parameters (rope theta and
    norm eps too), tokenizer kind and vocabulary, and each tensor's stored type."""
    from .checkpoint import PARAM_NAMES, describe_checkpoint

    if model.source_format == LLAMA2C:
        return describe_checkpoint(model.source)
    config = model.config
    lines = [f"path:          {model.path}", f"format:        {model.format_detail}"]
    lines += [f"{name + ':':<15}{getattr(config, name)}" for name in PARAM_NAMES]
    lines += [f"head_dim:      {config.head_dim}",
              f"kv_dim:        {config.kv_dim} ({config.kv_mul} query heads per kv head)",
              f"rope_theta:    {config.rope_theta:g}",
              f"norm_eps:      {config.norm_eps:g}",
              f"classifier:    {'shared with token_embedding' if config.shared_classifier else 'separate'}"]
    if tokenizer is not None:  # an HfTokenizer, or tokenizer.py's Tokenizer for a lone tokenizer.model
        stops = list(getattr(tokenizer, "stop_ids", (tokenizer.eos_id,)))
        ids = f"BOS {tokenizer.bos_id}, EOS {tokenizer.eos_id}, stops {stops}"
        lines.append(f"tokenizer:     {getattr(tokenizer, 'kind', 'SentencePiece (tokenizer.model)')}, "
                     f"{tokenizer.vocab_size} tokens ({ids}; "
                     f"adds BOS: {'yes' if getattr(tokenizer, 'add_bos', True) else 'no'})")
    lines.append("tensors:")
    rows: dict[str, tuple[tuple, set]] = {}
    every = f"layers.{{0..{config.n_layers - 1}}}." if config.n_layers > 1 else "layers.0."
    shapes = _shapes(config)
    order = ["token_embedding"] + [f"layers.{i}.{field}" for i in range(config.n_layers) for field in LAYER_FIELDS]
    order += ["final_norm", "classifier"]
    for name in (name for name in order if name in model.tensor_types):
        kind = model.tensor_types[name]
        shown = every + name.split(".")[2] if name.startswith("layers.") else name
        rows.setdefault(shown, (shapes[name], set()))[1].add(kind)
    width = max(len(name) for name in rows)
    lines.append(f"  {'name':<{width}}  {'shape':<14}stored as")
    lines += [f"  {name:<{width}}  {str(shape):<14}{', '.join(sorted(kinds))}" for name, (shape, kinds) in rows.items()]
    lines += [f"parameters:    {config.n_params():,}", f"file bytes:    {model.n_bytes:,}"]
    return "\n".join(lines)


def _shapes(config: ModelConfig) -> dict[str, tuple]:
    from .gguf_file import expected_shapes
    return expected_shapes(config) | {"classifier": (config.vocab_size, config.dim)}


def model_config(path: str | os.PathLike) -> ModelConfig:
    """The config alone, reading no weights (a GGUF's metadata, a folder's config.json, a
    llama2.c header)."""
    path = Path(path)
    kind = detect_format(path)
    if kind == GGUF:
        from .gguf_file import open_llama_gguf
        return open_llama_gguf(path)[2]
    if kind == HUGGING_FACE:
        from .hf_folder import read_config
        return read_config(path)[0]
    return load_checkpoint(path).config  # only maps the file


def open_tokenizer(path: str | os.PathLike, vocab_size: int, allow_longer: bool = False):
    """The tokenizer at `path`: a tokenizer.bin or .model, or the one a GGUF file or Hugging Face
    folder carries (read without its weights)."""
    path = Path(path)
    if path.is_dir() or (path.is_file() and detect_format(path) == GGUF):
        kind = detect_format(path)
        if kind == GGUF:
            from .gguf_file import metadata, open_gguf
            from .gguf_tokenizer import gguf_tokenizer
            tokenizer = gguf_tokenizer(metadata(open_gguf(path), include_arrays=True), str(path))
        elif not (path / "tokenizer.json").is_file() and (path / "tokenizer.model").is_file():
            from .tokenizer import load_tokenizer
            return load_tokenizer(path / "tokenizer.model", vocab_size, allow_longer=allow_longer)
        else:
            from .hf_tokenizer import load_hf_tokenizer
            tokenizer = load_hf_tokenizer(path)
        if tokenizer.vocab_size > vocab_size:
            raise FormatError(f"{tokenizer.source}: the tokenizer has {tokenizer.vocab_size} tokens, more than "
                              f"the model's {vocab_size} embedding rows")
        return tokenizer
    from .tokenizer import load_tokenizer
    return load_tokenizer(path, vocab_size, allow_longer=allow_longer)
