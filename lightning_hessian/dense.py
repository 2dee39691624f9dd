"""Exact dense Hessians (whole selection or diagonal blocks), built column chunk by column chunk."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .closure import BatchSizeFn, LossFn
from .errors import NonFiniteHessianError
from .memory import GIB, available_memory
from .operator import _BLOCK_SELECTION_MIN_COLUMNS, HessianOperator
from .parameters import BlocksSpec, Patterns, resolve_blocks

_TRANSPOSE_TILE = 128  # measured: 64-256 copy a transposed chunk 2-3x faster than one strided copy
_WORKSPACE_COLUMNS = 3  # matmat's input, output and transposed copies of one chunk


class HessianTooLargeError(MemoryError):
    """A dense Hessian would not fit in the memory the device has free."""


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
    """``destination[...] = source.T`` in square tiles: a plain strided transposed copy of a few
    hundred rows of a large matrix is several times slower (each element a cache miss).
    """
    rows, columns = destination.shape
    for i in range(0, rows, tile):
        for j in range(0, columns, tile):
            destination[i : i + tile, j : j + tile] = source[j : j + tile, i : i + tile].T


def agreed_dense_check(op: HessianOperator, sizes: Iterable[int], chunk: int = 0) -> int:
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
    if op.process_group is not None:
        flags = torch.tensor([failure is not None, -chunk], dtype=torch.float64, device=op._reduce_device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=op.process_group)
        if failure is None and flags[0] > 0:
            raise HessianTooLargeError(
                "Another rank does not have the memory for the dense Hessian; use `blocks=`, `params=` "
                "or the matrix-free estimators."
            )
        chunk = int(-flags[1])
    if failure is not None:
        raise failure
    return chunk


def dense_from_operator(op: HessianOperator, chunk_size: int | None = None) -> Tensor:
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
    chunk = agreed_dense_check(op, [n], min(n, chunk_size or op._chunk_size()))
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
            if start == 0 and size >= _BLOCK_SELECTION_MIN_COLUMNS:
                op._choose_block_method(rows, support, targets)
            low, high = first + start, first + stop
            destination = matrix[low:high, first:]  # rows = columns by symmetry
            if op.process_group is None:
                op.block_products(rows, support, targets, out=destination)
                if not bool(torch.isfinite(destination).all()):
                    raise NonFiniteHessianError("The dense Hessian has NaN or infinite entries.")
            else:  # every rank computes these columns on its batches; the sum is the union's Hessian
                local = partial(op.block_products, rows, support, targets)
                destination.copy_(op.agreed_all_reduce(local, destination.shape))
            rows[unit, unit + start] = 0
            # Exact symmetry inside the diagonal block: the upper triangle computed so far wins.
            _copy_transposed_(matrix[low:high, first:low], matrix[first:low, low:high])
            square = matrix[low:high, low:high]
            i, j = upper[:, (upper[0] < stop - start) & (upper[1] < stop - start)]
            square[j, i] = square[i, j]
        rest = slice(first + size, n)
        _copy_transposed_(matrix[rest, first : first + size], matrix[first : first + size, rest])
    return matrix


def hessian(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: Iterable[Any],
    *,
    params: Patterns = None,
    blocks: BlocksSpec = None,
    mode: str = "eval",
    dtype: torch.dtype | None = None,
    batch_size_fn: BatchSizeFn | None = None,
    hvp: str = "auto",
    chunk_size: int | None = None,
) -> Tensor | dict[str, Tensor]:
    """The exact Hessian of the size-weighted mean loss over ``data`` w.r.t. the model's parameters.

    Args:
        model: Any ``nn.Module``; never modified.
        loss_fn: ``loss_fn(module, batch) -> scalar``; call ``module`` as usual. ``None`` uses a
            LightningModule's ``training_step``.
        data: Iterable of batches (list or DataLoader).
        params: Glob pattern(s) on parameter names; default all trainable parameters.
        blocks: ``None``/``"model"`` for the full matrix; ``"module"``, ``"parameter"`` or a mapping
            ``name -> patterns`` for a dict of diagonal blocks, computed without the full matrix.
        mode: ``"eval"`` (default) or ``"train"``.
        dtype: Compute dtype, e.g. ``torch.float64``.
        batch_size_fn: ``batch -> number of samples`` for batches whose size cannot be inferred.
        hvp: Hessian-vector product method (see :class:`HessianOperator`).
        chunk_size: Columns per batched product (default: sized from free memory).

    Returns:
        ``[N, N]`` in the flat order of ``named_parameters()``, or ``{block name: [n_b, n_b]}``.

    Raises:
        ValueError: For bad arguments (checked on the first batch before heavy work).
        HessianTooLargeError: If the result does not fit in free memory, before allocating it.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> batch = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> H = hessian(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), [batch])
        >>> H.shape
        torch.Size([26, 26])
    """
    full = HessianOperator(
        model,
        loss_fn,
        data,
        params=params,
        mode=mode,
        dtype=dtype,
        batch_size_fn=batch_size_fn,
        hvp=hvp,
        chunk_size=chunk_size,
        cache_graphs=blocks in (None, "model"),
    )
    groups = resolve_blocks(full.space.names, blocks)
    if blocks is None or blocks == "model":
        return dense_from_operator(full, chunk_size)
    sizes = {name: full.space.subspace(names).numel for name, names in groups.items()}
    agreed_dense_check(full, sizes.values())
    result = {}
    for name, names in groups.items():
        block = full.restrict(names)
        result[name] = dense_from_operator(block, chunk_size)
        block.release_graphs()
    return result
