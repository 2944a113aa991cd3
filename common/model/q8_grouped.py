"""llama2.c's grouped Q8_0 (version 2 files) as a Matrix type (see common/model/matrices.py)."""

from dataclasses import dataclass
from functools import cached_property
from math import prod
from typing import ClassVar

import numpy as np

import llmtp.common.kernels as kernels

from .matrices import Encoding, Matrix, Part, Q_MAX, QuantizedRowStack, register_matrix_type


@register_matrix_type
@dataclass
class GroupedQ8Matrix(Matrix):
    """llama2.c Q8_0 (version 2 files): int8 values, one float32 scale per `group_size`
    consecutive values of a row, stored as two arrays (values, then all the scales).

    values: (rows, cols) int8; scales: (rows * cols // group_size,) float32, in the
    same row-major order as the values. w = values * scale (scale = max|w| / 127).
    """

    type_tag: ClassVar[str] = "q8_grouped"

    values: np.ndarray
    scales: np.ndarray
    group_size: int

    @property
    def shape(self) -> tuple:
        return self.values.shape

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scales.nbytes

    @property
    def encoding(self) -> Encoding:
        return Encoding(self.type_tag, {"group_size": self.group_size})

    @property
    def col_granule(self) -> int:
        return self.group_size

    def block_name(self, axis: int) -> str:
        return f"groups of {self.group_size} columns (group_size {self.group_size})"

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """runq.c's product on the int8 values (kernels.matmul_llama2c_q8): x quantized per
        group, int32 group sums, runq.c's float order, so a v2 file's greedy text is runq.c's.
        Every token of a batch (prefill) is computed as it would be alone; nothing expands."""
        return self.product(x, n_threads=kernels.threads())

    @cached_property
    def product(self) -> kernels.GroupedQ8Product:
        return kernels.GroupedQ8Product(self.values, self.scales, self.group_size)

    def kernel_takes(self, x: np.ndarray) -> bool:
        """Whether the kernel multiplies x: always (prefill runs in its register tiles)."""
        return True

    @classmethod
    def stacked(cls, matrices) -> "QuantizedRowStack | None":
        """A version 2 file stores every layer's wq, then every wk, ...: never back to back, so
        one product over them (runq.c's bits for each) instead of one each."""
        return QuantizedRowStack.over(matrices)

    def group_terms(self, x: np.ndarray, first_col: int, total_cols: int) -> np.ndarray:
        """The terms runq.c's matmul adds for these columns, one per group, placed among
        total_cols / group_size groups from first_col / group_size on (zero elsewhere):
        (T, rows, total_cols / group_size). kernels.runq_ordered_sum of them is matmul(x)."""
        assert first_col % self.group_size == 0 and total_cols % self.group_size == 0, (first_col, total_cols)
        return kernels.runq_group_terms(self.values, self.scales, self.group_size, x,
                                        first_col // self.group_size, total_cols // self.group_size)

    def dequantize(self, out: np.ndarray | None = None) -> np.ndarray:
        rows, cols = self.values.shape
        if out is None:
            out = np.empty((rows, cols), dtype=np.float32)
        grouped = out.reshape(-1, self.group_size)
        np.multiply(self.values.reshape(-1, self.group_size), self.scales.reshape(-1, 1), out=grouped)
        return out

    def rows(self, ids: np.ndarray) -> np.ndarray:
        cols = self.values.shape[1]
        groups_per_row = cols // self.group_size
        values = self.values[ids].astype(np.float32).reshape(len(ids), groups_per_row, self.group_size)
        scales = self.scales.reshape(-1, groups_per_row)[ids]
        return (values * scales[:, :, None]).reshape(len(ids), cols)

    dequantize_rows = rows  # the name before the Matrix types

    def _scales_by_row(self) -> np.ndarray:
        return self.scales.reshape(self.shape[0], self.shape[1] // self.group_size)

    def _rows_view(self, start: int, stop: int) -> "GroupedQ8Matrix":
        return GroupedQ8Matrix(self.values[start:stop], self._scales_by_row()[start:stop].reshape(-1),
                               self.group_size)

    def _cols_view(self, start: int, stop: int) -> "GroupedQ8Matrix":
        # a column slice is strided and the kernel reads rows back to back: copy it once here
        # (int8, the slice's own size) rather than at every product
        groups = self._scales_by_row()[:, start // self.group_size:stop // self.group_size]
        return GroupedQ8Matrix(np.ascontiguousarray(self.values[:, start:stop]),
                               np.ascontiguousarray(groups).reshape(-1), self.group_size)

    @classmethod
    def params_problem(cls, shape, params) -> str | None:
        if set(params) != {"group_size"}:
            return f"parameters {sorted(params)}, expected ['group_size']"
        group_size = params["group_size"]
        if len(shape) != 2 or group_size <= 0 or shape[1] % group_size:
            return f"group_size {group_size} does not divide its rows of {shape[-1]}"
        return None

    @classmethod
    def layout(cls, shape, params) -> list[Part]:
        return [Part(".values", np.dtype("i1"), tuple(shape)),
                Part(".scales", np.dtype("<f4"), (prod(shape) // params["group_size"],))]

    def parts(self) -> list[np.ndarray]:
        return [self.values, self.scales]

    @classmethod
    def from_parts(cls, shape, params, arrays) -> "GroupedQ8Matrix":
        values, scales = arrays
        return cls(values=values, scales=scales, group_size=params["group_size"])

    @classmethod
    def from_float(cls, weights, params) -> "GroupedQ8Matrix":
        """Computed in float32 like llama2.c's export.py quantize_q80."""
        group_size = params["group_size"]
        rows, cols = weights.shape
        assert cols % group_size == 0, f"cols {cols} not divisible by group_size {group_size}"
        groups = np.asarray(weights, dtype=np.float32).reshape(-1, group_size)
        scales = (np.abs(groups).max(axis=1) / np.float32(Q_MAX)).astype(np.float32)
        # an all-zero group has scale 0: store zeros instead of 0/0
        safe = np.where(scales > 0, scales, np.float32(1.0))
        values = np.rint(groups / safe[:, None]).astype(np.int8)
        return cls(values=values.reshape(rows, cols), scales=scales, group_size=group_size)
