"""Eval-mode BatchNorm as the per-channel affine map that it is, for cheaper second derivatives.

# NOTE [Eval-mode BatchNorm as an affine map]
``(x - mean) / sqrt(var + eps) * weight + bias`` with fixed running statistics is the same function
of ``x``, ``weight`` and ``bias`` as ``F.batch_norm(..., training=False)``, so it has the same exact
Hessian (up to float rounding). Its second derivatives are a few elementwise products, while the
generic batch-norm double backward recomputes the normalization: the first-order graphs that
reverse-over-reverse products differentiate are built under :class:`EvalBatchNormAsAffine`. The
saving is measured on the mid-size CNN of ``benchmarks/hvp.py`` (README, "Hessian-vector products").
Train-mode calls, and calls with mixed dtypes, run unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

_BATCH_NORM_ARGUMENTS = (
    "input",
    "running_mean",
    "running_var",
    "weight",
    "bias",
    "training",
    "momentum",
    "eps",
)


class EvalBatchNormAsAffine(TorchFunctionMode):
    """Inside this mode, eval-mode ``F.batch_norm`` runs as its affine map (see the NOTE above).

    Example:
        >>> with EvalBatchNormAsAffine():
        ...     y = bn.eval()(x)  # doctest: +SKIP
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            bound = {**dict(zip(_BATCH_NORM_ARGUMENTS, args, strict=False)), **kwargs}
            affine = affine_batch_norm(bound)
            if affine is not None:
                return affine
        return func(*args, **kwargs)


def affine_batch_norm(bound: dict[str, Any]) -> Tensor | None:
    """Evaluate an eval-mode batch norm as ``x * scale + shift``, or ``None`` when it does not apply.

    Args:
        bound: ``F.batch_norm``'s arguments by name.

    Returns:
        The normalized tensor, or ``None`` for train mode, missing running statistics, inputs
        without a channel dimension, or mixed dtypes.
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
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return x * scale.reshape(shape) + shift.reshape(shape)
