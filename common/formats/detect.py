"""What kind of model a path holds, told from a folder's config.json or a file's first bytes, without
numpy: the command line asks it before it launches any worker (their start-up overlaps ours)."""

import os
from pathlib import Path

from llmtp.common.errors import FormatError

LLAMA2C, GGUF, HUGGING_FACE = "llama2.c", "gguf", "huggingface"
GGUF_MAGIC = b"GGUF"
HF_CONFIG = "config.json"


def is_gguf(head: bytes) -> bool:
    return head[:4] == GGUF_MAGIC


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / HF_CONFIG).is_file()


def detect_format(path: str | os.PathLike) -> str:
    """LLAMA2C, GGUF or HUGGING_FACE from what is at `path`; FormatError if none fits."""
    path = Path(path)
    if path.is_dir():
        if is_hf_folder(path):
            return HUGGING_FACE
        raise FormatError(f"{path}: a folder without {HF_CONFIG}, so not a Hugging Face model folder")
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


def carries_tokenizer(path: str | os.PathLike) -> bool:
    """A GGUF file or a Hugging Face folder holds its own tokenizer; a llama2.c file does not."""
    return detect_format(path) in (GGUF, HUGGING_FACE)
