"""Symmetric test matrices with known spectra (float64, built from a private generator)."""

from __future__ import annotations

import torch
from torch import Tensor


def random_orthogonal(n: int, seed: int) -> Tensor:
    """A random ``[n, n]`` orthogonal matrix (float64)."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def with_spectrum(values: Tensor, seed: int = 0) -> Tensor:
    """The symmetric matrix ``Q diag(values) Q^T`` for a random orthogonal ``Q``."""
    values = torch.as_tensor(values, dtype=torch.float64)
    q = random_orthogonal(values.numel(), seed)
    matrix = (q * values) @ q.T
    return 0.5 * (matrix + matrix.T)


def uniform_spectrum(n: int, low: float, high: float, seed: int = 0) -> Tensor:
    """``n`` eigenvalues drawn uniformly from ``[low, high]``."""
    gen = torch.Generator().manual_seed(seed + 1000)
    return low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)


def spiked_wigner(n: int, spikes: list[float], seed: int = 0) -> Tensor:
    """A Wigner matrix (semicircle on ``[-2, 2]``) plus rank-one spikes of the given strengths."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, n, generator=gen, dtype=torch.float64)
    matrix = (g + g.T) / (2 * n) ** 0.5
    for strength in spikes:
        u = torch.randn(n, generator=gen, dtype=torch.float64)
        u = u / u.norm()
        matrix = matrix + strength * torch.outer(u, u)
    return 0.5 * (matrix + matrix.T)


def exact_spectrum(matrix: Tensor) -> Tensor:
    """Ascending eigenvalues in float64."""
    return torch.linalg.eigvalsh(matrix.double())


def indefinite_matrix() -> Tensor:
    """A 100 x 100 matrix with eigenvalues 6, 4, -3 over a uniform bulk on [-1, 2]."""
    values = torch.cat([torch.tensor([6.0, 4.0, -3.0], dtype=torch.float64), uniform_spectrum(97, -1.0, 2.0)])
    return with_spectrum(values, seed=1)
