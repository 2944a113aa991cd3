"""GGUF's 32-value block formats Q8_0, Q4_0 and Q4_1 as Matrix types (see common/model/matrices.py).

A matrix keeps its blocks as the file stores them, one (rows, row_bytes) uint8 array: row r is
cols / 32 blocks back to back (layouts in common/kernels/layout.py). Products run on the blocks
(common/kernels: activations quantized to Q8 blocks, integer dot products per block); prefill
expands one small tile of rows at a time for BLAS; an embedding lookup expands only its rows. Cuts fall on block boundaries: any row range,
columns in multiples of 32. `decode_blocks` and `encode_blocks` are the formats' one definition
(common/formats/ggml_blocks.py expands a GGUF tensor with decode_blocks).

Quantization (from_float, for `llmtp bench --quant` and the tests) follows llama.cpp's reference
quantize_row_*_ref: Q8_0 d = max|w| / 127, q = round(w / d); Q4_0 d = w_m / -8 with w_m the value
of largest magnitude, q = min(15, trunc(w / d + 8.5)); Q4_1 d = (max - min) / 15, m = min,
q = min(15, trunc((w - min) / d + 0.5)); d and m stored as fp16.
"""

import threading
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np

import llmtp.common.kernels as kernels
from llmtp.common.kernels.layout import BLOCK_BYTES, QK

from .matrices import Encoding, Matrix, Part, QuantizedRowStack, register_matrix_type, stacked_view

# Above this many tokens (prefill) a product expands TILE_VALUES weights at a time into a
# per-thread buffer and lets BLAS multiply the tile: the integer kernel recomputes every block
# for every token, BLAS reuses each weight across tokens from cache. Below it (decode) the
# kernel reads a quarter of the bytes or less, which is what decode is bound by.
PREFILL_TOKENS = 8
TILE_VALUES = 256 * 1024  # 1 MiB of float32: a few hundred rows, small beside any weight matrix

_tiles = threading.local()


def _tile_buffer(size: int) -> np.ndarray:
    """`size` float32 values, one buffer per thread (a worker's products run on one thread)."""
    buffer = getattr(_tiles, "buffer", None)
    if buffer is None or buffer.size < size:
        buffer = _tiles.buffer = np.empty(size, dtype=np.float32)
    return buffer


