"""The float32 op set's element-wise steps in C (csrc/numpy_ops.c) with the bits numpy gives them
(common/model/ops.py), for the many small calls of a decode step: ops.rmsnorm is nine numpy calls,
~9 us at one row of 768 against ~1 us here. Imported by the package's __init__ after the helpers
it uses are defined."""

import numpy as np

from . import _f32, _float_out, _native, backend


def has_numpy_steps() -> bool:
    """Whether these run in C here (the extension loaded and a C backend chosen)."""
    return backend() != "numpy"


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray | None = None) -> np.ndarray:
    """x (T, dim) -> (x * (1 / sqrt(mean(x^2) + eps))) * weight, ops.rmsnorm's float32 bits (numpy's
    pairwise sum of the squares); out may be x."""
    if x.ndim != 2:
        raise ValueError(f"x has shape {x.shape}, expected (T, dim)")
    x, weight = _f32("x", x), _f32("weight", weight, (x.shape[1],))
    out = _float_out(out, *x.shape)
    if not has_numpy_steps():
        raise ValueError("rmsnorm in C needs the C extension and a C backend")
    _native.numpy_rmsnorm(x, weight, out, x.shape[0], x.shape[1], eps)
    return out
