"""Gradient geometry and eigenvector overlap against dense computations on small models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_hessian as lh
from lightning_hessian.analysis import analyze_with
from lightning_hessian.settings import AnalysisSettings
from tests.helpers import cross_entropy_loss, reference_hessian


def _problem(batches: int = 3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(2)
    data = [
        (torch.randn(6 + i, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (6 + i,), generator=g))
        for i in range(batches)
    ]
    return model, data


def _gradient(model, batches) -> torch.Tensor:
    total = sum(len(y) for _, y in batches)
    loss = sum(cross_entropy_loss(model, (x, y)) * len(y) / total for x, y in batches)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


def test_geometry_matches_dense_computations():
    model, data = _problem()
    op = lh.HessianOperator(model, cross_entropy_loss, data)
    dense = reference_hessian(model, cross_entropy_loss, data)
    gradient = _gradient(model, data)
    vectors = torch.linalg.eigh(dense).eigenvectors[:, -3:]
    geometry = lh.gradient_geometry(op, vectors)
    assert geometry.gradient_norm == pytest.approx(float(gradient.norm()), rel=1e-10)
    assert geometry.alignment == pytest.approx(
        float((vectors.T @ gradient).square().sum() / (gradient @ gradient)), rel=1e-10
    )
    assert geometry.curvature == pytest.approx(
        float(gradient @ dense @ gradient / (gradient @ gradient)), rel=1e-10
    )
    per_batch = []
    for batch in data:
        h, g = reference_hessian(model, cross_entropy_loss, [batch]), _gradient(model, [batch])
        per_batch.append(float(g @ h @ g / (g @ g)))
    assert geometry.batch_sharpness == pytest.approx(sum(per_batch) / len(per_batch), rel=1e-10)
    assert geometry.num_batches == 3 and geometry.num_matvecs == 2.0


def test_alignment_is_one_for_an_eigenvector_gradient_and_zero_for_an_orthogonal_one():
    """On ``½ (θ-c)ᵀA(θ-c)`` the gradient is ``A(θ-c)``: choose ``θ - c`` to place it."""
    eigenvalues = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    basis = torch.linalg.qr(
        torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    )[0]
    matrix = basis @ torch.diag(eigenvalues) @ basis.T

    class Point(nn.Module):
        def __init__(self, value: torch.Tensor) -> None:
            super().__init__()
            self.theta = nn.Parameter(value.clone())

    def loss(module, batch):
        return 0.5 * module.theta @ batch @ module.theta

    def geometry(offset: torch.Tensor) -> lh.GradientGeometry:
        op = lh.HessianOperator(Point(offset), loss, [matrix], batch_size_fn=lambda b: 1)
        return lh.gradient_geometry(op, basis[:, :2])  # the top-2 eigenspace

    along_top = geometry(basis[:, 0])
    assert along_top.alignment == pytest.approx(1.0, abs=1e-12)
    assert along_top.curvature == pytest.approx(4.0, rel=1e-12)
    orthogonal = geometry(basis[:, 3] + basis[:, 4])
    assert orthogonal.alignment == pytest.approx(0.0, abs=1e-12)
    assert orthogonal.batch_sharpness == pytest.approx((1.0**3 + 0.5**3) / (1.0**2 + 0.5**2), rel=1e-12)


def test_geometry_without_vectors_leaves_alignment_out_and_checks_the_shape():
    model, data = _problem(1)
    op = lh.HessianOperator(model, cross_entropy_loss, data)
    assert lh.gradient_geometry(op).alignment is None
    with pytest.raises(ValueError, match=r"`eigenvectors` must be \[N=43, k\]"):
        lh.gradient_geometry(op, torch.ones(7, 2))


def test_geometry_leaves_the_model_and_its_gradients_alone():
    model, data = _problem(2)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    lh.gradient_geometry(lh.HessianOperator(model, cross_entropy_loss, data))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())


def test_overlap_is_one_for_the_same_space_in_any_basis():
    basis = torch.linalg.qr(torch.randn(20, 3, generator=torch.Generator().manual_seed(0)))[0]
    rotation = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1)))[0]
    assert lh.eigenspace_overlap(basis, basis) == pytest.approx(1.0, abs=1e-6)
    assert lh.eigenspace_overlap(basis, basis @ rotation * 3.0) == pytest.approx(1.0, abs=1e-6)


def test_overlap_is_zero_for_orthogonal_spaces_and_partial_otherwise():
    eye = torch.eye(6, dtype=torch.float64)
    assert lh.eigenspace_overlap(eye[:, :2], eye[:, 2:4]) == 0.0
    assert lh.eigenspace_overlap(eye[:, :2], eye[:, 1:3]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same N"):
        lh.eigenspace_overlap(eye[:, :2], torch.eye(5)[:, :2])


def test_overlap_of_two_evaluations_of_the_same_state_is_one():
    model, data = _problem()
    first = lh.analyze(model, cross_entropy_loss, data, method="iterative", eigenvectors=True, top_k=2)
    previous = {"model": first.blocks["model"].eigenvalues.vectors}
    second = analyze_with(
        model,
        cross_entropy_loss,
        data,
        AnalysisSettings(method="iterative", top_k=2, seed=5),
        previous_vectors=previous,
    )
    assert second.blocks["model"].eigenvector_overlap == pytest.approx(1.0, abs=1e-6)
    assert second.scalars()["hessian/model/eigenvector_overlap"] == pytest.approx(1.0, abs=1e-6)


def test_with_one_batch_the_curvature_is_the_batch_sharpness_for_one_product():
    model, data = _problem(1)
    op = lh.HessianOperator(model, cross_entropy_loss, data)
    dense, gradient = reference_hessian(model, cross_entropy_loss, data), _gradient(model, data)
    geometry = lh.gradient_geometry(op)
    expected = float(gradient @ dense @ gradient / (gradient @ gradient))
    assert geometry.curvature == geometry.batch_sharpness == pytest.approx(expected, rel=1e-10)
    assert geometry.num_batches == 1 and geometry.num_matvecs == 1.0