def decode_blocks(fmt: str, blocks: np.ndarray) -> np.ndarray:
    """(n, block bytes) uint8 blocks of format `fmt` -> (n, 32) float32 values (the kernels' expansion)."""
    return kernels.dequantize_gguf(fmt, blocks)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    return (q[:, :QK // 2] | (q[:, QK // 2:] << 4)).astype(np.uint8)


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype("<f2").reshape(-1, 1).view(np.uint8)


def encode_blocks(fmt: str, values: np.ndarray) -> np.ndarray:
    """(n, 32) float values -> (n, block bytes) uint8 blocks, as llama.cpp's reference quantizer."""
    x = np.asarray(values, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        if fmt == "q8_0":
            d = np.abs(x).max(axis=1) / np.float32(127)
            inverse = np.where(d > 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
            ratio = (x * inverse[:, None]).astype(np.float64)  # + 0.5 exact in float64: roundf's halves
            q = np.copysign(np.floor(np.abs(ratio) + 0.5), ratio)
            return np.concatenate([_fp16_bytes(d), q.astype(np.int8).view(np.uint8)], axis=1)
        if fmt == "q4_0":
            extreme = x[np.arange(len(x)), np.abs(x).argmax(axis=1)]
            d = extreme / np.float32(-8)
            inverse = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
            q = np.minimum(15, np.trunc(x * inverse[:, None] + np.float32(8.5))).astype(np.uint8)
            return np.concatenate([_fp16_bytes(d), _pack_nibbles(q)], axis=1)
        low, high = x.min(axis=1), x.max(axis=1)
        d = (high - low) / np.float32(15)
        inverse = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
        q = np.minimum(15, np.trunc((x - low[:, None]) * inverse[:, None] + np.float32(0.5))).astype(np.uint8)
        return np.concatenate([_fp16_bytes(d), _fp16_bytes(low), _pack_nibbles(q)], axis=1)


@dataclass
class GgufBlockMatrix(Matrix):
    """A matrix of GGUF blocks: `blocks` (rows, cols / 32 * block bytes) uint8, `cols` values per row."""

    fmt: ClassVar[str]  # the kernels' name of the format

    blocks: np.ndarray
    cols: int

    def __post_init__(self):
        expected = self.cols // QK * BLOCK_BYTES[self.fmt]
        if self.blocks.dtype != np.uint8 or self.blocks.ndim != 2 or self.blocks.shape[1] != expected:
            raise ValueError(f"{self.type_tag} blocks of {self.cols} columns must be uint8 (rows, {expected}), "
                             f"got {self.blocks.dtype} {self.blocks.shape}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.blocks.shape[0], self.cols

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes

    @property
    def encoding(self) -> Encoding:
        return Encoding(self.type_tag)

    @property
    def col_granule(self) -> int:
        return QK

    def block_name(self, axis: int) -> str:
        return f"{self.type_tag} blocks of {QK} columns" if axis == 1 else super().block_name(axis)

    def kernel_takes(self, x: np.ndarray) -> bool:
        """Whether the block kernel multiplies x (more tokens go to BLAS a tile at a time)."""
        return not (x.ndim == 2 and x.shape[0] > PREFILL_TOKENS)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        if not self.kernel_takes(x):
            return self._matmul_by_tiles(np.asarray(x, dtype=np.float32))
        return self.product(x, n_threads=kernels.threads())

    @cached_property
    def product(self) -> kernels.BlockProduct:
        return kernels.BlockProduct(self.fmt, self.blocks)

    def _matmul_by_tiles(self, x: np.ndarray) -> np.ndarray:
        rows, cols = self.shape
        out = np.empty((x.shape[0], rows), dtype=np.float32)
        tile_rows = max(1, TILE_VALUES // cols)
        buffer = _tile_buffer(tile_rows * cols)
        for start in range(0, rows, tile_rows):
            stop = min(rows, start + tile_rows)
            tile = kernels.dequantize_gguf(self.fmt, self.blocks[start:stop],
                                           buffer[:(stop - start) * cols].reshape(stop - start, cols))
            out[:, start:stop] = x @ tile.T
        return out

    def dequantize(self) -> np.ndarray:
        rows = self.blocks.shape[0]
        return decode_blocks(self.fmt, self.blocks.reshape(-1, BLOCK_BYTES[self.fmt])).reshape(rows, self.cols)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Only the rows looked up are expanded (an embedding of a whole vocabulary stays blocks)."""
        picked = self.blocks[np.asarray(ids)]
        return decode_blocks(self.fmt, picked.reshape(-1, BLOCK_BYTES[self.fmt])).reshape(len(picked), self.cols)

    def _rows_view(self, start: int, stop: int) -> "GgufBlockMatrix":
        return type(self)(self.blocks[start:stop], self.cols)

    def _cols_view(self, start: int, stop: int) -> "GgufBlockMatrix":
        # whole blocks of each row; contiguous once here, since the kernel reads rows back to back
        width = BLOCK_BYTES[self.fmt]
        return type(self)(np.ascontiguousarray(self.blocks[:, start // QK * width:stop // QK * width]), stop - start)

    @classmethod
    def params_problem(cls, shape, params) -> str | None:
        if params:
            return f"unexpected parameters {sorted(params)}"
        if len(shape) != 2 or shape[1] % QK:
            return f"its rows of {shape[-1]} values are not whole blocks of {QK}"
        return None

    @classmethod
    def layout(cls, shape, params) -> list[Part]:
        return [Part("", np.dtype("u1"), (shape[0], shape[1] // QK * BLOCK_BYTES[cls.fmt]))]

    def parts(self) -> list[np.ndarray]:
        return [self.blocks]

    @classmethod
    def from_parts(cls, shape, params, arrays) -> "GgufBlockMatrix":
        (blocks,) = arrays
        return cls(blocks, shape[1])

    @classmethod
    def from_float(cls, weights, params) -> "GgufBlockMatrix":
        weights = np.asarray(weights, dtype=np.float32)
        rows, cols = weights.shape
        if cols % QK:
            raise ValueError(f"{cls.type_tag}: {cols} columns are not whole blocks of {QK}")
        return cls(encode_blocks(cls.fmt, weights.reshape(-1, QK)).reshape(rows, -1), cols)

    @classmethod
    def stacked(cls, matrices) -> "GgufBlockMatrix | QuantizedRowStack | None":
        view = stacked_view([m.blocks for m in matrices])
        return cls(view, matrices[0].cols) if view is not None else QuantizedRowStack.over(matrices)


@register_matrix_type
@dataclass
class Q8_0Matrix(GgufBlockMatrix):
    """GGUF Q8_0: per block fp16 d and 32 int8 q, w = d * q (34 bytes per 32 values)."""

    type_tag: ClassVar[str] = "q8_0"
    fmt: ClassVar[str] = "q8_0"


@register_matrix_type
@dataclass
class Q4_0Matrix(GgufBlockMatrix):
    """GGUF Q4_0: per block fp16 d and 32 nibbles, w = d * (q - 8) (18 bytes per 32 values)."""

    type_tag: ClassVar[str] = "q4_0"
    fmt: ClassVar[str] = "q4_0"


@register_matrix_type
@dataclass
class Q4_1Matrix(GgufBlockMatrix):
    """GGUF Q4_1: per block fp16 d, fp16 m and 32 nibbles, w = d * q + m (20 bytes per 32 values)."""

    type_tag: ClassVar[str] = "q4_1"
    fmt: ClassVar[str] = "q4_1"


BY_GGML_TYPE = {"Q8_0": Q8_0Matrix, "Q4_0": Q4_0Matrix, "Q4_1": Q4_1Matrix}  # GGUF's type names
