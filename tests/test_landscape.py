"""The loss landscape against direct loss evaluations, and its quadratic model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import lightning_hessian as lh
from lightning_hessian.landscape import default_radius
from tests.helpers import cross_entropy_loss


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (5,), generator=g))]
    return model, data


def _loss_at(model, data, flat: torch.Tensor) -> float:
    names = [n for n, _ in model.named_parameters()]
    pieces = torch.split(flat, [p.numel() for p in model.parameters()])
    params = {
        n: piece.reshape(p.shape) for n, piece, p in zip(names, pieces, model.parameters(), strict=True)
    }
    x, y = data[0]
    return float(torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y))


def test_landscape_equals_direct_loss_evaluations():
    model, data = _problem()
    op = lh.HessianOperator(model, cross_entropy_loss, data)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    direction = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    landscape = lh.loss_landscape(op, {"d": 3.0 * direction}, num_points=7, radius=0.5)
    unit = direction / direction.norm()
    expected = torch.linspace(-0.5, 0.5, 7, dtype=torch.float64)
    torch.testing.assert_close(landscape.offsets["d"], expected, rtol=0, atol=1e-15)
    assert float(landscape.offsets["d"][3]) == 0.0
    for t, value in zip(landscape.offsets["d"].tolist(), landscape.losses["d"].tolist(), strict=True):
        assert value == pytest.approx(_loss_at(model, data, theta + t * unit), rel=1e-12)
    dense = op.to_dense()
    assert landscape.curvatures["d"] == pytest.approx(float(unit @ dense @ unit), rel=1e-10)
    assert landscape.slopes["d"] == pytest.approx(float(op.gradient() @ unit), rel=1e-10)
    assert landscape.loss == pytest.approx(_loss_at(model, data, theta), rel=1e-12)
    assert landscape.num_forward == 7  # the centre once, six displaced points


def test_quadratic_model_is_exact_on_a_quadratic_loss():
    matrix = torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64))

    class Point(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.theta = nn.Parameter(torch.tensor([0.5, -1.0], dtype=torch.float64))

    op = lh.HessianOperator(
        Point(), lambda m, b: 0.5 * m.theta @ b @ m.theta, [matrix], batch_size_fn=lambda b: 1
    )
    landscape = lh.loss_landscape(op, {"v1": torch.tensor([1.0, 0.0], dtype=torch.float64)})
    assert landscape.curvatures["v1"] == pytest.approx(3.0)
    torch.testing.assert_close(
        landscape.losses["v1"], landscape.quadratic_model("v1"), rtol=1e-12, atol=1e-12
    )
    radius = default_radius(landscape.loss, 3.0)
    assert float(landscape.offsets["v1"].max()) == pytest.approx(radius)
    assert radius == pytest.approx(math.sqrt(2 * landscape.loss / 3.0))


def test_landscape_leaves_the_model_alone_and_checks_its_arguments():
    model, data = _problem()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    op = lh.HessianOperator(model, cross_entropy_loss, data)
    n = op.shape[0]
    lh.loss_landscape(op, {"a": torch.ones(n, dtype=torch.float64)}, num_points=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    with pytest.raises(ValueError, match="Direction 'a' has norm 0"):
        lh.loss_landscape(op, {"a": torch.zeros(n)})
    with pytest.raises(ValueError, match=r"Direction 'a' must have shape \[26\]"):
        lh.loss_landscape(op, {"a": torch.ones(3)})
    with pytest.raises(ValueError, match="num_points"):
        lh.loss_landscape(op, {"a": torch.ones(n)}, num_points=2)
    with pytest.raises(ValueError, match="radius"):
        lh.loss_landscape(op, {"a": torch.ones(n)}, radius=-1.0)


def test_analyze_draws_the_landscape_along_the_top_eigenvectors_and_the_gradient():
    model, data = _problem()
    report = lh.analyze(model, cross_entropy_loss, data, landscape=True, landscape_points=5)
    block = report.blocks["model"]
    assert list(block.landscape.losses) == ["v1", "v2", "gradient"]
    top = float(block.eigenvalues.values[0])
    assert block.landscape.curvatures["v1"] == pytest.approx(top, rel=1e-8)
    gradient = lh.HessianOperator(model, cross_entropy_loss, data).gradient()
    assert block.landscape.slopes["v1"] == pytest.approx(float(gradient @ block.eigenvalues.vectors[:, 0]))
    assert block.landscape.slopes["gradient"] == pytest.approx(float(gradient.norm()))
    assert all(values.shape == (5,) for values in block.landscape.losses.values())
