"""Matrix products that read quantized weight blocks directly: y = x @ W.T, W (rows, cols).

Activations x (T, cols) float32 are quantized once per product to int8 blocks (scale
max|x| / 127 per block); each weight block meets its activation block in an int32 dot
product, then one float multiply-add (avx2/vnni Q8_0, Q4_0: one for 8 blocks). No float32 W.

Backends, chosen once at import: "vnni" (the avx2 backend whose Q8_0 and 4-bit rows add each 4
byte products with one AVX-512 VNNI instruction, same bits as avx2; where the CPU and OS have
AVX-512 VL, BW and VNNI), "avx2" (C, AVX2+FMA+F16C, when the CPU has them),
"portable" (C, plain loops), "numpy" (fallback.py, when the C extension did not build or
load; said once on stderr). LLMTP_KERNELS=portable or =numpy forces a slower one;
use_backend() switches at run time (tests). n_threads: default 1; n > 1 splits rows over n
threads of a pool started once (csrc/pool.c: idle threads spin ~1 ms, then sleep). The
Matrix types pass threads(): at first default_threads(), the count BLAS is given in this
process (a worker gets its share through OPENBLAS_NUM_THREADS, see local_cluster.py), then
whatever common/model/blas_threads.py chooses for BLAS and these kernels alike (THREADS).

matmul_f32 is the float32 product of decode: at most F32_MAX_TOKENS tokens, each weight row
streamed once for all of them (OpenBLAS's sgemm packs the matrix and streams a few tokens
at a quarter of sgemv's speed), each output summed the same way whatever the token count, so
a sequence gets the same bits alone and batched. AVX2 only (has_f32_kernel()); elsewhere
the Matrix type uses BLAS. attend (attention.py) is the float32 op set's attention, AVX2 only.

Also runq.c's element-wise steps (runq_rmsnorm, runq_rope, runq_attention, runq_swiglu, and the
per-group terms of its product with their ordered sum): common/model/numerics.py's llama2.c v2 op set.
"""

import os
import sys
from typing import Sequence

import numpy as np

from . import fallback
from .layout import BLOCK_BYTES, FORMAT_CODES, QK, row_bytes

try:
    from . import _native
except ImportError as error:  # no compiler at install time, or a broken build
    _native = None
    _NATIVE_PROBLEM = f"C extension not loaded ({error})"
else:
    _NATIVE_PROBLEM = None

BACKENDS = ("vnni", "avx2", "portable", "numpy")
_ISA = {"portable": 0, "avx2": 1, "vnni": 2}


def available_backends() -> list[str]:
    """The backends this process can run, fastest first."""
    if _native is None:
        return ["numpy"]
    return ((["vnni"] if _native.cpu_has_vnni() else []) + (["avx2"] if _native.cpu_has_avx2() else [])
            + ["portable", "numpy"])


def _initial_backend() -> str:
    forced = os.environ.get("LLMTP_KERNELS", "").strip().lower()
    available = available_backends()
    if forced:
        if forced not in BACKENDS:
            sys.stderr.write(f"llmtp: LLMTP_KERNELS={forced!r} is not one of {', '.join(BACKENDS)}; ignored\n")
        elif forced in available:
            return forced
        else:
            sys.stderr.write(f"llmtp: LLMTP_KERNELS={forced} is not available here; using {available[0]}\n")
    if _NATIVE_PROBLEM:
        sys.stderr.write(f"llmtp: quantized kernels run in numpy (slow): {_NATIVE_PROBLEM}\n")
    return available[0]


_backend = _initial_backend()


def backend() -> str:
    """The backend products run on now."""
    return _backend


def backend_info() -> str:
    """One line for `llmtp inspect`-style reports."""
    note = f"; {_NATIVE_PROBLEM}" if _NATIVE_PROBLEM else ""
    return f"quantized kernels: {_backend} (available: {', '.join(available_backends())}){note}"


def use_backend(name: str) -> str:
    """Switch backend; returns the previous one. ValueError when `name` cannot run here."""
    global _backend
    if name not in available_backends():
        raise ValueError(f"kernel backend {name!r} not available here (available: {', '.join(available_backends())})")
    previous, _backend = _backend, name
    return previous


_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
_threads: int | None = None


def default_threads() -> int:
    """Threads per product: the BLAS thread count of this process's environment, else its
    usable cores (what OpenBLAS itself would start). Read once."""
    global _threads
    if _threads is None:
        for name in _THREAD_VARIABLES:
            value = os.environ.get(name, "").strip()
            if value.isdigit() and int(value) > 0:
                _threads = int(value)
                break
        else:
            _threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return _threads


