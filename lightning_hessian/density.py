"""Eigenvalue density of a symmetric operator by stochastic Lanczos quadrature (SLQ).

For a unit probe ``z``, ``num_steps`` Lanczos steps give a tridiagonal ``T = V diag(theta) V^T``;
the Gauss quadrature ``sum_j V[0, j]^2 f(theta_j)`` approximates ``z^T f(A) z``, whose expectation
over Rademacher probes is ``tr f(A) / N``. Averaging over ``num_probes`` probes, the density is the
discrete measure with nodes ``theta`` (Ritz values, any sign) and weights ``V[0, j]^2 / num_probes``
(total mass 1). Its mean is exactly the average of ``z^T A z``, an unbiased estimate of ``tr(A) / N``.

All probes advance together, one ``op @ V`` product per step for the whole block; each probe's basis
is fully reorthogonalized (``num_steps`` is small). A probe whose Krylov space becomes invariant
stops early: its quadrature is then exact. With ``num_steps >= N`` the exact spectrum is computed
instead (``N`` products for the dense matrix, each eigenvalue of weight ``1 / N``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .linear_operator import (
    SymmetricOperator,
    check_int,
    dense_matrix,
    make_generator,
    operator_size,
)
from .results import SpectralDensity
from .trace import rademacher

#: Memory allowed for the Lanczos bases of one group of probes.
BASIS_BYTES = 2**30


def _exact_density(op: SymmetricOperator) -> SpectralDensity:
    """The exact spectrum as a density: every eigenvalue with weight ``1 / N``."""
    matrix, used = dense_matrix(op)
    matrix = matrix.double()
    nodes = torch.linalg.eigvalsh(0.5 * (matrix + matrix.T))
    weights = torch.full_like(nodes, 1.0 / nodes.numel())
    return SpectralDensity(nodes=nodes, weights=weights, num_matvecs=used, num_probes=0, exact=True)


def _lanczos_block(
    op: SymmetricOperator, start: Tensor, num_steps: int
) -> tuple[list[Tensor], list[Tensor], int]:
    """Run Lanczos on every column of ``start`` at once.

    Args:
        op: The operator.
        start: ``[N, p]`` unit probe vectors.
        num_steps: Most Lanczos steps per probe.

    Returns:
        ``(alphas, betas, num_matvecs)``: per probe, the diagonal (``[L]``) and off-diagonal
        (``[L - 1]``) of its tridiagonal matrix in float64, ``L <= num_steps``.
    """
    n, p = start.shape
    dtype, eps = start.dtype, torch.finfo(start.dtype).eps
    basis = torch.empty(p, num_steps, n, dtype=dtype, device=start.device)
    alphas = torch.zeros(p, num_steps, dtype=torch.float64, device=start.device)
    betas = torch.zeros(p, num_steps, dtype=torch.float64, device=start.device)
    lengths = [num_steps] * p
    active = list(range(p))  # probe id of each row of `basis`
    v, used = start, 0
    for j in range(num_steps):
        basis[:, j] = v.T
        w = (op @ v[:, 0]).to(dtype).unsqueeze(1) if v.shape[1] == 1 else (op @ v).to(dtype)
        used += v.shape[1]
        norms = w.norm(dim=0).double()
        alpha = torch.zeros(len(active), dtype=torch.float64, device=start.device)
        wt = w.T.contiguous().unsqueeze(1)  # [p, 1, N]
        for _ in range(2):  # full reorthogonalization of each probe against its own basis
            coef = torch.bmm(wt, basis[:, : j + 1].transpose(1, 2))  # [p, 1, j + 1]
            wt = wt - torch.bmm(coef, basis[:, : j + 1])
            alpha += coef[:, 0, j].double()
        w = wt.squeeze(1).T.contiguous()
        beta = w.norm(dim=0).double()
        ids = torch.tensor(active, device=start.device)
        alphas[ids, j] = alpha
        betas[ids, j] = beta
        if j + 1 == num_steps:
            break
        keep = beta > 10 * eps * math.sqrt(j + 2) * norms
        if not bool(keep.all()):  # invariant Krylov spaces: those probes are exact and stop
            for row in (~keep).nonzero().flatten().tolist():
                lengths[active[row]] = j + 1
            idx = keep.nonzero().flatten()
            active = [active[i] for i in idx.tolist()]
            if not active:
                break
            basis, w, beta = basis[idx], w[:, idx], beta[idx]
        v = w / beta.to(dtype)
    a_list = [alphas[i, : lengths[i]] for i in range(p)]
    b_list = [betas[i, : lengths[i] - 1] for i in range(p)]
    return a_list, b_list, used


def _quadrature(alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Nodes and weights of the Gauss quadrature of one tridiagonal matrix (float64)."""
    t = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    nodes, vecs = torch.linalg.eigh(t)
    return nodes, vecs[0].pow(2)


