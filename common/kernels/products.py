"""A matrix's kernel call checked once: the weights' dtype, shape and layout are validated when
the product is made (a matrix type makes its own once, at its first product), and each call checks
only its activations. A 110M decode step makes 49 products; checking the weights at every call
cost 4-8 us each. Imported by the package's __init__ after the helpers it uses are defined."""

from typing import Sequence

import numpy as np

from . import (F32_MAX_STACK, F32_MAX_TOKENS, QUANTIZED_MAX_STACK, _ISA, _activations, _native, _output, backend, backend_info, fallback,
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


class QuantizedProduct:
    """What the quantized products share: one matrix's stored arrays, checked, and its call."""

    __slots__ = ("format_code", "weights", "scales", "group_size", "rows", "cols")

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None, n_threads: int = 1) -> np.ndarray:
        """x (T, cols) or (cols,) -> (T, rows) float32."""
        x = _activations(x, self.cols)
        out = _output(out, x.shape[0], self.rows)
        isa = _ISA.get(backend())
        if isa is None:  # the numpy backend
            return self.fallback(x, out)
        _native.matmul_stack(self.format_code, isa, self.group_size, self.cols, ((self.weights, self.scales),), x,
                             x.shape[0], out, n_threads)
        return out

    def fallback(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """The numpy backend's product (where the C extension does not run)."""
        raise NotImplementedError


class BlockProduct(QuantizedProduct):
    """x -> x @ W.T on GGUF blocks: `fmt` one of "q8_0", "q4_0", "q4_1", blocks uint8
    (rows, cols / 32 * block bytes)."""

    __slots__ = ("fmt",)

    def __init__(self, fmt: str, blocks: np.ndarray):
        if fmt not in BLOCK_BYTES:
            raise ValueError(f"unknown block format {fmt!r} (known: {', '.join(BLOCK_BYTES)})")
        if not isinstance(blocks, np.ndarray) or blocks.dtype != np.uint8 or blocks.ndim != 2 \
                or blocks.shape[1] % BLOCK_BYTES[fmt]:
            raise ValueError(f"{fmt} blocks must be uint8 (rows, n_blocks * {BLOCK_BYTES[fmt]}), "
                             f"got {getattr(blocks, 'dtype', type(blocks).__name__)} {getattr(blocks, 'shape', '')}")
        self.fmt, self.format_code, self.group_size = fmt, FORMAT_CODES[fmt], QK
        self.weights, self.scales = np.ascontiguousarray(blocks), b""
        self.rows, self.cols = blocks.shape[0], blocks.shape[1] // BLOCK_BYTES[fmt] * QK

    def fallback(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        return fallback.matmul_gguf(self.fmt, self.weights, x, out)


class GroupedQ8Product(QuantizedProduct):
    """x -> x @ W.T as runq.c computes it (matmul_llama2c_q8): llama2.c version 2 int8 values
    (rows, cols) and their float32 scales, one per group of group_size columns."""

    __slots__ = ()

    def __init__(self, values: np.ndarray, scales: np.ndarray, group_size: int):
        if not isinstance(values, np.ndarray) or values.dtype != np.int8 or values.ndim != 2:
            raise ValueError(f"values must be int8 (rows, cols), got {getattr(values, 'dtype', type(values).__name__)} "
                             f"{getattr(values, 'shape', '')}")
        rows, cols = values.shape
        if group_size < 1 or cols % group_size:
            raise ValueError(f"group_size {group_size} does not divide cols {cols}")
        scales = np.ascontiguousarray(scales, dtype=np.float32).reshape(-1)
        if scales.size != rows * cols // group_size:
            raise ValueError(f"scales hold {scales.size} values, expected {rows * cols // group_size}")
        self.format_code, self.weights, self.scales = FORMAT_CODES["llama2c_q8"], np.ascontiguousarray(values), scales
        self.group_size, self.rows, self.cols = group_size, rows, cols

    def fallback(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        return fallback.matmul_llama2c(self.weights, self.scales, self.group_size, x, out)


class QuantizedRowStack:
    """Quantized products of one storage (format, group size) and cols multiplied as one stacked
    by rows, their outputs side by side: the activations quantized once and one pool dispatch for
    a layer's q|k|v or w1|w3 where their storage does not lie back to back (a llama2.c version 2
    file stores every layer's wq, then every wk, ...). Each output has the bits of its own product."""

    __slots__ = ("products", "parts", "rows", "cols")

    def __init__(self, products: Sequence[QuantizedProduct]):
        products = tuple(products)
        first = products[0]
        if not 1 <= len(products) <= QUANTIZED_MAX_STACK or any(
                (p.format_code, p.group_size, p.cols) != (first.format_code, first.group_size, first.cols)
                for p in products):
            raise ValueError(f"a stack holds 1..{QUANTIZED_MAX_STACK} products of one storage and cols")
        self.products, self.parts = products, tuple((p.weights, p.scales) for p in products)
        self.rows, self.cols = sum(p.rows for p in products), first.cols

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None, n_threads: int = 1) -> np.ndarray:
        """x (T, cols) or (cols,) -> (T, rows) float32."""
        x = _activations(x, self.cols)
        out = _output(out, x.shape[0], self.rows)
        isa = _ISA.get(backend())
        if isa is None:  # the numpy backend
            column = 0
            for product in self.products:
                out[:, column:column + product.rows] = product.fallback(x, np.empty((x.shape[0], product.rows),
                                                                                    dtype=np.float32))
                column += product.rows
            return out
        first = self.products[0]
        _native.matmul_stack(first.format_code, isa, first.group_size, self.cols, self.parts, x, x.shape[0], out,
                             n_threads)
        return out
