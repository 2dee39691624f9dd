"""The plain-data results (lightning_hessian.results): densities, eigenvalue and trace results, reports."""

from __future__ import annotations

import math

import pytest
import torch

import lightning_hessian as lh
from tests.helpers import sample_report
from tests.spectra import indefinite_matrix

# --------------------------------------------------------------------------- SpectralDensity


def test_pdf_and_histogram_of_the_estimate() -> None:
    result = lh.spectral_density(lh.MatrixOperator(indefinite_matrix()), num_probes=2, num_steps=15)
    grid = torch.linspace(-5, 8, 2001, dtype=torch.float64)
    assert float(torch.trapezoid(result.pdf(grid), grid)) == pytest.approx(1.0, abs=1e-3)
    _, mass = result.histogram(16)
    assert float(mass.sum()) == pytest.approx(1.0)


def test_pdf_is_a_mixture_of_gaussians_at_the_nodes() -> None:
    nodes = torch.tensor([-1.0, 2.0], dtype=torch.float64)
    density = lh.SpectralDensity(nodes, torch.tensor([0.25, 0.75], dtype=torch.float64))
    sigma = 0.5
    at = torch.tensor([2.0], dtype=torch.float64)
    expected = sum(
        w * math.exp(-0.5 * ((2.0 - x) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        for x, w in ((-1.0, 0.25), (2.0, 0.75))
    )
    assert float(density.pdf(at, sigma=sigma)) == pytest.approx(expected, rel=1e-12)
    grid = torch.zeros(3, 2)
    assert density.pdf(grid).shape == (3, 2)  # the grid's shape
    with pytest.raises(ValueError, match="`sigma` must be positive"):
        density.pdf(at, sigma=0.0)


def test_histogram_bins_the_weights_and_mean_is_the_first_moment() -> None:
    nodes = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    density = lh.SpectralDensity(nodes, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), 8, 2)
    edges, mass = density.histogram(3)
    torch.testing.assert_close(edges, torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(mass, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    assert density.mean == pytest.approx(0.3 + 0.6)
    assert (density.num_matvecs, density.num_probes, density.exact) == (8, 2, False)
    point = lh.SpectralDensity(torch.tensor([2.0]), torch.tensor([1.0]))
    edges, mass = point.histogram(4)  # a single point: a small interval around it
    assert edges[0] < 2.0 < edges[-1] and float(mass.sum()) == pytest.approx(1.0)
    for bins in (0, 2.5):
        with pytest.raises(ValueError, match="`bins` must be a positive integer"):
            density.histogram(bins)


# --------------------------------------------------------------------------- EigenResult, reports


def test_all_converged_needs_every_value():
    values = torch.tensor([3.0, 2.0])
    done = lh.EigenResult(values, None, torch.tensor([True, True]), torch.zeros(2), 5)
    assert done.all_converged and (done.which, done.tol) == ("largest", 0.0)
    assert not lh.EigenResult(values, None, torch.tensor([True, False]), torch.zeros(2), 5).all_converged


def test_an_empty_report_has_no_scalars_and_a_nan_loss():
    report = lh.HessianReport()
    assert report.scalars() == {} and math.isnan(report.loss)
    assert (report.num_samples, report.num_matvecs, report.seconds) == (0, 0, 0.0)
    block = lh.BlockReport(name="x", size=3, method="iterative")
    assert lh.HessianReport(blocks={"x": block}).scalars() == {}


def test_scalars_take_a_prefix():
    assert list(sample_report().scalars(prefix="curvature")) == [
        "curvature/a/trace",
        "curvature/a/trace_stderr",
        "curvature/a/eigenvalue_1",
        "curvature/a/eigenvalue_2",
        "curvature/a/eigenvalue_min",
        "curvature/a/eigenvalues_converged",
        "curvature/b/eigenvalue_1",
        "curvature/b/eigenvalues_converged",
    ]
