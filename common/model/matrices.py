"""Weight matrices by storage type: one class per way a matrix's numbers are stored.

A matrix is (out_features, in_features) and multiplies as y = x @ W.T. Each storage type
(float32, llama2.c's grouped int8, later GGUF blocks) is one registered class that knows

- its bytes: `parts()`, the arrays it is stored as, in the order `layout(shape, params)` names
  them, and `encoding`, a type tag plus parameters that say how to read them back;
- how to be cut for tensor parallelism: `take_rows` / `take_cols`, only on its block boundaries
  (`row_granule`, `col_granule`), with the reason when a cut does not fall on one;
- how to multiply (`matmul`), expand (`dequantize`) and look up rows (`rows`, embeddings).

A new quantization is one new class here (or in its own module) decorated with
`@register_matrix_type`: the slicer, the shard files, the llama2.c reader and the forward pass
reach it only through these methods.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from math import prod
from typing import ClassVar, Sequence

import numpy as np

import llmtp.common.kernels as kernels
from llmtp.common.errors import ConfigError, FormatError

Q_MAX = 127.0  # int8 values span -127..127 (llama2.c's quantize_q80)


@dataclass(frozen=True)
class Encoding:
    """How a matrix is stored: a registered type tag and its integer parameters."""

    type: str
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"type": self.type, **self.params}

    @classmethod
    def from_dict(cls, data, where: str) -> "Encoding":
        """Checked: the type is registered and every parameter is a plain integer."""
        if not isinstance(data, dict) or not isinstance(data.get("type"), str):
            raise FormatError(f"{where}: matrix encoding {data!r} is not a map with a 'type'")
        if data["type"] not in MATRIX_TYPES:
            raise FormatError(f"{where}: matrix type {data['type']!r} is unknown; this build reads "
                              f"{', '.join(sorted(MATRIX_TYPES))}")
        params = {key: value for key, value in data.items() if key != "type"}
        for key, value in params.items():
            if not isinstance(key, str) or not isinstance(value, int) or isinstance(value, bool):
                raise FormatError(f"{where}: matrix parameter {key!r} = {value!r} is not an integer")
        return cls(data["type"], params)


@dataclass(frozen=True)
class Part:
    """One stored array of a matrix: its name suffix ("" when it is the only one), dtype, shape."""

    suffix: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.dtype.itemsize


class Matrix(ABC):
    """A weight matrix (out_features, in_features) in some storage; see the module docstring."""

    type_tag: ClassVar[str]
    row_granule: ClassVar[int] = 1  # rows are cut in multiples of this

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int]: ...

    @property
    @abstractmethod
    def nbytes(self) -> int: ...

    @property
    @abstractmethod
    def encoding(self) -> Encoding: ...

    @property
    def col_granule(self) -> int:
        """Columns are cut in multiples of this (a quantization block never straddles two cuts)."""
        return 1

    @abstractmethod
    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x: (T, in_features) float32 -> (T, out_features) float32, x @ W.T."""

    @abstractmethod
    def dequantize(self) -> np.ndarray:
        """The whole matrix as float32 (out, in); a view when it is stored so."""

    @abstractmethod
    def rows(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), in_features) float32 rows: an embedding lookup."""

    # --- cutting ---------------------------------------------------------------------------

    def cut_problem(self, axis: int, start: int, stop: int) -> str | None:
        """Why rows (axis 0) or columns (axis 1) start..stop cannot be cut out, or None."""
        granule = self.row_granule if axis == 0 else self.col_granule
        what = "rows" if axis == 0 else "columns"
        if not 0 <= start <= stop <= self.shape[axis]:
            return f"{what} {start}..{stop} lie outside 0..{self.shape[axis]}"
        if start % granule or stop % granule:
            return f"{what} {start}..{stop} do not fall on its {self.block_name(axis)}"
        return None

    def block_name(self, axis: int) -> str:
        """What its cuts must keep whole, for messages."""
        return f"blocks of {self.row_granule if axis == 0 else self.col_granule}"

    def take_rows(self, start: int, stop: int) -> "Matrix":
        """Output rows start..stop (a column-parallel cut): a view where the storage allows."""
        self._check_cut(0, start, stop)
        return self._rows_view(start, stop)

    def take_cols(self, start: int, stop: int) -> "Matrix":
        """Input columns start..stop (a row-parallel cut)."""
        self._check_cut(1, start, stop)
        return self._cols_view(start, stop)

    def _check_cut(self, axis: int, start: int, stop: int) -> None:
        problem = self.cut_problem(axis, start, stop)
        if problem:
            raise ConfigError(f"cannot cut a {self.type_tag} matrix {self.shape}: {problem}")

    @abstractmethod
    def _rows_view(self, start: int, stop: int) -> "Matrix": ...

    @abstractmethod
    def _cols_view(self, start: int, stop: int) -> "Matrix": ...

    # --- storage -----------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def layout(cls, shape: tuple[int, int], params: dict) -> list[Part]:
        """The arrays a matrix of `shape` is stored as, in order (params already checked)."""

    @classmethod
    def params_problem(cls, shape: tuple[int, int], params: dict) -> str | None:
        """Why `params` cannot describe a matrix of `shape`, or None."""
        return f"unexpected parameters {sorted(params)}" if params else None

    @abstractmethod
    def parts(self) -> list[np.ndarray]:
        """The stored arrays, in `layout` order (may be strided views; writers make them contiguous)."""

    @classmethod
    @abstractmethod
    def from_parts(cls, shape: tuple[int, int], params: dict, arrays: Sequence[np.ndarray]) -> "Matrix":
        """The matrix over arrays already checked against `layout` (views: nothing is copied)."""

    @classmethod
    @abstractmethod
    def from_float(cls, weights: np.ndarray, params: dict) -> "Matrix":
        """Encode a float (out, in) array in this storage."""

    @classmethod
    def stacked(cls, matrices: Sequence["Matrix"]) -> "Matrix | None":
        """One matrix over `matrices` stacked by rows without copying, or None if their
        storage does not lie back to back (then each is multiplied on its own)."""
        return None


MATRIX_TYPES: dict[str, type[Matrix]] = {}


def register_matrix_type(cls: type[Matrix]) -> type[Matrix]:
    """Class decorator: make `cls` readable from shard files under its type_tag."""
    assert cls.type_tag not in MATRIX_TYPES, f"matrix type {cls.type_tag!r} registered twice"
    MATRIX_TYPES[cls.type_tag] = cls
    return cls


def as_matrix(tensor) -> Matrix:
    """A Matrix as it is; a float32 ndarray as an F32Matrix view of the same memory."""
    if isinstance(tensor, Matrix):
        return tensor
    return F32Matrix(tensor)


def encode_as(matrix: Matrix, encoding: Encoding) -> Matrix:
    """`matrix` in `encoding`: itself when already so stored, else re-encoded from float32."""
    if matrix.encoding == encoding:
        return matrix
    return MATRIX_TYPES[encoding.type].from_float(matrix.dequantize(), encoding.params)


def stack_rows(matrices: Sequence[Matrix]):
    """One product for several matrices of one storage type stacked by rows (see Matrix.stacked):
    a Matrix over them where they lie back to back, an F32RowStack for float32 ones that do not,
    else None (each is multiplied on its own)."""
    kind = type(matrices[0])
    if any(type(m) is not kind for m in matrices):
        return None
    return kind.stacked(matrices)


def read_packed(buffer, offset: int, encoding: Encoding, shape: tuple[int, int]) -> tuple[Matrix, int]:
    """A matrix whose parts lie back to back in `buffer` from `offset` (no alignment: llama2.c's
    files): (the matrix as views of the buffer, bytes it spans)."""
    cls = MATRIX_TYPES[encoding.type]
    arrays = []
    for part in cls.layout(shape, encoding.params):
        arrays.append(np.frombuffer(buffer, part.dtype, prod(part.shape), offset).reshape(part.shape))
        offset += part.nbytes
    return cls.from_parts(shape, encoding.params, arrays), sum(a.nbytes for a in arrays)


def packed_nbytes(encoding: Encoding, shape: tuple[int, int]) -> int:
    return sum(part.nbytes for part in MATRIX_TYPES[encoding.type].layout(shape, encoding.params))


def stacked_view(matrices: Sequence[np.ndarray]) -> np.ndarray | None:
    """One (total rows, cols) read-only view over 2-D arrays that lie back to back in memory
    (a shard file stores wq, wk, wv and w1, w3 so), letting one BLAS call replace several;
    None when they do not."""
    if not all(isinstance(m, np.ndarray) and m.ndim == 2 and m.flags.c_contiguous for m in matrices):
        return None
    if len({(m.shape[1], m.dtype) for m in matrices}) != 1:
        return None
    if any(a.ctypes.data + a.nbytes != b.ctypes.data for a, b in zip(matrices, matrices[1:])):
        return None
    first = matrices[0]
    rows = sum(m.shape[0] for m in matrices)
    # The bytes past `first` are the next matrices' own, in the same mapping `first` keeps alive.
    return np.lib.stride_tricks.as_strided(first, shape=(rows, first.shape[1]), strides=first.strides,
                                           writeable=False)


@register_matrix_type
class F32Matrix(np.ndarray, Matrix):
    """float32, stored as it is: an ndarray subclass, so a memory-mapped view stays that view
    (no copy) and code that reads weights as arrays keeps working. Arithmetic on it gives plain
    ndarrays (`__array_wrap__`): activations never become F32Matrix."""

    type_tag = "f32"

    def __new__(cls, array) -> "F32Matrix":
        array = np.asarray(array, dtype=np.float32)  # a view when it is float32 already
        if array.ndim != 2:
            raise ValueError(f"a matrix is 2-D, got shape {array.shape}")
        return array.view(cls)

    def __array_wrap__(self, array, context=None, return_scalar=False):
        if return_scalar:
            return array[()]
        return array.view(np.ndarray) if type(array) is not np.ndarray else array

    @property
    def plain(self) -> np.ndarray:
        """The same memory as a plain ndarray."""
        return self.view(np.ndarray)

    @property
    def encoding(self) -> Encoding:
        return Encoding(self.type_tag)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        # a few tokens (decode): the kernel streams the matrix once at memory speed, where BLAS's
        # sgemm would pack it first; one token takes it too, so batched rows equal lone ones
        if x.ndim == 2 and x.shape[0] <= kernels.F32_MAX_TOKENS and kernels.has_f32_kernel():
            product = self.__dict__.get("product")  # made at the first product (a view is a new object)
            if product is None and self.flags.c_contiguous:
                product = self.__dict__["product"] = kernels.F32Product(self.plain)
            if product is not None:
                return product(x)
        return x @ self.plain.T

    def dequantize(self) -> np.ndarray:
        return self.plain

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.plain[ids], dtype=np.float32)

    def _rows_view(self, start: int, stop: int) -> "F32Matrix":
        return self[start:stop]

    def _cols_view(self, start: int, stop: int) -> "F32Matrix":
        return self[:, start:stop]  # strided: a shard writer copies it into one block

    @classmethod
    def layout(cls, shape, params) -> list[Part]:
        return [Part("", np.dtype("<f4"), tuple(shape))]

    def parts(self) -> list[np.ndarray]:
        return [self.plain]

    @classmethod
    def from_parts(cls, shape, params, arrays) -> "F32Matrix":
        (array,) = arrays
        return array.view(cls)

    @classmethod
    def from_float(cls, weights, params) -> "F32Matrix":
        return cls(weights)

    @classmethod
    def stacked(cls, matrices) -> "F32Matrix | F32RowStack | None":
        view = stacked_view(matrices)
        if view is not None:
            return view.view(cls)
        if all(m.flags.c_contiguous for m in matrices) and len({m.shape[1] for m in matrices}) == 1:
            return F32RowStack(tuple(m.plain for m in matrices))
        return None


@dataclass(frozen=True)
class F32RowStack:
    """float32 matrices multiplied as one stacked by rows where their storage does not lie back to
    back (a llama2.c file stores every layer's wq, then every wk, ...): a decode step's q|k|v or
    w1|w3 in one kernel call instead of one per matrix. A product only; nothing stores it."""

    parts: tuple[np.ndarray, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return sum(part.shape[0] for part in self.parts), self.parts[0].shape[1]

    @cached_property
    def product(self) -> kernels.F32Product:
        return kernels.F32Product(self.parts)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        if x.ndim == 2 and x.shape[0] <= kernels.F32_MAX_TOKENS and kernels.has_f32_kernel():
            return self.product(x)  # the same bits as each part's own product
        return np.concatenate([x @ part.T for part in self.parts], axis=1)


@dataclass(frozen=True)
class QuantizedRowStack:
    """Quantized matrices of one type multiplied as one stacked by rows where their storage does
    not lie back to back: x quantized once and one kernel call for a layer's q|k|v or w1|w3
    instead of one per matrix (each output the bits of its own product). A product only; nothing
    stores it."""

    matrices: tuple[Matrix, ...]

    @classmethod
    def over(cls, matrices: Sequence[Matrix]) -> "QuantizedRowStack | None":
        """The stack of `matrices` when one kernel call can take them (one encoding, one width,
        at most kernels.QUANTIZED_MAX_STACK of them), else None."""
        storages = {(m.encoding.type, tuple(sorted(m.encoding.params.items())), m.shape[1]) for m in matrices}
        if len(storages) != 1 or len(matrices) > kernels.QUANTIZED_MAX_STACK:
            return None
        return cls(tuple(matrices))

    @property
    def shape(self) -> tuple[int, int]:
        return sum(m.shape[0] for m in self.matrices), self.matrices[0].shape[1]

    @cached_property
    def product(self) -> kernels.QuantizedRowStack:
        return kernels.QuantizedRowStack([m.product for m in self.matrices])

    def matmul(self, x: np.ndarray) -> np.ndarray:
        if self.matrices[0].kernel_takes(x):
            return self.product(x, n_threads=kernels.threads())
        return np.concatenate([m.matmul(x) for m in self.matrices], axis=1)


# Every storage type registers itself on import; these ship with llmtp.
from . import gguf_blocks, q8_grouped  # noqa: E402,F401  (they import Matrix from here, so they come last)
