"""The same products in numpy: used when the C extension did not build or load, and as a
third implementation in the tests. Same activation quantization and the same rounding of
every per-block float step as csrc/dot.c's portable path (int32 sums are exact in any order);
only the float sum over blocks of the GGUF formats runs in a different order.

Weights are never expanded to float32: each chunk of rows is widened to int32 for the integer
dot products, one chunk at a time."""

import numpy as np

from .layout import BLOCK_BYTES, QK

ROWS_PER_CHUNK = 256


def quantize_blocks(x: np.ndarray, group: int, runq_rule: bool) -> tuple[np.ndarray, np.ndarray]:
    """x (T, cols) float32 -> (q int8 (T, cols), scales float32 (T, cols // group)).

    scale = max|x| / 127 per group; q = round-half-away(x / scale) (runq.c) or
    round(x * (1 / scale)) (llama.cpp); an all-zero group gives q = 0."""
    tokens, cols = x.shape
    groups = x.reshape(tokens, cols // group, group)
    scales = (np.abs(groups).max(axis=2) / np.float32(127.0)).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1.0))
    if runq_rule:
        ratio = groups / safe[:, :, None]
    else:
        inverse = np.where(scales > 0, np.float32(1.0) / safe, np.float32(0.0)).astype(np.float32)
        ratio = groups * inverse[:, :, None]
    ratio64 = ratio.astype(np.float64)  # float32 + 0.5 is exact in float64: roundf's halves away from zero
    rounded = np.copysign(np.floor(np.abs(ratio64) + 0.5), ratio64)
    q = np.where(scales[:, :, None] > 0, rounded, 0).astype(np.int8)
    return q.reshape(tokens, cols), scales


def _half(blocks: np.ndarray, offset: int) -> np.ndarray:
    """(rows, nb, block_bytes) uint8 -> the fp16 at byte `offset` of every block, as float32."""
    return blocks[:, :, offset:offset + 2].copy().view(np.float16)[:, :, 0].astype(np.float32)


def _block_values(blocks: np.ndarray, fmt: str) -> np.ndarray:
    """(rows, nb, block_bytes) -> (rows, nb, 32) int32 block integers (before scale and offset)."""
    if fmt == "q8_0":
        return blocks[:, :, 2:].view(np.int8).astype(np.int32)
    nibbles = blocks[:, :, 2 if fmt == "q4_0" else 4:].astype(np.int32)
    values = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=2)  # byte k: values k and k + 16
    return values - 8 if fmt == "q4_0" else values


def matmul_gguf(fmt: str, blocks: np.ndarray, x: np.ndarray, out: np.ndarray) -> np.ndarray:
    rows, cols = out.shape[1], x.shape[1]
    nb = cols // QK
    xq, xs = quantize_blocks(x, QK, runq_rule=False)
    xq = xq.reshape(-1, nb, QK).astype(np.int32)  # (T, nb, 32)
    xsum = xs * xq.sum(axis=2).astype(np.float32)  # (T, nb): scale * sum(q), for Q4_1's offsets
    for start in range(0, rows, ROWS_PER_CHUNK):
        chunk = blocks[start:start + ROWS_PER_CHUNK].reshape(-1, nb, BLOCK_BYTES[fmt])
        isum = np.einsum("rbk,tbk->trb", _block_values(chunk, fmt), xq).astype(np.float32)
        terms = _half(chunk, 0)[None] * xs[:, None, :] * isum  # (T, r, nb), rounded as dot.c rounds
        if fmt == "q4_1":
            terms = terms + _half(chunk, 2)[None] * xsum[:, None, :]
        out[:, start:start + len(chunk)] = terms.sum(axis=2, dtype=np.float32)
    return out


def matmul_llama2c(values: np.ndarray, scales: np.ndarray, group_size: int, x: np.ndarray,
                   out: np.ndarray) -> np.ndarray:
    """runq.c's matmul: int32 per group, then val += (float)ival * ws * xs group by group."""
    rows, cols = values.shape
    groups = cols // group_size
    xq, xs = quantize_blocks(x, group_size, runq_rule=True)
    xq = xq.reshape(-1, groups, group_size).astype(np.int32)
    wscales = scales.reshape(rows, groups)
    for start in range(0, rows, ROWS_PER_CHUNK):
        chunk = values[start:start + ROWS_PER_CHUNK].reshape(-1, groups, group_size).astype(np.int32)
        ival = np.einsum("rgk,tgk->trg", chunk, xq).astype(np.float32)  # int32 -> float32 rounds as C's cast does
        ws = wscales[start:start + ROWS_PER_CHUNK]
        val = np.zeros((x.shape[0], len(chunk)), dtype=np.float32)
        for g in range(groups):
            val = val + (ival[:, :, g] * ws[None, :, g]) * xs[:, g:g + 1]
        out[:, start:start + len(chunk)] = val
    return out


def dequantize_gguf(fmt: str, blocks: np.ndarray, out: np.ndarray) -> np.ndarray:
    """(rows, row bytes) blocks -> out (rows, cols) float32: d * q (Q8_0), d * (q - 8) (Q4_0), d * q + m (Q4_1)."""
    rows, cols = out.shape
    chunk = blocks.reshape(rows, cols // QK, BLOCK_BYTES[fmt])
    values = _half(chunk, 0)[:, :, None] * _block_values(chunk, fmt).astype(np.float32)
    if fmt == "q4_1":
        values = values + _half(chunk, 2)[:, :, None]
    out[...] = values.reshape(rows, cols)
    return out


def dequantize_llama2c(values: np.ndarray, scales: np.ndarray, group_size: int, out: np.ndarray) -> np.ndarray:
    rows, cols = values.shape
    grouped = values.reshape(rows, cols // group_size, group_size).astype(np.float32)
    out[...] = (grouped * scales.reshape(rows, -1, 1)).reshape(rows, cols)
    return out
