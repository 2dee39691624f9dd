"""Where the gradient points relative to the curvature, and how the top eigenspace moves.

- **Gradient alignment** ``||V_kᵀ g||² / ||g||²``: the share of the gradient in the top-``k``
  eigenspace; Gur-Ari, Roberts & Dyer (2018), "Gradient descent happens in a tiny subspace", found it
  close to 1 for most of training.
- **Curvature along the gradient** ``gᵀ H g / gᵀ g``: the sharpness the gradient step actually meets
  (at most the top eigenvalue).
- **Batch sharpness** ``mean_b g_bᵀ H_b g_b / ||g_b||²`` over the evaluation batches: the curvature
  each mini-batch step meets on its own batch's loss; Andreyev & Beneventano (2024), "Edge of
  stochastic stability", found that it, not the full-batch sharpness, settles at ``2 / lr`` under SGD.
- **Eigenvector overlap** ``||V_prevᵀ V_now||_F² / k``: 1 when the top-``k`` eigenspace did not move
  between two evaluations, about ``k / N`` for unrelated random spaces.

Cost: one first-order pass per batch (the batch gradients, reused for the full gradient), one product
of the full operator and one single-batch product per batch: about two products' worth in all, one
when all the data is one batch (full-batch training: the two products are the same).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .contractions import dot, inner, is_sharded, local_rows, orthonormalize
from .operator import HessianOperator
from .results import GradientGeometry


def gradient_geometry(op: HessianOperator, eigenvectors: Tensor | None = None) -> GradientGeometry:
    """Gradient alignment with the top eigenspace, curvature along the gradient and batch sharpness.

    Under ``torch.distributed`` the gradient and the product are those of the loss over all ranks,
    and the batch sharpness averages over every rank's batches. For a sharded operator
    (:class:`~lightning_hessian.sharded.ShardedHessianOperator`) ``eigenvectors`` are this rank's
    rows, and each batch's sharpness takes passes of its own
    (:meth:`~lightning_hessian.sharded.ShardedHessianOperator.batch_sharpness`).

    Args:
        op: The Hessian operator (of the whole model or of one block, :meth:`HessianOperator.restrict`).
        eigenvectors: ``[N, k]`` top eigenvectors of ``op`` (orthonormalized here); ``None`` leaves
            the alignment out.

    Returns:
        A :class:`~lightning_hessian.results.GradientGeometry`.

    Raises:
        ValueError: If ``eigenvectors`` is not ``[N, k]``.
        NonFiniteHessianError: If the gradient or a product is not finite (on any rank).

    Example:
        >>> geometry = gradient_geometry(op, lh.eigenvalues(op, 3, return_vectors=True).vectors)
        >>> geometry.alignment, geometry.curvature, geometry.batch_sharpness  # doctest: +SKIP
    """
    n = op.shape[0]
    rows = local_rows(op)
    if eigenvectors is not None and (eigenvectors.ndim != 2 or eigenvectors.shape[0] != rows):
        raise ValueError(f"`eigenvectors` must be [N={rows}, k], got {tuple(eigenvectors.shape)}.")
    if is_sharded(op):
        gradient = op.gradient()
        sharpness, batches = op.batch_sharpness()
        matvecs = 1.0 + batches * 1.5 / max(1, op.num_batches)  # a batch pass: 1/B of a full one
        return _geometry(op, gradient, sharpness, batches, eigenvectors, matvecs)

    def local_batches() -> Tensor:
        """[N + 2]: this rank's weighted gradient, summed batch sharpness and batch count."""
        gradient = torch.zeros(n, dtype=op.dtype, device=op.device)
        sharpness = 0.0
        for index in range(op.num_batches):
            single = op.for_batch(index)
            batch_gradient = single.gradient()
            gradient += op.closure.weight(index, op.num_samples) * batch_gradient
            squared = float(batch_gradient @ batch_gradient)
            if squared > 0:
                sharpness += float(batch_gradient @ (single @ batch_gradient)) / squared
        counts = torch.tensor([sharpness, op.num_batches], dtype=op.dtype, device=op.device)
        return torch.cat([gradient, counts])

    summed = op.agreed_all_reduce(local_batches, (n + 2,), what="The batch gradients")
    gradient, sharpness, batches = summed[:n], float(summed[n]), int(round(float(summed[n + 1])))
    # 2.0: the full product, and one single-batch product per batch
    return _geometry(op, gradient, sharpness, batches, eigenvectors, 2.0)


def _geometry(
    op: HessianOperator,
    gradient: Tensor,
    sharpness: float,
    batches: int,
    eigenvectors: Tensor | None,
    matvecs: float,
) -> GradientGeometry:
    """Alignment and curvature from the gradient; the result with the batch sharpness."""
    squared = float(dot(op, gradient, gradient))
    if batches == 1:  # one batch in all: g is g_b and H is H_b, so the curvature is that batch's
        curvature, matvecs = sharpness, 1.0
    else:
        curvature = float(dot(op, gradient, op @ gradient)) / squared if squared > 0 else 0.0
    alignment = None
    if eigenvectors is not None:
        basis = orthonormalize(op, eigenvectors.to(device=op.device, dtype=op.dtype))[0]
        alignment = float(inner(op, basis, gradient).square().sum()) / squared if squared > 0 else 0.0
    return GradientGeometry(
        gradient_norm=squared**0.5,
        alignment=alignment,
        curvature=curvature,
        batch_sharpness=sharpness / max(1, batches),
        num_batches=batches,
        num_matvecs=matvecs,
    )


def eigenspace_overlap(previous: Tensor, current: Tensor, *, op: Any = None) -> float:
    """How much of the current top eigenspace the previous one held: ``||P̂ᵀ Ĉ||_F² / k``.

    Both bases are orthonormalized first, so any basis of the same space gives the same value.

    Args:
        previous: ``[N, k_prev]`` eigenvectors of the previous evaluation.
        current: ``[N, k]`` eigenvectors of this one.
        op: The operator the vectors belong to, needed only when they are sharded (this rank's rows
            of them, :class:`~lightning_hessian.sharded.ShardedHessianOperator`).

    Returns:
        A value in ``[0, 1]``: 1 for the same space, 0 for orthogonal spaces (``k`` is the larger of the
        two column counts).

    Raises:
        ValueError: If the two do not have the same number of rows.

    Example:
        >>> basis = torch.linalg.qr(torch.randn(10, 3))[0]
        >>> round(eigenspace_overlap(basis, basis @ torch.linalg.qr(torch.randn(3, 3))[0]), 6)
        1.0
    """
    if previous.ndim != 2 or current.ndim != 2 or previous.shape[0] != current.shape[0]:
        raise ValueError(
            f"Eigenvector bases must be [N, k] with the same N, got {tuple(previous.shape)} and "
            f"{tuple(current.shape)}."
        )
    dtype = torch.promote_types(torch.promote_types(previous.dtype, current.dtype), torch.float32)
    if op is not None and is_sharded(op):
        p = orthonormalize(op, previous.to(device=current.device, dtype=dtype))[0]
        c = orthonormalize(op, current.to(dtype))[0]
        k = max(previous.shape[1], current.shape[1])
        return min(1.0, float(inner(op, p, c).square().sum()) / k)
    p = torch.linalg.qr(previous.to(device=current.device, dtype=dtype))[0]
    c = torch.linalg.qr(current.to(dtype))[0]
    k = max(p.shape[1], c.shape[1])
    return min(1.0, float((p.T @ c).square().sum()) / k)
