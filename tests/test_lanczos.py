from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from lightning_hessian.lanczos import HessianConvergenceWarning, eigenvalues
from lightning_hessian.linear_operator import MatrixOperator
from tests.helpers import cross_entropy_loss
from tests.spectra import exact_spectrum, spiked_wigner, uniform_spectrum, with_spectrum


def top(spectrum: torch.Tensor, k: int) -> torch.Tensor:
    return spectrum.flip(0)[:k]


def assert_close_to_exact(result, expected: torch.Tensor, scale: float) -> None:
    """Every value within the residual tolerance the result reports (|theta - lambda| <= residual)."""
    assert result.values.dtype == torch.float64
    assert result.all_converged
    err = (result.values - expected).abs()
    assert bool((err <= result.residuals + 1e-12 * scale).all()), (result.values, expected)
    assert bool((err <= 1e-4 * scale).all())


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_random_symmetric_matches_dense_spectrum(which: str) -> None:
    values = uniform_spectrum(200, -3.0, 5.0, seed=1)
    matrix = with_spectrum(values, seed=1)
    exact = exact_spectrum(matrix)
    op = MatrixOperator(matrix)
    k = 5 if which == "largest" else 1
    result = eigenvalues(op, k=k, which=which)
    expected = top(exact, k) if which == "largest" else exact[:k]
    assert_close_to_exact(result, expected, scale=5.0)
    assert result.num_matvecs == op.num_matvecs
    assert result.which == which
    assert result.tol == pytest.approx(1e-4 * float(exact.abs().max()), rel=1e-6)
    assert result.vectors is None


def test_spiked_matrix_top_values_and_ordering() -> None:
    matrix = spiked_wigner(300, [8.0, 6.0, 4.0, 3.0], seed=2)
    exact = exact_spectrum(matrix)
    result = eigenvalues(MatrixOperator(matrix), k=5)
    assert_close_to_exact(result, top(exact, 5), scale=float(exact.abs().max()))
    assert bool((result.values[:-1] >= result.values[1:]).all())  # largest first
    smallest = eigenvalues(MatrixOperator(matrix), k=3, which="smallest")
    assert bool((smallest.values[:-1] <= smallest.values[1:]).all())  # smallest first
    assert_close_to_exact(smallest, exact[:3], scale=float(exact.abs().max()))


def test_fewer_products_than_the_dimension_on_a_spiked_matrix() -> None:
    matrix = spiked_wigner(400, [10.0, 7.0], seed=3)
    result = eigenvalues(MatrixOperator(matrix), k=2)
    assert result.all_converged
    assert result.num_matvecs < 60


def test_clustered_values_have_no_ghost_copies() -> None:
    # A tight cluster at the top and a long run with a tight tolerance: without full
    # reorthogonalization, converged values reappear as spurious copies.
    cluster = torch.tensor([10.0, 10.0 - 1e-3, 10.0 - 2e-3, 9.5, 9.4], dtype=torch.float64)
    values = torch.cat([cluster, uniform_spectrum(195, 0.0, 9.0, seed=4)])
    matrix = with_spectrum(values, seed=4)
    exact = exact_spectrum(matrix)
    result = eigenvalues(MatrixOperator(matrix), k=5, tol=1e-10, max_matvecs=200)
    assert result.all_converged
    torch.testing.assert_close(result.values, top(exact, 5), rtol=0, atol=1e-8)


def test_repeated_top_eigenvalue_has_its_true_multiplicity() -> None:
    values = torch.cat(
        [torch.tensor([10.0, 10.0, 10.0, 7.5, 7.4], dtype=torch.float64), uniform_spectrum(195, -2, 6)]
    )
    matrix = with_spectrum(values, seed=5)
    exact = exact_spectrum(matrix)
    for block_size in (1, 3):
        result = eigenvalues(MatrixOperator(matrix), k=5, block_size=block_size, return_vectors=True)
        assert_close_to_exact(result, top(exact, 5), scale=10.0)
        torch.testing.assert_close(result.values[:3], torch.full((3,), 10.0, dtype=torch.float64))
        # Three independent eigenvectors for the triple eigenvalue.
        gram = result.vectors[:, :3].T @ result.vectors[:, :3]
        torch.testing.assert_close(gram, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)


