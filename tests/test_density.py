from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lightning_hessian.density as density_module
from lightning_hessian.density import spectral_density
from lightning_hessian.linear_operator import MatrixOperator
from lightning_hessian.probes import make_generator, rademacher
from tests.helpers import cross_entropy_loss
from tests.spectra import exact_spectrum, indefinite_matrix, uniform_spectrum, with_spectrum


@pytest.fixture(scope="module")
def indefinite() -> torch.Tensor:
    return indefinite_matrix()


def probes_of(n: int, num_probes: int, seed: int) -> torch.Tensor:
    """The probes spectral_density draws for a float64 operator (same generator, same order)."""
    return rademacher(n, num_probes, make_generator("cpu", seed), torch.float64, torch.device("cpu"))


def orthonormal_probes(n: int, num_probes: int, seed: int) -> torch.Tensor:
    """The orthonormalized probe block ``S`` of spectral_density (up to column signs)."""
    return torch.linalg.qr(probes_of(n, num_probes, seed)).Q


def test_mass_one_and_mean_is_the_probe_blocks_rayleigh_quotient(indefinite: torch.Tensor) -> None:
    op = MatrixOperator(indefinite)
    result = spectral_density(op, num_probes=4, num_steps=12, seed=3)
    assert result.weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert bool((result.weights >= 0).all())
    assert result.nodes.shape == result.weights.shape == (48,)
    assert result.num_matvecs == 48 == op.num_matvecs
    assert result.num_probes == 4 and not result.exact
    # sum_i w_i theta_i = tr(S^T A S) / p for the orthonormalized probe block S.
    block = orthonormal_probes(100, 4, seed=3)
    assert result.mean == pytest.approx(float(torch.trace(block.T @ indefinite @ block)) / 4, rel=1e-10)


@pytest.mark.parametrize("num_steps", [1, 3, 5])
def test_block_quadrature_is_exact_for_polynomials_below_twice_the_steps(
    indefinite: torch.Tensor, num_steps: int
) -> None:
    result = spectral_density(MatrixOperator(indefinite), num_probes=3, num_steps=num_steps, seed=4)
    block = orthonormal_probes(100, 3, seed=4)
    scaled = indefinite / 6.0  # keeps the moments of order up to 9 near 1
    for degree in range(2 * num_steps):
        exact = torch.trace(block.T @ torch.linalg.matrix_power(scaled, degree) @ block) / 3
        quadrature = (result.weights * (result.nodes / 6.0).pow(degree)).sum()
        assert float(quadrature) == pytest.approx(float(exact), rel=1e-9, abs=1e-12), degree
    if num_steps > 1:  # beyond 2 * steps - 1 the quadrature is no longer exact
        degree = 2 * num_steps
        exact = torch.trace(block.T @ torch.linalg.matrix_power(scaled, degree) @ block) / 3
        quadrature = (result.weights * (result.nodes / 6.0).pow(degree)).sum()
        assert abs(float(quadrature - exact)) > 1e-9


def test_mean_is_trace_over_n_in_expectation(indefinite: torch.Tensor) -> None:
    result = spectral_density(MatrixOperator(indefinite), num_probes=400, num_steps=2, seed=0)
    true = float(torch.trace(indefinite)) / 100
    # Rademacher quadratic forms: Var(z^T A z) = 2 (||A||_F^2 - sum a_ii^2); per-probe mean divides by N.
    var = 2 * (indefinite.pow(2).sum() - indefinite.diagonal().pow(2).sum()) / 100**2
    stderr = math.sqrt(float(var) / 400)
    assert abs(result.mean - true) < 4 * stderr


def test_negative_and_extreme_eigenvalues_are_resolved(indefinite: torch.Tensor) -> None:
    exact = exact_spectrum(indefinite)
    result = spectral_density(MatrixOperator(indefinite), num_probes=3, num_steps=25, seed=0)
    assert result.nodes.min().item() == pytest.approx(-3.0, abs=1e-3)
    assert result.nodes.max().item() == pytest.approx(6.0, abs=1e-3)
    # Ritz values lie inside the spectrum.
    assert exact[0] - 1e-9 <= result.nodes.min() and result.nodes.max() <= exact[-1] + 1e-9
    # Mass below zero close to the true fraction of negative eigenvalues.
    negative = float(result.weights[result.nodes < 0].sum())
    assert negative == pytest.approx(float((exact < 0).double().mean()), abs=0.15)


def test_enough_steps_give_the_exact_spectrum(indefinite: torch.Tensor) -> None:
    small = indefinite[:12, :12]
    result = spectral_density(MatrixOperator(small), num_probes=3, num_steps=12)
    assert result.exact and result.num_probes == 0
    torch.testing.assert_close(result.nodes, exact_spectrum(small))
    torch.testing.assert_close(result.weights, torch.full((12,), 1 / 12, dtype=torch.float64))


