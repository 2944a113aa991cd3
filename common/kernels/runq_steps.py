"""runq.c's element-wise steps (csrc/runq_ops.c; fallback.py's runq_* under "numpy"): the llama2.c
v2 op set of common/model/numerics.py, each giving runq.c's float32 bits, and the per-group terms
of its product with their ordered sum. Imported by the package's __init__ after the helpers it
uses are defined."""

import numpy as np

from . import _ISA, _activations, _f32, _float_out, _native, backend, fallback, threads


def _positions(positions, tokens: int, limit: int) -> np.ndarray:
    positions = np.ascontiguousarray(positions, dtype=np.int32).reshape(-1)
    if positions.size != tokens or (tokens and (positions.min() < 0 or positions.max() >= limit)):
        raise ValueError(f"positions must be {tokens} values in 0..{limit - 1}")
    return positions


def runq_rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray | None = None) -> np.ndarray:
    """x (T, dim) -> weight * (ss * x), ss = 1 / sqrtf(sum x^2 (left to right) / dim + eps), as runq.c."""
    if x.ndim != 2:
        raise ValueError(f"x has shape {x.shape}, expected (T, dim)")
    x, weight = _f32("x", x), _f32("weight", weight, (x.shape[1],))
    out = _float_out(out, *x.shape)
    if backend() == "numpy":
        return fallback.runq_rmsnorm(x, weight, eps, out)
    _native.runq_rmsnorm(x, weight, out, x.shape[0], x.shape[1], eps)
    return out


def runq_rope(vec: np.ndarray, positions, theta: float) -> np.ndarray:
    """vec (T, H, D) float32 C-contiguous, rotated in place and returned: pair (j, j + 1) of every
    head by cosf/sinf(pos * (1 / powf(theta, j / (float)D))), runq.c's angle computed per position."""
    if not isinstance(vec, np.ndarray) or vec.dtype != np.float32 or vec.ndim != 3 or vec.shape[2] % 2 \
            or not vec.flags.c_contiguous or not vec.flags.writeable:
        raise ValueError("vec must be a writable C-contiguous float32 (T, H, D) array, D even")
    positions = _positions(positions, vec.shape[0], 2 ** 31 - 1)
    if backend() == "numpy":
        return fallback.runq_rope(vec, positions, theta)
    _native.runq_rope(vec, positions, *vec.shape, theta)
    return vec


def runq_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, kv_of_head, positions,
                   n_threads: int | None = None) -> np.ndarray:
    """q (T, H, D); keys, values (n_kv, S, D) one slot's cache; kv_of_head (H,) the kv head each
    query head reads; query t sees positions 0..positions[t]. Returns (T, H, D): runq.c's scores
    (sequential dot / sqrtf(D)), softmax (max, expf, sequential sum) and sequential weighted sum.
    Heads split over n_threads (default threads()), as runq.c splits them: the same bits."""
    if q.ndim != 3 or keys.ndim != 3 or keys.shape[2] != q.shape[2]:
        raise ValueError(f"q {q.shape} and keys {keys.shape} must be (T, H, D) and (n_kv, S, D)")
    q, keys, values = _f32("q", q), _f32("keys", keys), _f32("values", values, keys.shape)
    kv_of_head = np.ascontiguousarray(kv_of_head, dtype=np.int32).reshape(-1)
    if kv_of_head.size != q.shape[1] or kv_of_head.min() < 0 or kv_of_head.max() >= keys.shape[0]:
        raise ValueError(f"kv_of_head must be {q.shape[1]} values in 0..{keys.shape[0] - 1}")
    positions = _positions(positions, q.shape[0], keys.shape[1])
    out = np.empty_like(q)
    if backend() == "numpy":
        return fallback.runq_attention(q, keys, values, kv_of_head, positions, out)
    _native.runq_attention(out, q, keys, values, kv_of_head, positions, *q.shape, keys.shape[0], keys.shape[1],
                           threads() if n_threads is None else n_threads)
    return out


def runq_swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """gate (T, N) float32, C-contiguous, in place: gate * (1 / (1 + expf(-gate))) * up, as runq.c."""
    if not isinstance(gate, np.ndarray) or gate.dtype != np.float32 or not gate.flags.c_contiguous \
            or not gate.flags.writeable:
        raise ValueError("gate must be a writable C-contiguous float32 array")
    up = _f32("up", up, gate.shape)
    if backend() == "numpy":
        return fallback.runq_swiglu(gate, up)
    _native.runq_swiglu(gate, up, gate.size)
    return gate


def runq_group_terms(values: np.ndarray, scales: np.ndarray, group_size: int, x: np.ndarray, first_group: int,
                     total_groups: int) -> np.ndarray:
    """The terms runq.c's matmul adds, kept apart: (T, rows, total_groups) float32, zero outside
    first_group .. first_group + cols / group_size, where this product's group g is
    (float)ival * w_scale * x_scale (x quantized per group as matmul_llama2c_q8 does).
    runq_ordered_sum of the terms is matmul_llama2c_q8's product, bit for bit. Rows split over threads()."""
    if values.dtype != np.int8 or values.ndim != 2:
        raise ValueError(f"values must be int8 (rows, cols), got {values.dtype} {values.shape}")
    rows, cols = values.shape
    if group_size < 1 or cols % group_size:
        raise ValueError(f"group_size {group_size} does not divide cols {cols}")
    if first_group < 0 or first_group + cols // group_size > total_groups:
        raise ValueError(f"groups {first_group}..{first_group + cols // group_size} outside 0..{total_groups}")
    scales = np.ascontiguousarray(scales, dtype=np.float32).reshape(-1)
    if scales.size != rows * cols // group_size:
        raise ValueError(f"scales hold {scales.size} values, expected {rows * cols // group_size}")
    x = _activations(x, cols)
    terms = np.zeros((x.shape[0], rows, total_groups), dtype=np.float32)
    values = np.ascontiguousarray(values)
    if backend() == "numpy":
        return fallback.runq_group_terms(values, scales, group_size, x, first_group, terms)
    _native.runq_group_terms(terms, values, scales, x, rows, cols, x.shape[0], group_size, first_group, total_groups,
                             _ISA[backend()], threads())
    return terms


def runq_ordered_sum(terms: np.ndarray, start: np.ndarray | None = None) -> np.ndarray:
    """(..., G) float32 -> (...): ((s + t_0) + t_1) + ... in float32, runq.c's order over groups,
    where s is 0 or `start` (...): the sum of the groups before these, carried on."""
    terms = _f32("terms", terms)
    if terms.ndim < 1 or terms.shape[-1] < 1:
        raise ValueError(f"terms has shape {terms.shape}, expected (..., G) with G >= 1")
    if start is not None and (start.dtype != np.float32 or start.shape != terms.shape[:-1]):
        raise ValueError(f"start must be float32 of shape {terms.shape[:-1]}, got {start.dtype} {start.shape}")
    if backend() == "numpy":
        return fallback.runq_ordered_sum(terms, start)
    out = np.empty(terms.shape[:-1], dtype=np.float32) if start is None else np.array(start, order="C")
    _native.runq_ordered_sum(out, terms, out.size, terms.shape[-1], start is not None)
    return out