def test_repeated_smallest_eigenvalue_has_its_true_multiplicity() -> None:
    values = torch.cat([torch.tensor([-4.0, -4.0, -1.0], dtype=torch.float64), uniform_spectrum(97, 0, 3)])
    matrix = with_spectrum(values, seed=6)
    result = eigenvalues(MatrixOperator(matrix), k=3, which="smallest")
    assert_close_to_exact(result, exact_spectrum(matrix)[:3], scale=4.0)
    torch.testing.assert_close(result.values[:2], torch.full((2,), -4.0, dtype=torch.float64))


def test_eigenvectors_are_unit_with_small_residuals() -> None:
    matrix = spiked_wigner(250, [6.0, 5.0, 4.0], seed=7)
    op = MatrixOperator(matrix)
    result = eigenvalues(op, k=3, return_vectors=True)
    x = result.vectors
    assert x.shape == (250, 3)
    torch.testing.assert_close(x.norm(dim=0), torch.ones(3, dtype=torch.float64))
    residual = (matrix @ x - x * result.values).norm(dim=0)
    assert bool((residual <= result.tol * 1.01).all())
    torch.testing.assert_close(residual, result.residuals, atol=1e-8, rtol=1e-3)


def test_small_operator_is_exact_with_multiplicities() -> None:
    values = torch.tensor([3.0, 3.0, 2.0, 1.0, 1.0, 1.0, -2.0, 0.5], dtype=torch.float64)
    matrix = with_spectrum(values, seed=8)
    op = MatrixOperator(matrix)
    result = eigenvalues(op, k=8)
    torch.testing.assert_close(result.values, values.sort(descending=True).values, atol=1e-10, rtol=0)
    assert result.all_converged
    assert result.num_matvecs == 8
    smallest = eigenvalues(MatrixOperator(matrix), k=2, which="smallest", max_matvecs=8)
    torch.testing.assert_close(smallest.values, torch.tensor([-2.0, 0.5], dtype=torch.float64))


def test_budget_too_small_warns_and_flags_unconverged() -> None:
    matrix = with_spectrum(uniform_spectrum(300, 0.0, 1.0, seed=9), seed=9)
    with pytest.warns(HessianConvergenceWarning, match="max_matvecs=10"):
        result = eigenvalues(MatrixOperator(matrix), k=2, which="smallest", max_matvecs=10)
    assert result.num_matvecs == 10
    assert result.converged.dtype == torch.bool
    assert not result.all_converged
    assert bool((result.residuals[~result.converged] > result.tol).all())


def test_defaults_do_not_warn_when_converged() -> None:
    matrix = spiked_wigner(200, [5.0], seed=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = eigenvalues(MatrixOperator(matrix))
    assert result.values.shape == (1,)
    assert result.all_converged


def test_float32_operator() -> None:
    matrix = spiked_wigner(200, [5.0, 4.0], seed=11)
    result = eigenvalues(MatrixOperator(matrix.float()), k=2, return_vectors=True)
    assert result.vectors.dtype == torch.float32
    assert_close_to_exact(result, top(exact_spectrum(matrix), 2), scale=5.0)


def test_same_seed_same_result_and_global_rng_untouched() -> None:
    matrix = spiked_wigner(150, [4.0, 3.0], seed=12)
    state = torch.get_rng_state()
    a = eigenvalues(MatrixOperator(matrix), k=2, seed=3, return_vectors=True)
    b = eigenvalues(MatrixOperator(matrix), k=2, seed=3, return_vectors=True)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.values, b.values) and torch.equal(a.vectors, b.vectors)
    assert a.num_matvecs == b.num_matvecs
    c = eigenvalues(MatrixOperator(matrix), k=2, seed=4)
    torch.testing.assert_close(a.values, c.values, atol=1e-4 * 5, rtol=0)


