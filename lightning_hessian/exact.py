"""Exact Hessians of a model's loss: the whole matrix, or its diagonal blocks, in one call."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .batches import BatchSizeFn
from .closure import LossFn
from .dense import agreed_dense_check, dense_from_operator
from .operator import HessianOperator
from .parameters import BlocksSpec, Patterns, resolve_blocks

# NOTE [Float32 Hessians]
# Reverse-over-reverse products in float32 carry float32 rounding through two differentiations. On a
# conv-BatchNorm-ReLU net (3,245 parameters; see the README's "Exact Hessians" notes) the float32
# dense Hessian against float64: 2.1e-7 of the largest entry at worst, eigenvalues to 4e-8 of the
# top one, but entries above 1e-3 of the largest are off by up to 3.3e-5 relative, and smaller ones
# by more. Spectra and traces are fine in float32; entry-by-entry comparisons want float64.


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
    reduction: str = "mean",
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
        dtype: Compute dtype, e.g. ``torch.float64``. In float32 the second differentiation
            amplifies rounding in entries that are small against the largest (see NOTE [Float32
            Hessians]); compute in float64 where entries are compared one by one.
        batch_size_fn: ``batch -> number of samples`` for batches whose size cannot be inferred.
        hvp: Hessian-vector product method (see :class:`HessianOperator`).
        chunk_size: Columns per batched product (default: sized from free memory).
        reduction: ``"mean"``: the size-weighted mean of batch losses; ``"sum"``: their plain sum (for
            a ``loss_fn`` with ``reduction="sum"``, the loss of the concatenated data).

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
        reduction=reduction,
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
