"""GGML tensor encodings as GGUF stores them, and their expansion to float32.

A `RawTensor` is one tensor exactly as the file holds it: its GGML type name and its bytes
(a read-only view of the memory map). Block-quantized types stay blocks here; `to_float32`
expands one tensor at a time. Block layouts (llama.cpp ggml-common.h), each block covering
32 consecutive values of a row:
  Q8_0: fp16 d, 32 x int8 q                      w = d * q
  Q4_0: fp16 d, 16 bytes: low nibbles are values 0..15, high nibbles values 16..31
                                                  w = d * (nibble - 8)
  Q4_1: fp16 d, fp16 m, 16 bytes as Q4_0          w = d * nibble + m
"""

from dataclasses import dataclass

import numpy as np

# type name -> (values per block, bytes per block); plain types are one value per "block"
ENCODINGS = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
}
QUANTIZED = ("Q8_0", "Q4_0", "Q4_1")


@dataclass(frozen=True)
class RawTensor:
    """One tensor as stored: `data` is its bytes (uint8, read-only), shape (rows, cols) or (n,)."""

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def block_size(self) -> int:
        return ENCODINGS[self.ggml_type][0]

    def blocks(self) -> np.ndarray:
        """(n_blocks, bytes per block) uint8 view; a block never straddles two rows."""
        return self.data.reshape(-1, ENCODINGS[self.ggml_type][1])


def n_bytes(ggml_type: str, n_values: int) -> int:
    per_block, block_bytes = ENCODINGS[ggml_type]
    return n_values // per_block * block_bytes


def to_float32(raw: RawTensor) -> np.ndarray:
    """The tensor as float32 of raw.shape: a view for F32, a new array otherwise."""
    kind = raw.ggml_type
    if kind == "F32":
        values = raw.data.view("<f4")
    elif kind == "F16":
        values = raw.data.view("<f2").astype(np.float32)
    elif kind == "BF16":  # bfloat16 is the top half of a float32
        values = (raw.data.view("<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        values = _DECODERS[kind](raw.blocks())
    return values.reshape(raw.shape)


def _scale(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 at byte `start` of every block, as an (n_blocks, 1) float32 column."""
    return np.ascontiguousarray(blocks[:, start:start + 2]).view("<f2").astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """(n_blocks, 16) bytes -> (n_blocks, 32) values: low nibbles first, then high ones."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    return _scale(blocks, 0) * blocks[:, 2:].view(np.int8).astype(np.float32)


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    return _scale(blocks, 0) * (_nibbles(blocks[:, 2:]) - np.float32(8))


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    return _scale(blocks, 0) * _nibbles(blocks[:, 4:]) + _scale(blocks, 2)


_DECODERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1}
