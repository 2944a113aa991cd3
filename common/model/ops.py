"""The transformer's kernels as small pure numpy functions (float32 throughout).

Each mirrors the function of the same job in llama2.c's run.c; shapes in comments
use T for tokens in the step, H for heads, D for head_dim.
"""

import numpy as np


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray | None = None) -> np.ndarray:
    """x: (T, dim) -> weight * x / sqrt(mean(x^2) + eps), row by row, into `out` if given.

    The same numbers as np.mean's (the same pairwise float32 sum, then one float32 division
    by dim) in plain ufunc calls: np.mean's Python layers cost more than its arithmetic at
    decode's one row (3 ms of a 60 ms 110M step)."""
    square = np.multiply(x, x, out=out)
    mean_square = np.add.reduce(square, axis=-1, keepdims=True)
    mean_square /= np.float32(x.shape[-1])
    mean_square += np.float32(eps)
    np.sqrt(mean_square, out=mean_square)
    inverse_rms = np.divide(np.float32(1.0), mean_square, out=mean_square)
    normed = np.multiply(x, inverse_rms, out=square)
    normed *= weight
    return normed


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of position * theta^(-2i/head_dim), each (seq_len, head_dim // 2).

    Frequencies and angles are float32 as in run.c; only cos/sin go through float64
    so they round once, like cosf/sinf.
    """
    pair = np.arange(0, head_dim, 2, dtype=np.float32)
    freq = (np.float32(1.0) / np.power(np.float32(theta), pair / np.float32(head_dim))).astype(np.float32)
    angle = np.arange(seq_len, dtype=np.float32)[:, None] * freq[None, :]
    angle64 = angle.astype(np.float64)
    return np.cos(angle64).astype(np.float32), np.sin(angle64).astype(np.float32)


def rope_rotations(seq_len: int, head_dim: int, theta: float) -> np.ndarray:
    """cos + i sin of rope_tables as complex64, (seq_len, head_dim // 2)."""
    cos, sin = rope_tables(seq_len, head_dim, theta)
    return (cos + 1j * sin).astype(np.complex64)


def apply_rope(x: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """x: (T, H, D) float32; rotations: (T, D/2) complex64. Rotates pairs (2i, 2i+1) of every
    head: read as one complex number a + ib, a pair times cos + i sin is exactly run.c's
    (a cos - b sin, a sin + b cos), in one vectorised product."""
    return (x.view(np.complex64) * rotations[:, None, :]).view(np.float32)


def softmax(x: np.ndarray, axis: int = -1, out: np.ndarray | None = None) -> np.ndarray:
    """exp(x - max) / sum, as run.c; out=x works in place (prefill's scores are large)."""
    out = np.subtract(x, np.maximum.reduce(x, axis=axis, keepdims=True), out=out)  # np.max's, without its wrapper
    np.exp(out, out=out)
    out /= np.add.reduce(out, axis=axis, keepdims=True)
    return out


def silu(x: np.ndarray) -> np.ndarray:
    """x * (1 / (1 + exp(-x))), as run.c rounds it, in one temporary (prefill's are large)."""
    out = np.negative(x)
    np.exp(out, out=out)
    out += np.float32(1.0)
    np.reciprocal(out, out=out)
    out *= x
    return out


def attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, first_position: int) -> np.ndarray:
    """Causal attention of T new queries against every cached position of one sequence.

    q: (..., H, T, D), the H query heads that share one kv head; keys, values: (..., P, D)
    with P = first_position + T (leading dims broadcast, e.g. one per kv head). Query t
    sits at position first_position + t and sees keys 0..first_position + t.
    Returns (..., H, T, D).
    """
    head_dim = q.shape[-1]
    n_new, n_seen = q.shape[-2], keys.shape[-2]
    keys, values = keys[..., None, :, :], values[..., None, :, :]  # broadcast over the H query heads
    scores = q @ keys.swapaxes(-1, -2)  # (..., H, T, P)
    scores *= np.float32(1.0 / np.sqrt(head_dim))
    if n_new > 1:  # query t must not see positions after first_position + t
        scores += np.triu(np.full((n_new, n_seen), -np.inf, dtype=np.float32), k=first_position + 1)
    return softmax(scores, out=scores) @ values
