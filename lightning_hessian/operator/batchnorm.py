"""Eval-mode BatchNorm as the per-channel affine map that it is, for cheaper second derivatives.

# NOTE [Eval-mode BatchNorm as an affine map]
``(x - mean) / sqrt(var + eps) * weight + bias`` with fixed running statistics is the same function
of ``x``, ``weight`` and ``bias`` as ``F.batch_norm(..., training=False)``, so it has the same exact
Hessian (up to float rounding). Its second derivatives are a few elementwise products, while the
generic batch-norm double backward recomputes the normalization: the first-order graphs that
reverse-over-reverse products differentiate are built with this map (:mod:`.second_order`).
Train-mode calls, and calls with mixed dtypes, run unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: ``F.batch_norm``'s positional arguments, in order.
BATCH_NORM_ARGUMENTS = (
    "input",
    "running_mean",
    "running_var",
    "weight",
    "bias",
    "training",
    "momentum",
    "eps",
)


def affine_batch_norm_terms(bound: dict[str, Any]) -> tuple[Tensor, Tensor] | None:
    """Per-channel ``(scale, shift)`` of an eval-mode batch norm, or ``None`` when it does not apply.

    Args:
        bound: ``F.batch_norm``'s arguments by name.

    Returns:
        ``scale = weight / sqrt(var + eps)`` and ``shift = bias - mean * scale`` (each ``[C]``), or
        ``None`` for train mode, missing running statistics, inputs without a channel dimension, or
        mixed dtypes.

    Example:
        >>> bn = torch.nn.BatchNorm1d(3).eval()
        >>> bound = {"input": torch.ones(2, 3), "running_mean": bn.running_mean,
        ...          "running_var": bn.running_var, "weight": bn.weight, "bias": bn.bias}
        >>> scale, shift = affine_batch_norm_terms(bound)
        >>> scale.shape
        torch.Size([3])
    """
    x, mean, var = bound.get("input"), bound.get("running_mean"), bound.get("running_var")
    weight, bias = bound.get("weight"), bound.get("bias")
    if bound.get("training", False) or not all(isinstance(t, Tensor) for t in (x, mean, var)):
        return None
    if x.ndim < 2 or any(t is not None and t.dtype != x.dtype for t in (mean, var, weight, bias)):
        return None
    scale = torch.rsqrt(var + bound.get("eps", 1e-5))
    if weight is not None:
        scale = weight * scale
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


def affine_batch_norm(bound: dict[str, Any]) -> Tensor | None:
    """Evaluate an eval-mode batch norm as ``x * scale + shift``, or ``None`` when it does not apply.

    Args:
        bound: ``F.batch_norm``'s arguments by name.

    Returns:
        The normalized tensor, or ``None`` where :func:`affine_batch_norm_terms` does not apply.
    """
    terms = affine_batch_norm_terms(bound)
    if terms is None:
        return None
    scale, shift = terms
    x = bound["input"]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return x * scale.reshape(shape) + shift.reshape(shape)
