"""llama2.c's tokenizer.bin written from a SentencePiece-style vocabulary (for `llmtp convert`).

The layout and spelling are llama2.c's tokenizer.py export: uint32 max_token_length, then per
token float32 score, int32 byte length, the UTF-8 bytes; '▁' spelled as a space, BOS and EOS
as "\\n<s>\\n" and "\\n</s>\\n". run.c merges by these scores, so only a vocabulary that has
them (GGUF's tokenizer.ggml.scores for model 'llama') can be exported.
"""

import os
import struct
from pathlib import Path
from typing import Any

from llmtp.common.errors import FormatError

from .tokenizer import BOS_PIECE_IN_BIN, EOS_PIECE_IN_BIN, SPACE_SYMBOL


def sentencepiece_vocabulary(meta: dict[str, Any], source: str) -> tuple[list[str], list[float], int, int]:
    """(pieces, scores, bos_id, eos_id) of a GGUF 'llama' tokenizer; FormatError naming the
    field that keeps it from being a tokenizer.bin."""
    model = meta.get("tokenizer.ggml.model")
    if model != "llama":
        raise FormatError(f"{source}: tokenizer.ggml.model is {model!r}; a tokenizer.bin holds only "
                          f"a SentencePiece-style ('llama') vocabulary")
    pieces, scores = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.scores")
    if not pieces or scores is None or len(scores) != len(pieces):
        raise FormatError(f"{source}: tokenizer.ggml.scores is missing or not one per token")
    bos_id, eos_id = meta.get("tokenizer.ggml.bos_token_id", 1), meta.get("tokenizer.ggml.eos_token_id", 2)
    if (bos_id, eos_id) != (1, 2):  # run.c hard-codes them
        raise FormatError(f"{source}: tokenizer.ggml.bos_token_id/eos_token_id are {bos_id}/{eos_id}; "
                          f"run.c needs 1/2")
    return list(pieces), list(scores), bos_id, eos_id


def encode_tokenizer_bin(pieces: list[str], scores: list[float], bos_id: int = 1, eos_id: int = 2) -> bytes:
    encoded = []
    for token_id, piece in enumerate(pieces):
        if token_id == bos_id:
            piece = BOS_PIECE_IN_BIN
        elif token_id == eos_id:
            piece = EOS_PIECE_IN_BIN
        encoded.append(piece.replace(SPACE_SYMBOL, " ").encode("utf-8"))
    out = [struct.pack("<I", max(len(piece) for piece in encoded))]
    for piece, score in zip(encoded, scores, strict=True):
        out += [struct.pack("<fi", score, len(piece)), piece]
    return b"".join(out)


def write_tokenizer_bin(path: str | os.PathLike, pieces: list[str], scores: list[float],
                        bos_id: int = 1, eos_id: int = 2) -> Path:
    path = Path(path)
    write_atomically(path, encode_tokenizer_bin(pieces, scores, bos_id, eos_id))
    return path


def write_atomically(path: Path, data: bytes) -> None:
    """Appear under `path` only complete (an interrupted write leaves the old file or none)."""
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