def test_thick_restart_with_a_small_basis() -> None:
    values = torch.cat([torch.tensor([10.0, 9.0, 8.0]), uniform_spectrum(297, 0, 7.5, seed=13)])
    matrix = with_spectrum(values, seed=13)
    result = eigenvalues(MatrixOperator(matrix), k=3, max_basis=12, max_matvecs=300)
    assert_close_to_exact(result, top(exact_spectrum(matrix), 3), scale=10.0)


def test_convergence_is_still_checked_after_thick_restarts() -> None:
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(600, 600, dtype=torch.float64, generator=gen)
    matrix = (w + w.T) / math.sqrt(2 * 600)
    result = eigenvalues(MatrixOperator(matrix), k=1, max_basis=20, max_matvecs=3000)
    assert result.all_converged
    assert result.num_matvecs < 200  # stops at convergence, not at the budget
    assert float(result.values[0]) == pytest.approx(float(exact_spectrum(matrix)[-1]), abs=1e-4 * 2.5)


@pytest.mark.parametrize("seed", range(4))
def test_a_close_pair_at_the_top_is_not_declared_converged_early(seed: int) -> None:
    # 1.0 and 0.99 above a bulk in [0, 0.5]: early Ritz values mix the pair with small residuals
    # relative to the bulk; only a converged residual separates them.
    values = torch.cat(
        [torch.tensor([1.0, 0.99], dtype=torch.float64), uniform_spectrum(298, 0, 0.5, seed=4)]
    )
    op = MatrixOperator(with_spectrum(values, seed=seed))
    for k in (1, 2):
        result = eigenvalues(op, k=k, seed=seed)
        assert result.all_converged
        expected = torch.tensor([1.0, 0.99], dtype=torch.float64)[:k]
        assert bool(((result.values - expected).abs() <= result.tol).all()), (result.values, result.tol)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"k": 0}, ValueError, "`k` must be >= 1"),
        ({"k": 11}, ValueError, r"`k` must be <= N = 10"),
        ({"k": 1.5}, TypeError, "`k` must be an integer"),
        (
            {"which": "top"},
            ValueError,
            r"`which='top'` is not supported. Use one of \('largest', 'smallest'\)",
        ),
        ({"tol": 0.0}, ValueError, "`tol` must be a positive"),
        ({"tol": -1e-3}, ValueError, "`tol` must be a positive"),
        ({"tol": float("nan")}, ValueError, "`tol` must be a positive"),
        ({"k": 3, "max_matvecs": 2}, ValueError, r"`max_matvecs` must be >= 3.*raise it"),
        ({"block_size": 0}, ValueError, "`block_size` must be >= 1"),
        ({"k": 2, "max_basis": 3}, ValueError, "`max_basis` must be >= 4"),
    ],
)
def test_bad_arguments_rejected_before_any_product(kwargs, error, match) -> None:
    op = MatrixOperator(torch.eye(10, dtype=torch.float64))
    with pytest.raises(error, match=match):
        eigenvalues(op, **kwargs)
    assert op.num_matvecs == 0


def test_bad_operators_rejected() -> None:
    class NotSquare:
        shape = (3, 4)
        dtype = torch.float64
        device = torch.device("cpu")

        def __matmul__(self, other):
            raise AssertionError("no product expected")

    with pytest.raises(ValueError, match="`op` must be square"):
        eigenvalues(NotSquare())
    with pytest.raises(TypeError, match="`op` must be a linear operator"):
        eigenvalues(torch.nn.Linear(2, 2))


def test_hessian_operator_of_a_small_model() -> None:
    from lightning_hessian.operator import HessianOperator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    gen = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(32, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (32,), generator=gen))
    ]
    op = HessianOperator(model, cross_entropy_loss, data, hvp="reverse-over-reverse")
    dense = op.to_dense()
    exact = exact_spectrum(dense)
    scale = float(exact.abs().max())
    result = eigenvalues(op, k=3, return_vectors=True)
    assert_close_to_exact(result, top(exact, 3), scale)
    residual = (dense @ result.vectors - result.vectors * result.values).norm(dim=0)
    assert bool((residual <= 1.01 * result.tol).all())
    smallest = eigenvalues(op, k=1, which="smallest", tol=1e-6)
    assert smallest.all_converged
    assert abs(float(smallest.values[0]) - float(exact[0])) <= 1e-6 * scale
