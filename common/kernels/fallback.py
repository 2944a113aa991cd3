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


def llama2c_terms(values: np.ndarray, scales: np.ndarray, group_size: int, x: np.ndarray):
    """runq.c's per-group terms (float)ival * ws * xs, chunk by chunk of rows: yields (first row,
    (T, chunk rows, groups) float32), each term rounded as runq.c rounds it."""
    rows, cols = values.shape
    groups = cols // group_size
    xq, xs = quantize_blocks(x, group_size, runq_rule=True)
    xq = xq.reshape(-1, groups, group_size).astype(np.int32)
    wscales = scales.reshape(rows, groups)
    for start in range(0, rows, ROWS_PER_CHUNK):
        chunk = values[start:start + ROWS_PER_CHUNK].reshape(-1, groups, group_size).astype(np.int32)
        ival = np.einsum("rgk,tgk->trg", chunk, xq).astype(np.float32)  # int32 -> float32 rounds as C's cast does
        yield start, (ival * wscales[start:start + ROWS_PER_CHUNK][None]) * xs[:, None, :]


def matmul_llama2c(values: np.ndarray, scales: np.ndarray, group_size: int, x: np.ndarray,
                   out: np.ndarray) -> np.ndarray:
    """runq.c's matmul: int32 per group, then val += (float)ival * ws * xs group by group."""
    for start, terms in llama2c_terms(values, scales, group_size, x):
        val = np.zeros(terms.shape[:2], dtype=np.float32)
        for g in range(terms.shape[2]):
            val = val + terms[:, :, g]
        out[:, start:start + terms.shape[1]] = val
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


# ---- runq.c's element-wise steps (csrc/runq_ops.c) in numpy ----
# float32 sums left to right are cumsum's (np.sum is pairwise); expf, cosf, sinf and powf are
# computed in float64 and rounded once to float32. That is glibc's result at almost every
# argument but not all: glibc's expf differs by one ulp at about 1 argument in 1500, cosf/sinf/
# powf in RoPE at ~1% of values (tests/test_runq_ops.py). So under this backend the engine gives
# runq.c's bits only where no such argument occurs (the recorded fixtures all match); the C ops,
# which call glibc, always do. Sums, norms and the product's terms are bit for bit the C ones.

F32 = np.float32


def _rounded(function, x: np.ndarray) -> np.ndarray:
    return function(np.asarray(x, dtype=np.float64)).astype(F32)


def _sequential_sum(values: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.take(np.cumsum(values, axis=axis, dtype=F32), -1, axis=axis)


def runq_rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray) -> np.ndarray:
    ss = _sequential_sum(x * x) / F32(x.shape[-1]) + F32(eps)
    ss = F32(1.0) / np.sqrt(ss)
    np.multiply(weight, ss[:, None] * x, out=out)
    return out


def runq_rope(vec: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    head_size = vec.shape[-1]
    exponent = np.arange(0, head_size, 2).astype(F32) / F32(head_size)
    freq = F32(1.0) / _rounded(lambda e: np.power(np.float64(F32(theta)), e), exponent)
    val = positions.astype(F32)[:, None] * freq[None, :]  # (T, D/2)
    fcr, fci = _rounded(np.cos, val)[:, None, :], _rounded(np.sin, val)[:, None, :]
    v0, v1 = vec[..., 0::2].copy(), vec[..., 1::2].copy()
    vec[..., 0::2] = v0 * fcr - v1 * fci
    vec[..., 1::2] = v0 * fci + v1 * fcr
    return vec


def runq_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, kv_of_head: np.ndarray,
                   positions: np.ndarray, out: np.ndarray) -> np.ndarray:
    head_size = q.shape[-1]
    for t, position in enumerate(positions):
        for h, kv in enumerate(kv_of_head):
            seen_keys, seen_values = keys[kv, :position + 1], values[kv, :position + 1]
            att = _sequential_sum(q[t, h][None, :] * seen_keys) / np.sqrt(F32(head_size))
            att = _rounded(np.exp, att - att.max())
            att = att / _sequential_sum(att)
            out[t, h] = _sequential_sum(att[:, None] * seen_values, axis=0)
    return out


def runq_swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    gate[...] = gate * (F32(1.0) / (F32(1.0) + _rounded(np.exp, -gate))) * up
    return gate


def runq_group_terms(values: np.ndarray, scales: np.ndarray, group_size: int, x: np.ndarray, first_group: int,
                     terms: np.ndarray) -> np.ndarray:
    groups = values.shape[1] // group_size
    for start, chunk_terms in llama2c_terms(values, scales, group_size, x):
        terms[:, start:start + chunk_terms.shape[1], first_group:first_group + groups] = chunk_terms
    return terms


def runq_ordered_sum(terms: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    if start is None:
        return _sequential_sum(terms)
    return _sequential_sum(np.concatenate([start[..., None], terms], axis=-1))
