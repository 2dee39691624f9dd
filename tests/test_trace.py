from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_hessian.linear_operator import MatrixOperator
from lightning_hessian.trace import trace
from tests.helpers import cross_entropy_loss
from tests.spectra import spiked_wigner, uniform_spectrum, with_spectrum

STOCHASTIC = ["hutchinson", "hutch++", "xtrace"]


class NoDense:
    """An operator without ``to_dense`` (exact trace must multiply identity columns)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.inner = MatrixOperator(matrix)
        self.shape, self.dtype, self.device = self.inner.shape, matrix.dtype, matrix.device

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        return self.inner @ other


@pytest.fixture(scope="module")
def decaying() -> torch.Tensor:
    """A few large eigenvalues over an indefinite bulk (the shape of a trained network's Hessian)."""
    values = torch.cat(
        [
            torch.tensor([9.0, 6.0, 4.0, 3.0, 2.0], dtype=torch.float64),
            uniform_spectrum(115, -0.3, 1.0, seed=1),
        ]
    )
    return with_spectrum(values, seed=1)


def test_exact_equals_the_true_trace(decaying: torch.Tensor) -> None:
    true = float(torch.trace(decaying))
    result = trace(MatrixOperator(decaying), method="exact")
    assert result.value == pytest.approx(true, rel=1e-12)
    assert result.stderr == 0.0 and result.method == "exact"
    op = NoDense(decaying)
    result = trace(op, method="exact", chunk_size=7)
    assert result.value == pytest.approx(true, rel=1e-12)
    assert result.num_matvecs == 120 == op.inner.num_matvecs


@pytest.mark.parametrize("method", STOCHASTIC)
def test_estimates_lie_within_their_standard_error(method: str, decaying: torch.Tensor) -> None:
    true = float(torch.trace(decaying))
    errors = []
    for seed in range(10):
        op = MatrixOperator(decaying)
        result = trace(op, method=method, num_matvecs=30, seed=seed)
        assert result.method == method
        assert result.num_matvecs == op.num_matvecs <= 30
        assert result.stderr > 0
        assert abs(result.value - true) < 4 * result.stderr, (seed, result, true)
        errors.append(abs(result.value - true))
    assert sum(errors) / len(errors) < 0.1 * abs(true)


@pytest.mark.parametrize("method", STOCHASTIC)
def test_standard_errors_are_calibrated_across_seeds(method: str, decaying: torch.Tensor) -> None:
    # z = (estimate - true) / stderr over many seeds: an honest standard error gives RMS(z) near 1.
    # XTrace's exchangeable estimates share sketches; their plain spread gave RMS(z) = 1.44 here.
    true = float(torch.trace(decaying))
    z = torch.tensor(
        [
            (r.value - true) / r.stderr
            for r in (trace(MatrixOperator(decaying), method, 99, seed=s) for s in range(60))
        ]
    )
    rms = float(z.pow(2).mean().sqrt())
    assert 0.3 < rms < 1.25, rms
    assert float((z.abs() > 3).double().mean()) <= 0.05


def test_deflation_beats_hutchinson_on_a_low_rank_dominated_spectrum(decaying: torch.Tensor) -> None:
    true = float(torch.trace(decaying))
    mean_error = {}
    for method in STOCHASTIC:
        errs = [abs(trace(MatrixOperator(decaying), method, 30, seed=s).value - true) for s in range(10)]
        mean_error[method] = sum(errs) / len(errs)
    assert mean_error["hutch++"] < mean_error["hutchinson"]
    assert mean_error["xtrace"] < mean_error["hutchinson"]


@pytest.mark.parametrize("method", ["hutch++", "xtrace"])
def test_low_rank_operator_is_exact(method: str) -> None:
    gen = torch.Generator().manual_seed(2)
    u = torch.randn(80, 4, generator=gen, dtype=torch.float64)
    matrix = u @ torch.diag(torch.tensor([5.0, -3.0, 2.0, 1.0], dtype=torch.float64)) @ u.T
    result = trace(MatrixOperator(matrix), method=method, num_matvecs=24, seed=0)
    assert result.value == pytest.approx(float(torch.trace(matrix)), rel=1e-8)
    assert result.stderr == pytest.approx(0.0, abs=1e-6 * abs(result.value))


def test_small_operator_with_a_large_budget_is_exact() -> None:
    matrix = spiked_wigner(10, [3.0], seed=3)
    for method in ("hutch++", "xtrace"):
        result = trace(MatrixOperator(matrix), method=method, num_matvecs=60)
        assert result.value == pytest.approx(float(torch.trace(matrix)), rel=1e-9)


def test_single_probe_still_reports_a_standard_error() -> None:
    matrix = spiked_wigner(50, [3.0], seed=4)
    for method, m in (("hutchinson", 1), ("hutch++", 3)):
        result = trace(MatrixOperator(matrix), method=method, num_matvecs=m)
        assert result.num_matvecs == m
        assert result.stderr > 0 and result.stderr == result.stderr  # positive, not NaN


def test_budget_is_spent_exactly() -> None:
    matrix = spiked_wigner(60, [3.0], seed=5)
    for method, m, used in (("hutchinson", 17, 17), ("hutch++", 17, 17), ("xtrace", 17, 16)):
        op = MatrixOperator(matrix)
        result = trace(op, method=method, num_matvecs=m, chunk_size=4)
        assert result.num_matvecs == used == op.num_matvecs


def test_float32_operator() -> None:
    matrix = spiked_wigner(100, [5.0, 3.0], seed=6)
    for method in STOCHASTIC:
        result = trace(MatrixOperator(matrix.float()), method=method, num_matvecs=30)
        assert abs(result.value - float(torch.trace(matrix))) < 4 * result.stderr + 1e-4


def test_same_seed_same_result_and_global_rng_untouched(decaying: torch.Tensor) -> None:
    state = torch.get_rng_state()
    for method in STOCHASTIC:
        a = trace(MatrixOperator(decaying), method=method, num_matvecs=20, seed=7)
        b = trace(MatrixOperator(decaying), method=method, num_matvecs=20, seed=7)
        c = trace(MatrixOperator(decaying), method=method, num_matvecs=20, seed=8)
        assert a == b
        assert a.value != c.value
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"method": "hutch+"},
            ValueError,
            r"`method='hutch\+'` is not supported. Use one of \('exact', 'hutchinson', 'hutch\+\+'",
        ),
        ({"method": "hutch++", "num_matvecs": 2}, ValueError, r"`num_matvecs` must be >= 3.*hutch\+\+"),
        ({"method": "xtrace", "num_matvecs": 3}, ValueError, "`num_matvecs` must be >= 4.*xtrace"),
        ({"method": "hutchinson", "num_matvecs": 0}, ValueError, "`num_matvecs` must be >= 1"),
        ({"num_matvecs": 9.5}, TypeError, "`num_matvecs` must be an integer"),
        ({"chunk_size": 0}, ValueError, "`chunk_size` must be >= 1"),
        ({"seed": "a"}, TypeError, "`seed` must be an integer"),
    ],
)
def test_bad_arguments_rejected_before_any_product(kwargs, error, match) -> None:
    op = MatrixOperator(torch.eye(6, dtype=torch.float64))
    with pytest.raises(error, match=match):
        trace(op, **kwargs)
    assert op.num_matvecs == 0


def test_hessian_operator_of_a_small_model() -> None:
    from lightning_hessian.operator import HessianOperator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    gen = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(40, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (40,), generator=gen))
    ]
    op = HessianOperator(model, cross_entropy_loss, data, hvp="reverse-over-reverse")
    true = float(torch.trace(op.to_dense()))
    assert trace(op, method="exact").value == pytest.approx(true, rel=1e-10)
    for method in ("hutch++", "xtrace"):
        result = trace(op, method=method, num_matvecs=40, seed=1)
        assert abs(result.value - true) < 4 * result.stderr + 1e-9 * abs(true)