class KernelThreads:
    """The kernels' thread count, in the shape of a threadpoolctl controller (num_threads,
    set_num_threads), so the code that chooses BLAS's count sets this one too."""

    user_api = "llmtp-kernels"

    def __init__(self):
        self._count: int | None = None

    @property
    def num_threads(self) -> int:
        return default_threads() if self._count is None else self._count

    def set_num_threads(self, count: int) -> None:
        if count < 1:
            raise ValueError(f"thread count {count} is below 1")
        self._count = count


THREADS = KernelThreads()


def threads() -> int:
    """Threads a product runs on now."""
    return THREADS.num_threads


F32_MAX_TOKENS = 8  # csrc/f32.h
F32_MAX_STACK = 8  # csrc/module.c: matrices one matmul_f32 call stacks by rows
QUANTIZED_MAX_STACK = 8  # csrc/module.c: quantized matrices one matmul_stack call stacks by rows


def has_f32_kernel() -> bool:
    """Whether matmul_f32 runs here (the C extension with AVX2+FMA, and the avx2 or vnni backend chosen)."""
    return _backend in ("vnni", "avx2")


def matmul_f32(weights: np.ndarray | Sequence[np.ndarray], x: np.ndarray, out: np.ndarray | None = None,
               n_threads: int | None = None) -> np.ndarray:
    """float32 weights (rows, cols), C-contiguous, or several of them stacked by rows (a layer's
    q, k and v: their outputs side by side, one call); x (T, cols), T <= F32_MAX_TOKENS -> (T, rows).
    A matrix multiplied at every step keeps an F32Product instead (checked once)."""
    return F32Product(weights)(x, out, n_threads)


