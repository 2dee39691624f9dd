"""The linear-operator protocol every estimator accepts.

Estimators only need ``op @ v`` for a vector ``[N]``, ``op @ V`` for a matrix ``[N, m]``, and
``shape``/``dtype``/``device``. :class:`~lightning_hessian.HessianOperator` satisfies it, and so does
:class:`MatrixOperator`, which wraps an explicit symmetric matrix (for tests and synthetic spectra).
The helpers here multiply any such operator in column chunks or materialize it densely.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class SymmetricOperator(Protocol):
    """A symmetric linear operator on ``R^N`` that multiplies vectors and matrices."""

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, N)``."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the products."""
        ...

    @property
    def device(self) -> torch.device:
        """Device the products live on."""
        ...

    def __matmul__(self, other: Tensor) -> Tensor:
        """Return ``A @ other`` for ``other`` of shape ``[N]`` or ``[N, m]``."""
        ...


class MatrixOperator:
    """An explicit symmetric matrix seen through the operator protocol, counting its products.

    Args:
        matrix: A symmetric ``[N, N]`` tensor.

    Raises:
        ValueError: If ``matrix`` is not square.

    Example:
        >>> op = MatrixOperator(torch.diag(torch.tensor([3.0, 1.0])))
        >>> op @ torch.ones(2)
        tensor([3., 1.])
    """

    def __init__(self, matrix: Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"`matrix` must be square [N, N], got shape {tuple(matrix.shape)}.")
        self.matrix = matrix
        self.num_matvecs = 0

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, N)``."""
        return (self.matrix.shape[0], self.matrix.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        """The matrix's dtype."""
        return self.matrix.dtype

    @property
    def device(self) -> torch.device:
        """The matrix's device."""
        return self.matrix.device

    def __matmul__(self, other: Tensor) -> Tensor:
        """Multiply a vector ``[N]`` or a matrix ``[N, m]``; counts one product per column."""
        self.num_matvecs += 1 if other.ndim == 1 else other.shape[1]
        return self.matrix @ other.to(self.matrix.dtype)

    def to_dense(self) -> Tensor:
        """Return the matrix itself."""
        return self.matrix


def operator_size(op: SymmetricOperator) -> int:
    """Return ``N`` for an operator of shape ``(N, N)``, checking that it is square.

    Args:
        op: Any object with a ``shape`` attribute.

    Returns:
        The side length ``N``.

    Raises:
        TypeError: If ``op`` has no ``shape`` or cannot multiply with ``@``.
        ValueError: If the shape is not square.
    """
    shape = getattr(op, "shape", None)
    if shape is None or not hasattr(op, "__matmul__"):
        raise TypeError(
            f"`op` must be a linear operator with `.shape` and `@` (e.g. lh.HessianOperator), "
            f"got {type(op).__name__}."
        )
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"`op` must be square, got shape {tuple(shape)}.")
    return int(shape[0])


#: Bytes one block of probe vectors may take before products are split into column chunks.
DEFAULT_BLOCK_BYTES = 256 * 2**20


def default_chunk_size(n: int, dtype: torch.dtype, max_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Columns per product so that an ``[n, columns]`` block stays under ``max_bytes``.

    Args:
        n: Rows of the block (the operator's side length).
        dtype: Element type of the block.
        max_bytes: Memory allowed for one block.

    Returns:
        At least 1, at most ``max_bytes // (n * itemsize)``.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, int(max_bytes // max(1, n * itemsize)))


def matmul_chunked(op: SymmetricOperator, block: Tensor, chunk_size: int | None = None) -> Tensor:
    """Return ``op @ block`` for ``block`` of shape ``[N, m]``, in column chunks.

    Args:
        op: The operator.
        block: ``[N, m]`` columns to multiply.
        chunk_size: Most columns per product; default :func:`default_chunk_size`.

    Returns:
        ``[N, m]`` products in ``block``'s dtype.
    """
    n, m = block.shape
    chunk = chunk_size or default_chunk_size(n, block.dtype)
    if m <= chunk:
        return (op @ block).to(block.dtype)
    out = torch.empty_like(block)
    for start in range(0, m, chunk):
        stop = min(m, start + chunk)
        out[:, start:stop] = op @ block[:, start:stop]
    return out


def dense_matrix(op: SymmetricOperator, chunk_size: int | None = None) -> tuple[Tensor, int]:
    """Materialise ``op`` as a dense ``[N, N]`` matrix.

    Uses ``op.to_dense()`` when the operator has it, else multiplies identity columns in chunks.

    Args:
        op: The operator.
        chunk_size: Most identity columns per product; default :func:`default_chunk_size`.

    Returns:
        ``(matrix, num_matvecs)``: the matrix and the operator products spent (``N`` for the identity
        route; for ``to_dense()``, the change of ``op.num_matvecs`` when the operator counts, else ``N``).
    """
    n = operator_size(op)
    if hasattr(op, "to_dense"):
        before = getattr(op, "num_matvecs", None)
        matrix = op.to_dense()
        after = getattr(op, "num_matvecs", None)
        used = after - before if isinstance(before, int) and isinstance(after, int) else n
        return matrix, used
    chunk = chunk_size or default_chunk_size(n, op.dtype)
    matrix = torch.empty(n, n, dtype=op.dtype, device=op.device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        eye = torch.zeros(n, stop - start, dtype=op.dtype, device=op.device)
        eye[torch.arange(start, stop), torch.arange(stop - start)] = 1
        matrix[:, start:stop] = op @ eye
    return matrix, n
