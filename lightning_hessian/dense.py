"""Materialize a Hessian operator as an exact dense matrix, chunk by chunk, memory checked first.

Works on any operator with the :class:`BlockProductOperator` methods (``HessianOperator`` has them):
it needs products restricted to parameter subsets, so that only one triangle is computed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any, Protocol

import torch
from torch import Tensor

from .distributed import agree_on_failure, all_finite, all_reduce_or_raise
from .errors import HessianTooLargeError, NonFiniteHessianError
from .memory import GIB, available_memory
from .parameters import ParameterSpace

_TRANSPOSE_TILE = 128  # square tiles of a transposed copy; see _copy_transposed_
_WORKSPACE_COLUMNS = 3  # matmat's input, output and transposed copies of one chunk


class BlockProductOperator(Protocol):
    """What :func:`dense_from_operator` needs of an operator."""

    space: ParameterSpace
    process_group: Any

    @property
    def shape(self) -> tuple[int, int]: ...  # noqa: D102

    @property
    def dtype(self) -> torch.dtype: ...  # noqa: D102

    @property
    def device(self) -> torch.device: ...  # noqa: D102

    def chunk_columns(self) -> int: ...  # noqa: D102

    def block_products(  # noqa: D102
        self,
        rows: Tensor,
        support: Sequence[str] | None = None,
        targets: Sequence[str] | None = None,
        *,
        out: Tensor | None = None,
    ) -> Tensor: ...


def dense_memory_bytes(sizes: Iterable[int], dtype: torch.dtype, chunk: int = 0) -> int:
    """Bytes needed for dense blocks of the given sizes plus one chunk of workspace.

    Args:
        sizes: Side length of each block.
        dtype: Element dtype.
        chunk: Columns computed at once.

    Returns:
        ``sum(n^2) * itemsize`` plus ``3 * max(n) * chunk * itemsize``.
    """
    sizes = list(sizes)
    itemsize = torch.empty((), dtype=dtype).element_size()
    workspace = _WORKSPACE_COLUMNS * max(sizes) * chunk * itemsize
    return sum(n * n for n in sizes) * itemsize + workspace


def check_dense_fits(sizes: Iterable[int], dtype: torch.dtype, device: torch.device, chunk: int = 0) -> None:
    """Raise before allocating if the dense matrices would exceed the device's free memory.

    Args:
        sizes: Side length of each dense block.
        dtype: Element dtype.
        device: Where they would be allocated.
        chunk: Columns computed at once.

    Raises:
        HessianTooLargeError: With the size in GB and the ways out.
    """
    sizes = list(sizes)
    needed = dense_memory_bytes(sizes, dtype, chunk)
    free = available_memory(device)
    if free is not None and needed > free:
        raise HessianTooLargeError(
            f"The dense Hessian needs {needed / GIB:.2f} GB ({'+'.join(map(str, sizes))} parameters "
            f"squared, {dtype}) but {device} has {free / GIB:.2f} GB free. Use `blocks=` for its "
            "diagonal blocks, `params=` to select fewer parameters, or the matrix-free estimators "
            "(lh.eigenvalues, lh.trace, lh.spectral_density on lh.HessianOperator)."
        )


def _copy_transposed_(destination: Tensor, source: Tensor, tile: int = _TRANSPOSE_TILE) -> None:
    """``destination[...] = source.T`` in square tiles.

    A plain strided transposed copy of a few hundred rows of a large matrix is several times slower
    (each element a cache miss); tiles of 64-256 keep both sides in cache.
    """
    rows, columns = destination.shape
    for i in range(0, rows, tile):
        for j in range(0, columns, tile):
            destination[i : i + tile, j : j + tile] = source[j : j + tile, i : i + tile].T


def agreed_dense_check(op: BlockProductOperator, sizes: Iterable[int], chunk: int = 0) -> int:
    """:func:`check_dense_fits` on every rank, agreed: all ranks raise if any lacks the memory.

    Under a process group the chunk width is agreed too (the smallest of the ranks'), so every
    rank all-reduces chunks of the same shape.

    Args:
        op: The operator whose process group decides.
        sizes: Side length of each dense block.
        chunk: This rank's chunk width.

    Returns:
        The chunk width every rank uses.

    Raises:
        HessianTooLargeError: On every rank, if any rank lacks the memory.
    """
    failure: HessianTooLargeError | None = None
    try:
        check_dense_fits(sizes, op.dtype, op.device, chunk)
    except HessianTooLargeError as error:
        failure = error
    agreement = agree_on_failure(failure, op.process_group, device=op.device, values=[-chunk], op="max")
    if agreement.failed_ranks and failure is None:
        raise HessianTooLargeError(
            "Another rank does not have the memory for the dense Hessian; use `blocks=`, `params=` "
            "or the matrix-free estimators."
        )
    agreement.raise_error()
    return int(-agreement.values[0])


def dense_from_operator(op: BlockProductOperator, chunk_size: int | None = None) -> Tensor:
    """Materialize an operator as a dense symmetric matrix.

    Only the upper triangle is computed: the columns of each parameter tensor are multiplied out
    for the rows of that tensor and the ones after it (autograd then skips every layer before
    them), and the rest is filled in by symmetry, chunk by chunk while the chunk is in cache
    (inside a diagonal block, each chunk's rows left of its diagonal are copied from the rows
    computed before). Products are written straight into the matrix's rows; the only other
    memory is one chunk of unit vectors and the products' own workspace.

    Args:
        op: The Hessian operator.
        chunk_size: Columns per batched product (default: the operator's memory-sized chunk).

    Returns:
        The exactly symmetric ``[N, N]`` matrix in the operator's flat order.

    Raises:
        HessianTooLargeError: If it does not fit in free memory (checked before allocating).
    """
    n = op.shape[0]
    chunk = agreed_dense_check(op, [n], min(n, chunk_size or op.chunk_columns()))
    matrix = torch.empty(n, n, dtype=op.dtype, device=op.device)
    names, slices = op.space.names, op.space.slices()
    for k, name in enumerate(names):
        first, size = slices[name].start, slices[name].stop - slices[name].start
        support, targets = (name,), names[k:]
        width = min(chunk, size)
        basis = torch.zeros(width, size, dtype=op.dtype, device=op.device)
        diagonal = torch.arange(width, device=op.device)
        upper = torch.triu_indices(width, width, 1, device=op.device)
        for start in range(0, size, width):
            stop = min(size, start + width)
            rows, unit = basis[: stop - start], diagonal[: stop - start]
            rows[unit, unit + start] = 1
            low, high = first + start, first + stop
            destination = matrix[low:high, first:]  # rows = columns by symmetry
            if op.process_group is None:
                op.block_products(rows, support, targets, out=destination)
                if not all_finite(destination):
                    raise NonFiniteHessianError("The dense Hessian has NaN or infinite entries.")
            else:  # every rank computes these columns on its batches; the sum is the union's Hessian
                local = partial(op.block_products, rows, support, targets)
                summed = all_reduce_or_raise(
                    local, op.process_group, shape=destination.shape, dtype=op.dtype, device=op.device
                )
                destination.copy_(summed)
            rows[unit, unit + start] = 0
            # Exact symmetry inside the diagonal block: the upper triangle computed so far wins.
            _copy_transposed_(matrix[low:high, first:low], matrix[first:low, low:high])
            square = matrix[low:high, low:high]
            i, j = upper[:, (upper[0] < stop - start) & (upper[1] < stop - start)]
            square[j, i] = square[i, j]
        rest = slice(first + size, n)
        _copy_transposed_(matrix[rest, first : first + size], matrix[first : first + size, rest])
    return matrix