def _activations(x: np.ndarray, cols: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != cols:
        raise ValueError(f"x has shape {x.shape}, expected (T, {cols})")
    return x


def _output(out: np.ndarray | None, tokens: int, rows: int) -> np.ndarray:
    if out is None:
        return np.empty((tokens, rows), dtype=np.float32)
    if out.dtype != np.float32 or out.shape != (tokens, rows) or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 of shape {(tokens, rows)}, got {out.dtype} {out.shape}")
    return out


def _matmul_gguf(fmt: str, blocks: np.ndarray, x: np.ndarray, out, n_threads: int) -> np.ndarray:
    return BlockProduct(fmt, blocks)(x, out, n_threads)


def matmul_gguf(fmt: str, blocks: np.ndarray, x: np.ndarray, out: np.ndarray | None = None,
                n_threads: int = 1) -> np.ndarray:
    """`fmt` one of "q8_0", "q4_0", "q4_1": the product of matmul_q8_0 / _q4_0 / _q4_1 (a matrix
    multiplied at every step keeps a BlockProduct instead)."""
    return _matmul_gguf(fmt, blocks, x, out, n_threads)


def matmul_q8_0(blocks: np.ndarray, x: np.ndarray, out: np.ndarray | None = None, n_threads: int = 1) -> np.ndarray:
    """GGUF Q8_0 blocks (rows, cols/32*34) uint8, x (T, cols) or (cols,) -> (T, rows) float32."""
    return _matmul_gguf("q8_0", blocks, x, out, n_threads)


def matmul_q4_0(blocks: np.ndarray, x: np.ndarray, out: np.ndarray | None = None, n_threads: int = 1) -> np.ndarray:
    """GGUF Q4_0 blocks (rows, cols/32*18) uint8, x (T, cols) or (cols,) -> (T, rows) float32."""
    return _matmul_gguf("q4_0", blocks, x, out, n_threads)


def matmul_q4_1(blocks: np.ndarray, x: np.ndarray, out: np.ndarray | None = None, n_threads: int = 1) -> np.ndarray:
    """GGUF Q4_1 blocks (rows, cols/32*20) uint8, x (T, cols) or (cols,) -> (T, rows) float32."""
    return _matmul_gguf("q4_1", blocks, x, out, n_threads)


def matmul_llama2c_q8(values: np.ndarray, scales: np.ndarray, group_size: int, x: np.ndarray,
                      out: np.ndarray | None = None, n_threads: int = 1) -> np.ndarray:
    """llama2.c v2 int8 values (rows, cols), float32 scales (rows * cols / group_size,) ->
    (T, rows) float32, computed as runq.c computes it: x quantized per group of group_size
    (scale max|x| / 127, x / scale rounded half away from zero), an int32 sum per group, then
    val += (float)ival * w_scale * x_scale in group order, rounded step by step in float32.
    Every backend gives the same bits. A matrix multiplied at every step keeps a GroupedQ8Product."""
    return GroupedQ8Product(values, scales, group_size)(x, out, n_threads)


def _f32(name: str, array: np.ndarray, shape: tuple | None = None) -> np.ndarray:
    if not isinstance(array, np.ndarray) or array.dtype != np.float32:
        raise ValueError(f"{name} must be a float32 array, got {getattr(array, 'dtype', type(array).__name__)}")
    if shape is not None and array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, expected {shape}")
    return np.ascontiguousarray(array)


def _float_out(out: np.ndarray | None, rows: int, cols: int) -> np.ndarray:
    if out is None:
        return np.empty((rows, cols), dtype=np.float32)
    if out.dtype != np.float32 or out.shape != (rows, cols) or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 of shape {(rows, cols)}, got {out.dtype} {out.shape}")
    return out


def dequantize_gguf(fmt: str, blocks: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """GGUF blocks (rows, n_blocks * block bytes) uint8 -> (rows, n_blocks * 32) float32, as gguf's
    dequantize computes them (d * q, d * (q - 8), d * q + m in float32). For prefill tiles and
    embedding rows: call it on the rows you need, never on a whole model."""
    if fmt not in BLOCK_BYTES or blocks.dtype != np.uint8 or blocks.ndim != 2 or blocks.shape[1] % BLOCK_BYTES[fmt]:
        raise ValueError(f"{fmt} blocks must be uint8 (rows, n_blocks * {BLOCK_BYTES.get(fmt)}), "
                         f"got {blocks.dtype} {blocks.shape}")
    rows, cols = blocks.shape[0], blocks.shape[1] // BLOCK_BYTES[fmt] * QK
    out = _float_out(out, rows, cols)
    blocks = np.ascontiguousarray(blocks)
    if _backend == "numpy" or rows == 0:
        return fallback.dequantize_gguf(fmt, blocks, out)
    _native.dequantize(FORMAT_CODES[fmt], blocks, b"", QK, rows, cols, out)
    return out


def dequantize_llama2c(values: np.ndarray, scales: np.ndarray, group_size: int,
                       out: np.ndarray | None = None) -> np.ndarray:
    """llama2.c v2 int8 values (rows, cols) and their group scales -> (rows, cols) float32 values * scale."""
    rows, cols = values.shape
    if values.dtype != np.int8 or group_size < 1 or cols % group_size:
        raise ValueError(f"values must be int8 (rows, cols) with cols a multiple of group_size {group_size}")
    scales = np.ascontiguousarray(scales, dtype=np.float32).reshape(-1)
    if scales.size != rows * cols // group_size:
        raise ValueError(f"scales hold {scales.size} values, expected {rows * cols // group_size}")
    out = _float_out(out, rows, cols)
    values = np.ascontiguousarray(values)
    if _backend == "numpy" or rows == 0:
        return fallback.dequantize_llama2c(values, scales, group_size, out)
    _native.dequantize(FORMAT_CODES["llama2c_q8"], values, scales, group_size, rows, cols, out)
    return out


__all__ = ["F32Product", "BlockProduct", "GroupedQ8Product", "QuantizedRowStack", "matmul_f32", "attend", "attend_qkv", "rmsnorm", "has_numpy_steps", "has_f32_kernel", "F32_MAX_TOKENS", "threads", "THREADS", "dequantize_gguf", "dequantize_llama2c", "matmul_gguf", "matmul_q8_0", "matmul_q4_0", "matmul_q4_1", "matmul_llama2c_q8", "backend", "backend_info",
           "use_backend", "available_backends", "default_threads", "row_bytes", "QK", "BLOCK_BYTES",
           "runq_rmsnorm", "runq_rope", "runq_attention", "runq_swiglu", "runq_group_terms", "runq_ordered_sum"]

from .attention import attend, attend_qkv  # noqa: E402  (they call the helpers above)
from .numpy_steps import has_numpy_steps, rmsnorm  # noqa: E402
from .products import BlockProduct, F32Product, GroupedQ8Product, QuantizedRowStack  # noqa: E402
from .runq_steps import (runq_attention, runq_group_terms, runq_ordered_sum, runq_rmsnorm,  # noqa: E402
                         runq_rope, runq_swiglu)