def spectral_density(
    op: SymmetricOperator,
    num_probes: int = 8,
    num_steps: int = 40,
    *,
    seed: int = 0,
) -> SpectralDensity:
    """Eigenvalue density of a symmetric operator by stochastic Lanczos quadrature.

    See the module docstring. Uses ``num_probes * num_steps`` products at most (fewer when a
    probe's Krylov space is exhausted early), advanced as one block per step.

    Args:
        op: Symmetric operator with ``shape (N, N)``, ``dtype``, ``device`` and ``op @ V``.
        num_probes: Random Rademacher probes averaged (more: less variance).
        num_steps: Lanczos steps per probe (more: finer resolution; ``>= N`` gives the exact
            spectrum from the dense matrix).
        seed: Seed of the private random generator for the probes.

    Returns:
        A :class:`~lightning_hessian.results.SpectralDensity` with ``nodes`` (ascending, float64),
        ``weights`` (summing to 1), ``num_matvecs``, ``num_probes`` and ``exact``.

    Raises:
        TypeError: If ``op`` is not an operator or an integer argument is not an integer.
        ValueError: If ``op`` is not square or ``num_probes``/``num_steps`` is below 1.

    Example:
        >>> from lightning_hessian.linear_operator import MatrixOperator
        >>> op = MatrixOperator(torch.diag(torch.linspace(-1.0, 1.0, 50, dtype=torch.float64)))
        >>> density = spectral_density(op, num_probes=4, num_steps=10, seed=0)
        >>> round(float(density.weights.sum()), 12)
        1.0
    """
    n = operator_size(op)
    num_probes = check_int("num_probes", num_probes, 1, "Use at least one random probe.")
    num_steps = check_int("num_steps", num_steps, 1, "Use at least one Lanczos step.")
    gen = make_generator(op.device, seed)
    if num_steps >= n:
        return _exact_density(op)
    dtype = op.dtype if op.dtype.is_floating_point else torch.float32
    itemsize = torch.empty((), dtype=dtype).element_size()
    group = max(1, min(num_probes, BASIS_BYTES // max(1, n * num_steps * itemsize)))
    probes = rademacher(n, num_probes, gen, dtype, op.device) / math.sqrt(n)
    nodes, weights, used = [], [], 0
    for first in range(0, num_probes, group):
        block = probes[:, first : first + group].contiguous()
        alphas, betas, spent = _lanczos_block(op, block, num_steps)
        used += spent
        for alpha, beta in zip(alphas, betas, strict=True):
            node, weight = _quadrature(alpha, beta)
            nodes.append(node)
            weights.append(weight / num_probes)
    all_nodes = torch.cat(nodes)
    order = torch.argsort(all_nodes)
    return SpectralDensity(
        nodes=all_nodes[order],
        weights=torch.cat(weights)[order],
        num_matvecs=used,
        num_probes=num_probes,
        exact=False,
    )
