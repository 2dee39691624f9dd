"""One block Krylov space for eigenvalues, density and trace, against exact spectra."""

from __future__ import annotations

import math

import pytest
import torch

import lightning_hessian.shared_space as shared_space
from lightning_hessian.errors import HessianTooLargeError
from lightning_hessian.linear_operator import MatrixOperator
from lightning_hessian.shared_space import shared_space_estimates
from tests.spectra import with_spectrum


def hessian_like(n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A few outliers above a bulk near zero with a negative tail, like a network's Hessian."""
    generator = torch.Generator().manual_seed(seed)
    bulk = 0.05 * torch.randn(n - 5, generator=generator, dtype=torch.float64) - 0.02
    values = torch.cat([torch.tensor([9.0, 6.0, 5.0, 3.0, -0.8], dtype=torch.float64), bulk]).sort().values
    return with_spectrum(values, seed), values


def test_extreme_eigenvalues_are_converged_within_the_tolerance():
    matrix, values = hessian_like()
    tol = 1e-6
    result = shared_space_estimates(MatrixOperator(matrix), top_k=3, tol=tol, max_steps=60, seed=1)
    scale = float(values.abs().max())
    assert bool(result.eigenvalues.converged.all()) and bool(result.min_eigenvalue.converged.all())
    torch.testing.assert_close(result.eigenvalues.values, values.flip(0)[:3], rtol=0, atol=tol * scale)
    torch.testing.assert_close(result.min_eigenvalue.values, values[:1], rtol=0, atol=tol * scale)
    assert torch.all(result.eigenvalues.residuals <= tol * scale)


def test_counts_every_product_at_the_operator():
    matrix, _ = hessian_like()
    op = MatrixOperator(matrix)
    result = shared_space_estimates(op, top_k=2, seed=0)
    assert result.num_matvecs == op.num_matvecs


def test_density_is_block_gauss_quadrature_over_the_probes():
    matrix = hessian_like(60)[0]
    op = MatrixOperator(matrix)
    steps, probes = 5, 3
    result = shared_space_estimates(
        op,
        top_k=0,
        min_eigenvalue=False,
        trace=False,
        num_probes=probes,
        min_steps=steps,
        max_steps=steps,
        seed=2,
    )
    generator = shared_space.make_generator("cpu", 2)
    s = shared_space.rademacher(60, probes, generator, torch.float64, torch.device("cpu"))
    s, _ = torch.linalg.qr(s)
    nodes, weights = result.density.nodes, result.density.weights
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
    for degree in range(2 * steps):  # exact for polynomials of degree below 2 * steps
        exact = float(torch.trace(s.T @ torch.linalg.matrix_power(matrix, degree) @ s)) / probes
        assert float((weights * nodes**degree).sum()) == pytest.approx(exact, rel=1e-8, abs=1e-10)


def test_krylov_aware_trace_is_exact_once_the_space_is_everything():
    matrix, values = hessian_like(40)
    result = shared_space_estimates(MatrixOperator(matrix), num_probes=4, min_steps=10, max_steps=10, seed=0)
    assert result.trace.value == pytest.approx(float(values.sum()), abs=1e-9)
    assert result.trace.stderr == 0.0 and result.trace.num_matvecs == 0


def test_krylov_aware_trace_is_unbiased_and_its_stderr_calibrated():
    matrix, values = hessian_like(300)
    true = float(values.sum())
    z = []
    for seed in range(40):
        result = shared_space_estimates(
            MatrixOperator(matrix),
            top_k=1,
            min_eigenvalue=False,
            density=False,
            max_steps=3,
            min_steps=3,
            trace_probes=12,
            seed=seed,
            tol=1e-12,
        )
        z.append((result.trace.value - true) / result.trace.stderr)
    z = torch.tensor(z)
    assert abs(float(z.mean())) < 0.5  # unbiased: mean of 40 standardized errors
    assert 0.6 < math.sqrt(float((z**2).mean())) < 1.5  # the standard error is the error's scale


@pytest.mark.parametrize("density", [True, False])  # without density: one random probe beside them
def test_warm_and_cold_starts_agree_within_the_tolerance(density):
    matrix, values = hessian_like()
    op = MatrixOperator(matrix)
    cold = shared_space_estimates(
        op, top_k=3, tol=1e-6, max_steps=60, seed=0, keep_vectors=3, density=density
    )
    warm = shared_space_estimates(
        op, top_k=3, tol=1e-6, max_steps=60, seed=1, start_vectors=cold.vectors, density=density
    )
    scale = float(values.abs().max())
    torch.testing.assert_close(warm.eigenvalues.values, cold.eigenvalues.values, rtol=0, atol=2e-6 * scale)
    if density:  # the same block steps, the warm vectors beside the probes
        assert warm.num_steps <= cold.num_steps
    else:  # one chain, one vector per step: compare products
        assert warm.num_matvecs < cold.num_matvecs


@pytest.mark.parametrize("density", [True, False])
def test_a_new_eigenvalue_that_overtakes_the_previous_top_is_found_with_a_warm_start(density):
    matrix, values = hessian_like()
    before = shared_space_estimates(
        MatrixOperator(matrix), top_k=3, tol=1e-6, max_steps=60, seed=0, keep_vectors=3
    )
    # A new direction, orthogonal to the previous top eigenvectors, with a larger eigenvalue.
    generator = torch.Generator().manual_seed(7)
    u = torch.randn(matrix.shape[0], generator=generator, dtype=torch.float64)
    v = before.vectors
    u = u - v @ (v.T @ u)
    u = u / u.norm()
    changed = matrix + 20.0 * torch.outer(u, u)
    exact = torch.linalg.eigvalsh(changed).flip(0)[:3]
    after = shared_space_estimates(
        MatrixOperator(changed), top_k=3, tol=1e-6, max_steps=60, seed=1, start_vectors=v, density=density
    )
    torch.testing.assert_close(after.eigenvalues.values, exact, rtol=0, atol=1e-5 * float(exact[0]))


def top_only(op: MatrixOperator, tol: float, seed: int, **kwargs) -> shared_space.SharedSpaceResult:
    """The top 3 alone, without density, stopping from the first step on (as ``analyze`` runs it)."""
    return shared_space_estimates(
        op,
        top_k=3,
        min_eigenvalue=False,
        density=False,
        trace=False,
        tol=tol,
        min_steps=1,
        seed=seed,
        **kwargs,
    )


def with_new_direction(matrix: torch.Tensor, old: torch.Tensor, value: float, seed: int) -> torch.Tensor:
    """``matrix`` plus a rank-one term that puts an eigenvalue near ``value`` along a random direction
    orthogonal to the columns of ``old``."""
    u = torch.randn(matrix.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for _ in range(2):
        u = u - old @ (old.T @ u)
    u = u / u.norm()
    return matrix + (value - float(u @ matrix @ u)) * torch.outer(u, u)


@pytest.mark.parametrize("tol", [1e-3, 1e-6])
def test_warm_and_cold_starts_without_density_match_the_exact_top_after_the_spectrum_moved(tol):
    matrix, _ = hessian_like()
    kept = top_only(MatrixOperator(matrix), tol, seed=0, keep_vectors=3).vectors
    noise = torch.randn(300, 300, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    moved = matrix + 0.1 * (noise + noise.T) / 2  # the kept vectors are now only moderately good
    exact = torch.linalg.eigvalsh(moved).flip(0)[:3]
    cold = top_only(MatrixOperator(moved), tol, seed=1)
    warm = top_only(MatrixOperator(moved), tol, seed=1, start_vectors=kept)
    threshold = tol * float(exact[0])
    for result in (cold, warm):
        assert bool(result.eigenvalues.converged.all())
        assert torch.all(result.eigenvalues.residuals <= result.eigenvalues.tol)
        torch.testing.assert_close(result.eigenvalues.values, exact, rtol=0, atol=threshold)
    torch.testing.assert_close(warm.eigenvalues.values, cold.eigenvalues.values, rtol=0, atol=threshold)
    assert warm.num_matvecs < cold.num_matvecs


# 29 is far above the old top 9, 9.3 just above it, 5.5 between the old second (6) and third (5),
# 5.05 just above the old third (by 5.5 times the residual threshold 0.009).
@pytest.mark.parametrize("value", [29.0, 9.3, 5.5, 5.05])
def test_a_new_eigenvalue_entering_the_top_is_found_with_a_warm_start_without_density(value):
    """The old vectors stay exact eigenvectors, so they converge at once: only the random part of
    the start can reveal the new direction (NOTE [Warm start without density])."""
    matrix, _ = hessian_like()
    tol = 1e-3
    kept = top_only(MatrixOperator(matrix), tol, seed=0, keep_vectors=3).vectors
    for seed in range(10):
        changed = with_new_direction(matrix, kept, value, seed)
        exact = torch.linalg.eigvalsh(changed).flip(0)[:3]
        warm = top_only(MatrixOperator(changed), tol, seed=seed + 1, start_vectors=kept)
        assert bool(warm.eigenvalues.converged.all())
        torch.testing.assert_close(warm.eigenvalues.values, exact, rtol=0, atol=tol * float(exact[0]))


@pytest.mark.parametrize("top", [(9.0, 9.0, 5.0, 3.0), (9.0, 9.0, 9.0, 3.0)])
def test_a_warm_start_keeps_the_copies_of_a_repeated_eigenvalue_that_its_vectors_carry(top):
    generator = torch.Generator().manual_seed(0)
    bulk = 0.05 * torch.randn(295, generator=generator, dtype=torch.float64) - 0.02
    values = torch.cat([torch.tensor([*top, -0.8], dtype=torch.float64), bulk]).sort().values
    op = MatrixOperator(with_spectrum(values, 0))
    tol = 1e-3
    cold = top_only(op, tol, seed=0, keep_vectors=3)
    warm = top_only(op, tol, seed=1, start_vectors=cold.vectors)
    exact = values.flip(0)[:3]
    for result in (cold, warm):
        torch.testing.assert_close(result.eigenvalues.values, exact, rtol=0, atol=tol * float(exact[0]))


def test_a_basis_that_cannot_fit_is_refused_before_allocating(monkeypatch):
    monkeypatch.setattr(shared_space, "available_memory", lambda device: 1000)
    matrix, _ = hessian_like(100)
    op = MatrixOperator(matrix)
    with pytest.raises(
        HessianTooLargeError, match=r"Krylov basis needs .* GB \(100 parameters x .*`density_steps`"
    ):
        shared_space_estimates(op, seed=0)
    assert op.num_matvecs == 0


def test_bad_arguments_are_refused():
    op = MatrixOperator(torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="`max_steps` must be >= 8"):
        shared_space_estimates(op, max_steps=3)
    with pytest.raises(ValueError, match=r"`start_vectors` must be \[N=5, w\]"):
        shared_space_estimates(op, start_vectors=torch.zeros(4, 2))
    with pytest.raises(TypeError, match="`tol` must be a number"):
        shared_space_estimates(op, tol="small")
