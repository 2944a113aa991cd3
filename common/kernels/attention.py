"""One layer's causal attention for every token of a step, in C (csrc/attend.c): the float32 op
set's (common/model/numerics.py) where the AVX2 kernels run. Imported by the package's __init__
after the helpers it uses are defined."""

import numpy as np

from . import _f32, _native, backend_info, has_f32_kernel, threads


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, keys: np.ndarray, values: np.ndarray, kv_of_head,
           token_slots, token_positions, n_threads: int | None = None) -> np.ndarray:
    """One layer's causal attention for every token of a step (csrc/attend.c), AVX2 only
    (has_f32_kernel()).

    q (T, H, D) with RoPE applied; k, v (T, n_kv, D) the step's keys and values, written first
    into keys, values (n_slots, n_kv, S, D), the layer's cache (writable, C-contiguous), at
    [token_slots[t], :, token_positions[t]]; then query head h of token t attends to positions
    0..token_positions[t] of kv head kv_of_head[h] in its slot. Returns (T, H, D). Each query
    is computed the same way whatever else the step holds."""
    if not has_f32_kernel():
        raise ValueError(f"attention in C needs the avx2 backend ({backend_info()})")
    if q.ndim != 3 or k.ndim != 3 or keys.ndim != 4 or keys.shape[3] != q.shape[2] \
            or k.shape != (q.shape[0], keys.shape[1], q.shape[2]):
        raise ValueError(f"q {q.shape}, k {k.shape} and keys {keys.shape} must be (T, H, D), (T, n_kv, D) "
                         f"and (n_slots, n_kv, S, D)")
    q, k, v = _f32("q", q), _f32("k", k), _f32("v", v, k.shape)
    for name, cache in (("keys", keys), ("values", values)):
        if not isinstance(cache, np.ndarray) or cache.dtype != np.float32 or cache.shape != keys.shape \
                or not cache.flags.c_contiguous or not cache.flags.writeable:
            raise ValueError(f"{name} must be a writable C-contiguous float32 {keys.shape} array")
    n_slots, n_kv, seq_len, head_dim = keys.shape
    tokens, n_heads = q.shape[:2]
    kv_of_head = np.ascontiguousarray(kv_of_head, dtype=np.int32).reshape(-1)
    if kv_of_head.size != n_heads:
        raise ValueError(f"kv_of_head must be {n_heads} values")
    token_slots = np.ascontiguousarray(token_slots, dtype=np.int32).reshape(-1)
    token_positions = np.ascontiguousarray(token_positions, dtype=np.int32).reshape(-1)
    if token_slots.size != tokens or token_positions.size != tokens:
        raise ValueError(f"token_slots and token_positions must be {tokens} values each")
    out = np.empty_like(q)
    _native.attend(out, q, k, v, keys, values, kv_of_head, token_slots, token_positions, tokens, n_heads, n_kv,
                   n_slots, seq_len, head_dim, threads() if n_threads is None else n_threads)
    return out



def attend_qkv(qkv: np.ndarray, n_heads: int, rotations: np.ndarray, keys: np.ndarray, values: np.ndarray,
               kv_of_head: np.ndarray, token_slots: np.ndarray, token_positions: np.ndarray,
               n_threads: int | None = None) -> np.ndarray:
    """attend() on one product's output: qkv (T, (n_heads + 2 n_kv) D), each row q's heads, then
    k's, then v's, writable and C-contiguous. RoPE first, in place on q and k: pair i of a head
    at position p times rotations[p, i] (complex64 cos + i sin, (seq_len, D / 2)) with numpy's
    complex64 product's roundings (fma(a, cos, -(b sin)), fma(a, sin, b cos)). Returns
    (T, n_heads, D)."""
    if not has_f32_kernel():
        raise ValueError(f"attention in C needs the avx2 backend ({backend_info()})")
    if not isinstance(qkv, np.ndarray) or qkv.dtype != np.float32 or qkv.ndim != 2 or not qkv.flags.c_contiguous \
            or not qkv.flags.writeable:
        raise ValueError("qkv must be a writable C-contiguous float32 (T, width) array")
    if keys.ndim != 4 or not isinstance(values, np.ndarray) or values.shape != keys.shape:
        raise ValueError(f"keys {keys.shape} and values must be (n_slots, n_kv, S, D)")
    n_slots, n_kv, seq_len, head_dim = keys.shape
    tokens = qkv.shape[0]
    if qkv.shape[1] != (n_heads + 2 * n_kv) * head_dim:
        raise ValueError(f"qkv rows hold {qkv.shape[1]} values, expected ({n_heads} + 2 * {n_kv}) * {head_dim}")
    for name, cache in (("keys", keys), ("values", values)):
        if cache.dtype != np.float32 or not cache.flags.c_contiguous or not cache.flags.writeable:
            raise ValueError(f"{name} must be a writable C-contiguous float32 {keys.shape} array")
    if rotations.dtype != np.complex64 or rotations.shape != (seq_len, head_dim // 2):
        raise ValueError(f"rotations must be complex64 ({seq_len}, {head_dim // 2}), got {rotations.dtype} "
                         f"{rotations.shape}")
    out = np.empty((tokens, n_heads, head_dim), dtype=np.float32)
    _native.attend_qkv(out, qkv, np.ascontiguousarray(rotations), keys, values,
                       np.ascontiguousarray(kv_of_head, dtype=np.int32), np.ascontiguousarray(token_slots, dtype=np.int32),
                       np.ascontiguousarray(token_positions, dtype=np.int32), tokens, n_heads, n_kv, n_slots, seq_len,
                       head_dim, threads() if n_threads is None else n_threads)
    return out
