"""A matrix's kernel call checked once: the weights' dtype, shape and layout are validated when
the product is made (a matrix type makes its own once, at its first product), and each call checks
only its activations. A 110M decode step makes 49 products; checking the weights at every call
cost 4-8 us each. Imported by the package's __init__ after the helpers it uses are defined."""

from typing import Sequence

import numpy as np

from . import (F32_MAX_STACK, F32_MAX_TOKENS, _ISA, _activations, _native, _output, backend, backend_info, fallback,
               has_f32_kernel, threads)
from .layout import BLOCK_BYTES, FORMAT_CODES, QK


class F32Product:
    """x -> x @ W.T by matmul_f32's kernel: W float32 (rows, cols) C-contiguous, or several such of
    one cols stacked by rows (their outputs side by side)."""

    __slots__ = ("parts", "rows", "cols")

    def __init__(self, weights: np.ndarray | Sequence[np.ndarray]):
        parts = (weights,) if isinstance(weights, np.ndarray) else tuple(weights)
        if not 1 <= len(parts) <= F32_MAX_STACK:
            raise ValueError(f"a stack holds 1..{F32_MAX_STACK} matrices, got {len(parts)}")
        for part in parts:
            if not isinstance(part, np.ndarray) or part.dtype != np.float32 or part.ndim != 2 \
                    or not part.flags.c_contiguous or part.shape[1] != parts[0].shape[1]:
                raise ValueError(f"weights must be C-contiguous float32 (rows, cols) of one cols, got "
                                 f"{[(getattr(p, 'dtype', type(p).__name__), getattr(p, 'shape', None)) for p in parts]}")
        self.parts = parts
        self.rows, self.cols = sum(part.shape[0] for part in parts), parts[0].shape[1]

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None, n_threads: int | None = None) -> np.ndarray:
        """x (T, cols), T <= F32_MAX_TOKENS -> (T, rows)."""
        if not has_f32_kernel():
            raise ValueError(f"the float32 kernel needs the avx2 backend ({backend_info()})")
        x = _activations(x, self.cols)
        tokens = x.shape[0]
        if not 1 <= tokens <= F32_MAX_TOKENS:
            raise ValueError(f"x has {tokens} tokens; the float32 kernel takes 1..{F32_MAX_TOKENS}")
        out = _output(out, tokens, self.rows)
        _native.matmul_f32(self.parts, self.cols, x, tokens, out, threads() if n_threads is None else n_threads,
                           _ISA[backend()])
        return out


class BlockProduct:
    """x -> x @ W.T on GGUF blocks: `fmt` one of "q8_0", "q4_0", "q4_1", blocks uint8
    (rows, cols / 32 * block bytes)."""

    __slots__ = ("fmt", "blocks", "rows", "cols")

    def __init__(self, fmt: str, blocks: np.ndarray):
        if fmt not in BLOCK_BYTES:
            raise ValueError(f"unknown block format {fmt!r} (known: {', '.join(BLOCK_BYTES)})")
        if not isinstance(blocks, np.ndarray) or blocks.dtype != np.uint8 or blocks.ndim != 2 \
                or blocks.shape[1] % BLOCK_BYTES[fmt]:
            raise ValueError(f"{fmt} blocks must be uint8 (rows, n_blocks * {BLOCK_BYTES[fmt]}), "
                             f"got {getattr(blocks, 'dtype', type(blocks).__name__)} {getattr(blocks, 'shape', '')}")
        self.fmt, self.blocks = fmt, np.ascontiguousarray(blocks)
        self.rows, self.cols = blocks.shape[0], blocks.shape[1] // BLOCK_BYTES[fmt] * QK

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None, n_threads: int = 1) -> np.ndarray:
        """x (T, cols) or (cols,) -> (T, rows) float32."""
        x = _activations(x, self.cols)
        out = _output(out, x.shape[0], self.rows)
        isa = _ISA.get(backend())
        if isa is None:  # the numpy backend
            return fallback.matmul_gguf(self.fmt, self.blocks, x, out)
        _native.matmul(FORMAT_CODES[self.fmt], isa, self.blocks, b"", QK, self.rows, self.cols, x, x.shape[0], out,
                       n_threads)
        return out
