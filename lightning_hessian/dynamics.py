"""The training-dynamics quantities of one block, from what its evaluation already computed.

:func:`block_dynamics` adds to a block's report the optimizer's stability
(:mod:`lightning_hessian.stability`), the gradient geometry and the eigenvector overlap
(:mod:`lightning_hessian.geometry`) and the loss landscape (:mod:`lightning_hessian.landscape`), each
when asked for. They reuse the block's top eigenvalue and eigenvectors: the stability under an
optimizer with one step size per block costs no product at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .contractions import norm
from .geometry import eigenspace_overlap, gradient_geometry
from .landscape import loss_landscape
from .operator import HessianOperator
from .results import BlockReport
from .settings import AnalysisSettings
from .stability import stability


def wants_eigenvectors(settings: AnalysisSettings, previous_vectors: Mapping[str, Tensor] | None) -> bool:
    """Whether the analysis needs the blocks' top eigenvectors (asked for, or for a dynamics quantity)."""
    return bool(
        settings.eigenvectors
        or settings.gradient_geometry
        or settings.landscape
        or previous_vectors is not None
    )


def block_dynamics(
    block: BlockReport,
    op: HessianOperator,
    settings: AnalysisSettings,
    optimizer: Any = None,
    previous: Tensor | None = None,
) -> float:
    """Fill the block's training-dynamics fields (in place) for the quantities asked for.

    Args:
        block: The block's report, with its eigenvalues (and eigenvectors, see
            :func:`wants_eigenvectors`) already computed.
        op: The block's Hessian operator.
        settings: The analysis settings.
        optimizer: The optimizer whose stability is measured, or ``None``.
        previous: The previous evaluation's top eigenvectors of this block, or ``None``.

    Returns:
        The Hessian-vector products spent (also added to ``block.num_matvecs``).
    """
    before = block.num_matvecs
    top = block.eigenvalues
    vectors = top.vectors if top is not None else None
    if optimizer is not None:
        block.stability = stability(op, optimizer, tol=settings.tol, top=top)
        if block.stability is not None:
            block.num_matvecs += block.stability.num_matvecs
    if settings.gradient_geometry:
        block.gradient_geometry = gradient_geometry(op, vectors)
        block.num_matvecs += block.gradient_geometry.num_matvecs
    if previous is not None and vectors is not None and previous.shape[0] == vectors.shape[0]:
        block.eigenvector_overlap = eigenspace_overlap(previous, vectors, op=op)
    if settings.landscape and vectors is not None:
        directions = {f"v{i + 1}": vectors[:, i] for i in range(min(2, vectors.shape[1]))}
        gradient = op.gradient()
        if float(norm(op, gradient)) > 0:
            directions["gradient"] = gradient
        block.landscape = loss_landscape(op, directions, num_points=settings.landscape_points)
        block.num_matvecs += len(directions)
    return block.num_matvecs - before
