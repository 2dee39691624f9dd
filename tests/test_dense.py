"""Exact dense Hessians (lightning_hessian.dense): the seed's examples, the model zoo against a float64
reference, diagonal blocks, uneven batches, and matrices too large to allocate.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_hessian as lh
from lightning_hessian.operator import FORWARD, REVERSE
from tests.helpers import (
    SEED_A,
    ZOO,
    Quadratic,
    SeedCNN,
    cross_entropy_loss,
    quadratic_loss,
    reference_hessian,
    zoo,
)

# --------------------------------------------------------------------------- the seed's examples


@pytest.mark.parametrize("hvp", ["auto", REVERSE, FORWARD])
def test_seed_quadratic_hessian_is_A(hvp):
    H = lh.hessian(Quadratic(), quadratic_loss, [torch.zeros(1)], hvp=hvp)
    torch.testing.assert_close(H, SEED_A, rtol=0, atol=0)


def test_seed_cnn_matches_the_seeds_own_formulation():
    """The seed's method 2 (hand-written forward over flattened parameters), at 2x2 images."""
    torch.manual_seed(0)
    h = w = 2
    net = SeedCNN(h, w)
    x = torch.randn(8, 1, h, w)
    y = torch.randint(0, 5, (8,))

    def forward_loss(a, b, c, d):
        p = [a.view(32, 1, 3, 3), b, c.view(5, 32 * h * w), d]
        z = F.conv2d(x, p[0], p[1], 1, 1)
        z = z.view(z.size(0), -1)
        return F.cross_entropy(F.linear(z, p[2], p[3]), y)

    blocks = torch.autograd.functional.hessian(
        forward_loss, tuple(p.detach().view(-1) for p in net.parameters())
    )
    expected = torch.cat([torch.cat(list(row), dim=1) for row in blocks], dim=0)
    H = lh.hessian(net, cross_entropy_loss, [(x, y)])
    assert H.shape == (965, 965)
    torch.testing.assert_close(H, expected, rtol=1e-4, atol=1e-6)
    assert torch.equal(H, H.T)


# --------------------------------------------------------------------------- the zoo


@pytest.mark.parametrize("name", ZOO)
def test_zoo_dense_hessian_matches_float64_reference(name):
    torch.manual_seed(0)
    model, loss_fn, data, mode = zoo(name)
    expected = reference_hessian(model, loss_fn, data, mode=mode)
    H64 = lh.hessian(model, loss_fn, data, mode=mode, dtype=torch.float64)
    torch.testing.assert_close(H64, expected, rtol=1e-9, atol=1e-11)
    H32 = lh.hessian(model, loss_fn, data, mode=mode)
    assert H32.dtype == torch.float32
    scale = expected.abs().max()
    assert (H32.double() - expected).abs().max() <= 1e-5 * scale


# --------------------------------------------------------------------------- blocks and batches


def test_blocks_are_the_diagonal_blocks_of_the_full_matrix():
    model, loss_fn, data, _ = zoo("conv_bn_eval")
    full = lh.hessian(model, loss_fn, data, dtype=torch.float64)
    slices = lh.ParameterSpace.from_tensors(dict(model.named_parameters())).slices()
    for kind in ("module", "parameter", {"features": ["conv.*", "bn.*"], "classifier": "fc.*"}):
        blocks = lh.hessian(model, loss_fn, data, blocks=kind, dtype=torch.float64)
        groups = lh.resolve_blocks(list(slices), kind)
        assert list(blocks) == list(groups)
        for name, names in groups.items():
            index = torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in names])
            torch.testing.assert_close(blocks[name], full[index][:, index], rtol=1e-10, atol=1e-12)


def test_uneven_batches_give_the_hessian_of_the_mean_over_all_samples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    together = lh.hessian(model, cross_entropy_loss, [(x, y)], dtype=torch.float64)
    split = lh.hessian(model, cross_entropy_loss, [(x[:5], y[:5]), (x[5:], y[5:])], dtype=torch.float64)
    torch.testing.assert_close(split, together)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    torch.testing.assert_close(lh.hessian(model, cross_entropy_loss, loader, dtype=torch.float64), together)


# --------------------------------------------------------------------------- too large


def test_dense_hessian_too_large_is_rejected_before_allocating(monkeypatch):
    model = nn.Linear(1000, 200)  # 200,200 parameters: a 160 GB float32 matrix
    data = [(torch.randn(2, 1000), torch.randint(0, 200, (2,)))]
    start = time.perf_counter()
    with pytest.raises(lh.HessianTooLargeError, match=r"needs 1\d\d\.\d\d GB.*`blocks=`.*`params=`"):
        lh.hessian(model, cross_entropy_loss, data)
    assert time.perf_counter() - start < 10


def test_reduction_sum_is_the_hessian_of_the_summed_loss_over_uneven_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    parts = [(x[:3], y[:3]), (x[3:], y[3:])]

    def summed(module, batch):
        return F.cross_entropy(module(batch[0]), batch[1], reduction="sum")

    whole = lh.hessian(model, summed, [(x, y)])
    torch.testing.assert_close(
        lh.hessian(model, summed, parts, reduction="sum"), whole, rtol=1e-12, atol=1e-12
    )
    # the default size-weighted mean of sum-reduced batch losses is not the loss of the whole data
    assert not torch.allclose(lh.hessian(model, summed, parts), whole)
    op = lh.HessianOperator(model, summed, parts, reduction="sum")
    assert op.loss() == pytest.approx(float(summed(model, (x, y))), rel=1e-12)
    report = lh.analyze(model, summed, parts, reduction="sum", top_k=1)
    assert float(report.blocks["model"].eigenvalues.values[0]) == pytest.approx(
        float(torch.linalg.eigvalsh(whole)[-1]), rel=1e-10
    )
    with pytest.raises(ValueError, match="`reduction='total'` is not supported. Use 'mean'"):
        lh.HessianOperator(model, summed, parts, reduction="total")
