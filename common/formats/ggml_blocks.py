"""GGML tensor encodings as GGUF stores them, and their expansion to float32.

A `RawTensor` is one tensor exactly as the file holds it: its GGML type name and its bytes
(a read-only view of the memory map). `to_matrix` keeps Q8_0 / Q4_0 / Q4_1 matrices as blocks
(common/model/gguf_blocks.py, which also holds their decoders); `to_float32` expands one tensor
at a time. Block layouts (llama.cpp ggml-common.h), each block covering
32 consecutive values of a row:
  Q8_0: fp16 d, 32 x int8 q                      w = d * q
  Q4_0: fp16 d, 16 bytes: low nibbles are values 0..15, high nibbles values 16..31
                                                  w = d * (nibble - 8)
  Q4_1: fp16 d, fp16 m, 16 bytes as Q4_0          w = d * nibble + m
K-quants cover 256 values in sub-blocks with their own scales:
  Q4_K: fp16 d, fp16 dmin, 12 bytes of 6-bit scale/min pairs for 8 sub-blocks of 32, then
        128 bytes: byte group c (32 bytes) holds sub-block 2c in its low nibbles, 2c+1 in its
        high ones                                 w = d * scale * nibble - dmin * min
  Q6_K: 128 bytes low 4 bits, 64 bytes high 2 bits, 16 int8 scales (one per 16 values),
        fp16 d at the end                         w = d * scale * (6-bit q - 32)
"""

from dataclasses import dataclass
from functools import partial

import numpy as np

from llmtp.common.model.gguf_blocks import BY_GGML_TYPE, decode_blocks

# type name -> (values per block, bytes per block); plain types are one value per "block"
ENCODINGS = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q4_K": (256, 144),
    "Q6_K": (256, 210),
}
QUANTIZED = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")


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


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    packed = blocks[:, 4:16]
    scales, mins = np.empty((n, 8), np.uint8), np.empty((n, 8), np.uint8)
    scales[:, :4], mins[:, :4] = packed[:, 0:4] & 63, packed[:, 4:8] & 63
    # sub-blocks 4..7: low 4 bits from bytes 8..11, top 2 from the spare bits of bytes 0..7
    scales[:, 4:] = (packed[:, 8:12] & 0x0F) | ((packed[:, 0:4] >> 6) << 4)
    mins[:, 4:] = (packed[:, 8:12] >> 4) | ((packed[:, 4:8] >> 6) << 4)
    quads = blocks[:, 16:].reshape(n, 4, 32)
    values = np.stack([quads & 0x0F, quads >> 4], axis=2).reshape(n, 8, 32).astype(np.float32)
    step = _scale(blocks, 0) * scales  # (n, 8)
    offset = _scale(blocks, 2) * mins
    return (step[:, :, None] * values - offset[:, :, None]).reshape(n, 256)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    low = blocks[:, :128].reshape(n, 2, 2, 32)  # (half, first/second 32 bytes, l)
    high = blocks[:, 128:192].reshape(n, 2, 1, 32)
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32).reshape(n, 2, 8)
    # per half, value 32k + l: k = 0, 1 take low nibbles of byte l / l + 32, k = 2, 3 the high
    # nibbles; the high bits are bits 2k, 2k + 1 of high[l]
    nibbles = np.concatenate([low & 0x0F, low >> 4], axis=2)  # (n, 2, 4, 32)
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    q = (nibbles | (((high >> shifts) & 3) << 4)).astype(np.float32) - np.float32(32)
    q = q.reshape(n, 2, 8, 16)  # 16 values per scale: scale index 2k + l // 16
    return (_scale(blocks, 208).reshape(n, 1, 1, 1) * scales[:, :, :, None] * q).reshape(n, 256)


_DECODERS = {"Q8_0": partial(decode_blocks, "q8_0"), "Q4_0": partial(decode_blocks, "q4_0"),
             "Q4_1": partial(decode_blocks, "q4_1"), "Q4_K": _q4_k, "Q6_K": _q6_k}


def to_matrix(raw: RawTensor):
    """A 2-D tensor as the Matrix that keeps its storage: GGUF blocks for Q8_0 / Q4_0 / Q4_1
    (multiplied by the block kernels, never expanded), a float32 view for F32; the rest
    (F16, BF16, Q4_K, Q6_K, for which no kernel exists) expanded to float32 here."""
    if raw.ggml_type in BY_GGML_TYPE:
        return BY_GGML_TYPE[raw.ggml_type](raw.data.reshape(raw.shape[0], -1), raw.shape[1])
    return to_float32(raw)
