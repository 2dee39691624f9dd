"""The loss along a few directions through the current parameters, against its quadratic model.

Along a unit direction ``d`` the loss is ``L(θ + t d) ≈ L(θ) + t gᵀd + ½ t² dᵀHd``. Along the top
eigenvector the quadratic term is ``½ λ₁ t²``; where the measured loss leaves that parabola, the
quadratic model behind every curvature number (and behind the edge of stability) stops holding.

The default range of ``t`` for a direction of curvature ``c`` is ``±sqrt(2 max(L, 1e-3) / |c|)``:
where the quadratic term alone would add the current loss (so the picture shows the parabola's scale
whatever the loss' units), and ``±1`` where ``c`` is 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from .contractions import dot, local_rows, norm
from .errors import NonFiniteHessianError
from .operator import HessianOperator
from .results import Landscape
from .validation import check_int

#: Floor of the loss in the default range, so a loss near 0 still gives a visible range.
LOSS_FLOOR = 1e-3


def default_radius(loss: float, curvature: float) -> float:
    """Half-width of the range of step lengths for a direction of the given curvature.

    Args:
        loss: The loss at the current parameters.
        curvature: ``dᵀ H d`` of the unit direction.

    Returns:
        ``sqrt(2 max(|loss|, 1e-3) / |curvature|)``, or 1 for zero curvature.

    Example:
        >>> default_radius(0.5, 4.0)
        0.5
    """
    if curvature == 0 or not math.isfinite(curvature):
        return 1.0
    return math.sqrt(2 * max(abs(loss), LOSS_FLOOR) / abs(curvature))


def loss_landscape(
    op: HessianOperator,
    directions: Mapping[str, Tensor],
    *,
    num_points: int = 21,
    radius: float | None = None,
) -> Landscape:
    """The loss on the operator's batches along each direction, with its quadratic model.

    Forward passes only: each point is one loss evaluation over all batches (and ranks), under the
    same state and RNG guarantees as every product; the model is never modified. Each direction's
    curvature ``dᵀHd`` costs one product and its slope ``gᵀd`` one gradient in all.

    Args:
        op: The Hessian operator at the current parameters.
        directions: ``{name: [N] direction}`` (normalized here), e.g. ``{"v1": top eigenvector,
            "gradient": g}``.
        num_points: Points per direction (odd numbers include ``t = 0``).
        radius: Half-width of the range of step lengths; default per direction from its curvature
            (see :func:`default_radius`).

    Returns:
        A :class:`~lightning_hessian.results.Landscape`.

    Raises:
        ValueError: For a direction of the wrong shape or zero norm, or ``num_points < 3``.
        NonFiniteHessianError: If a product or the gradient is not finite (a non-finite loss along a
            direction is recorded, not raised: it is what the landscape shows).

    Example:
        >>> top = lh.eigenvalues(op, 1, return_vectors=True).vectors[:, 0]
        >>> landscape = loss_landscape(op, {"v1": top})
        >>> landscape.losses["v1"], landscape.quadratic_model("v1")  # doctest: +SKIP
    """
    num_points = check_int("num_points", num_points, 3, "Use at least 3 points per direction, e.g. 21.")
    if radius is not None and not (isinstance(radius, int | float) and radius > 0 and math.isfinite(radius)):
        raise ValueError(f"`radius` must be a positive number or None, got {radius!r}.")
    n = local_rows(op)  # N, or this rank's rows of a sharded operator's vectors
    units: dict[str, Tensor] = {}
    for name, direction in directions.items():
        if direction.shape != (n,):
            raise ValueError(f"Direction {name!r} must have shape [{n}], got {tuple(direction.shape)}.")
        direction = direction.to(device=op.device, dtype=op.dtype)
        length = float(norm(op, direction))
        if not length > 0 or not math.isfinite(length):
            raise ValueError(f"Direction {name!r} has norm {length}; pass a nonzero, finite direction.")
        units[name] = direction / length
    loss = op.loss()
    gradient = op.gradient()
    offsets, losses, curvatures, slopes = {}, {}, {}, {}
    forward = 1
    for name, unit in units.items():
        curvature = float(dot(op, unit, op @ unit))
        half_width = radius if radius is not None else default_radius(loss, curvature)
        steps = torch.linspace(-1.0, 1.0, num_points, dtype=torch.float64) * half_width
        if num_points % 2:
            steps[num_points // 2] = 0.0  # exactly: the centre is the loss already known
        values = []
        for t in steps.tolist():
            values.append(loss if t == 0 else _loss_or_nan(op, t * unit))
            forward += t != 0
        offsets[name] = steps
        losses[name] = torch.tensor(values, dtype=torch.float64)
        curvatures[name] = curvature
        slopes[name] = float(dot(op, gradient, unit))
    return Landscape(offsets, losses, curvatures, slopes, loss, forward)


def _loss_or_nan(op: HessianOperator, displacement: Tensor) -> float:
    try:
        return op.loss(displacement)
    except NonFiniteHessianError:
        return float("nan")