def test_invariant_krylov_space_stops_early_with_exact_nodes() -> None:
    # Three distinct eigenvalues: every probe's Krylov space is exhausted after three steps.
    values = torch.tensor([-1.0] * 20 + [0.5] * 30 + [2.0] * 10, dtype=torch.float64)
    op = MatrixOperator(with_spectrum(values, seed=2))
    result = spectral_density(op, num_probes=5, num_steps=10, seed=1)
    assert result.num_matvecs == 15 == op.num_matvecs
    distinct = torch.unique(torch.round(result.nodes, decimals=8))
    torch.testing.assert_close(distinct, torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64))
    mass = [float(result.weights[(result.nodes - v).abs() < 1e-6].sum()) for v in (-1.0, 0.5, 2.0)]
    assert mass == pytest.approx([1 / 3, 1 / 2, 1 / 6], abs=0.15)


def test_groups_of_one_probe_are_classical_slq(indefinite: torch.Tensor, monkeypatch) -> None:
    monkeypatch.setattr(density_module, "BASIS_BYTES", 1)  # forces groups of one probe
    alone = spectral_density(MatrixOperator(indefinite), num_probes=4, num_steps=8, seed=5)
    assert alone.nodes.shape == (32,) and alone.num_matvecs == 32
    assert alone.weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    # Each probe's own quadrature has mean z^T A z / z^T z; the density averages the four.
    z = probes_of(100, 4, seed=5)
    rayleigh = ((z * (indefinite @ z)).sum(0) / (z * z).sum(0)).mean()
    assert alone.mean == pytest.approx(float(rayleigh), rel=1e-10)


def test_block_quadrature_resolves_the_spectrum_better_than_separate_probes(monkeypatch) -> None:
    values = torch.cat([torch.tensor([9.0, 7.0, 5.0]), uniform_spectrum(397, -1.0, 1.0)])
    matrix = with_spectrum(values.double(), seed=6)
    exact = exact_spectrum(matrix)

    def w1(result) -> float:  # Wasserstein-1 distance of two measures on the line, by CDFs
        points, _ = torch.sort(torch.cat([exact, result.nodes]))
        cdf_exact = torch.searchsorted(exact, points, right=True).double() / exact.numel()
        cum = torch.cat([torch.zeros(1, dtype=torch.float64), result.weights.cumsum(0)])
        cdf_est = cum[torch.searchsorted(result.nodes, points, right=True)]
        return float(((cdf_exact - cdf_est).abs()[:-1] * points.diff()).sum())

    def errors() -> list[float]:
        op = MatrixOperator(matrix)
        return [w1(spectral_density(op, num_probes=8, num_steps=10, seed=s)) for s in range(5)]

    block = errors()
    monkeypatch.setattr(density_module, "BASIS_BYTES", 1)
    alone = errors()
    assert sum(block) < 0.7 * sum(alone), (block, alone)


def test_float32_same_seed_same_result_and_global_rng_untouched(indefinite: torch.Tensor) -> None:
    op32 = MatrixOperator(indefinite.float())
    state = torch.get_rng_state()
    a = spectral_density(op32, num_probes=3, num_steps=10, seed=9)
    b = spectral_density(op32, num_probes=3, num_steps=10, seed=9)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.nodes.dtype == torch.float64
    assert torch.equal(a.nodes, b.nodes) and torch.equal(a.weights, b.weights)
    assert a.weights.sum().item() == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_probes": 0}, ValueError, "`num_probes` must be >= 1"),
        ({"num_steps": 0}, ValueError, "`num_steps` must be >= 1"),
        ({"num_steps": 2.0}, TypeError, "`num_steps` must be an integer"),
        ({"seed": None}, TypeError, "`seed` must be an integer"),
    ],
)
def test_bad_arguments_rejected_before_any_product(kwargs, error, match) -> None:
    op = MatrixOperator(torch.eye(6, dtype=torch.float64))
    with pytest.raises(error, match=match):
        spectral_density(op, **kwargs)
    assert op.num_matvecs == 0


def test_hessian_operator_of_a_small_model() -> None:
    from lightning_hessian.operator import HessianOperator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    gen = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(40, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (40,), generator=gen))
    ]
    op = HessianOperator(model, cross_entropy_loss, data, hvp="reverse-over-reverse")
    exact = exact_spectrum(op.to_dense())
    n = exact.numel()
    result = spectral_density(op, num_probes=3, num_steps=15, seed=0)
    assert result.weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert result.nodes.max().item() == pytest.approx(float(exact[-1]), rel=1e-6)
    assert result.nodes.min().item() == pytest.approx(float(exact[0]), abs=1e-3 * float(exact.abs().max()))
    full = spectral_density(op, num_probes=1, num_steps=n)
    torch.testing.assert_close(full.nodes, exact, atol=1e-10, rtol=0)
