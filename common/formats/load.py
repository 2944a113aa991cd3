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
from llmtp.common.model.weights import ModelWeights

from .checkpoint import FORMAT_NAMES, Checkpoint, load_checkpoint, tensor_layout
from .gguf_file import is_gguf, read_gguf
from .hf_folder import CONFIG, is_hf_folder, read_hf_folder

LLAMA2C, GGUF, HUGGING_FACE = "llama2.c", "gguf", "huggingface"


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


def detect_format(path: str | os.PathLike) -> str:
    """LLAMA2C, GGUF or HUGGING_FACE from what is at `path`; FormatError if none fits."""
    path = Path(path)
    if path.is_dir():
        if is_hf_folder(path):
            return HUGGING_FACE
        raise FormatError(f"{path}: a folder without {CONFIG}, so not a Hugging Face model folder")
    try:
        with open(path, "rb") as file:
            head = file.read(4)
    except OSError as error:
        raise FormatError(f"{path}: cannot read model: {error.strerror or error}") from None
    if is_gguf(head):
        return GGUF
    if head[:1] == b"{":
        raise FormatError(f"{path}: a JSON file; pass the Hugging Face folder that holds it")
    return LLAMA2C  # load_checkpoint checks its magic or version-0 header


def load_model(path: str | os.PathLike) -> LoadedModel:
    path = Path(path)
    kind = detect_format(path)
    if kind == GGUF:
        model = read_gguf(path)
        version = model.reader.fields["GGUF.version"].contents()
        return LoadedModel(path, GGUF, f"GGUF v{version}, architecture llama", model.config, model.weights,
                           model.tensor_types, model.n_bytes, None, model)
    if kind == HUGGING_FACE:
        model = read_hf_folder(path)
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
        return gguf_tokenizer(metadata(model.source.reader, include_arrays=True), str(model.path))
    if model.source_format == HUGGING_FACE:
        from .hf_tokenizer import load_hf_tokenizer
        return load_hf_tokenizer(model.path)
    return None
