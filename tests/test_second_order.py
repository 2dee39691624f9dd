"""The second-order forms give the native layers' gradients and Hessian-vector products (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lightning_hessian as lh
from lightning_hessian.operator.second_order import SecondOrderForms

TOLERANCE = 1e-12


def _gradient_and_products(model: nn.Module, x: torch.Tensor, vectors: list[torch.Tensor], forms: bool):
    """The loss's gradient, and batched Hessian-vector products through its graph."""
    params = list(model.parameters())
    with torch.enable_grad():
        if forms:
            with SecondOrderForms():
                loss = model(x).tanh().pow(2).sum()
        else:
            loss = model(x).tanh().pow(2).sum()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        products = torch.autograd.grad(grads, params, grad_outputs=vectors, is_grads_batched=True)
    return [g.detach() for g in grads], products


def _assert_same_derivatives(model: nn.Module, x: torch.Tensor) -> None:
    model = model.double()
    x = x.double()
    generator = torch.Generator().manual_seed(1)
    vectors = [torch.randn(3, *p.shape, dtype=torch.float64, generator=generator) for p in model.parameters()]
    native = _gradient_and_products(model, x, vectors, forms=False)
    rewritten = _gradient_and_products(model, x, vectors, forms=True)
    for expected, actual in zip(native, rewritten, strict=True):
        for e, a in zip(expected, actual, strict=True):
            assert (a - e).abs().max() <= TOLERANCE * e.abs().max().clamp(min=1.0)


def _eval_batch_norm(norm: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(2)
    norm.running_mean.copy_(torch.rand(norm.num_features, generator=generator))
    norm.running_var.copy_(0.5 + torch.rand(norm.num_features, generator=generator))
    if norm.affine:
        norm.weight.data.copy_(0.5 + torch.rand(norm.num_features, generator=generator))
        norm.bias.data.copy_(torch.randn(norm.num_features, generator=generator))
    return norm.eval()


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Conv1d(3, 4, 3), (5, 3, 11)),
        (nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (5, 4, 9, 9)),
        (nn.Conv2d(3, 2, (3, 2), dilation=(2, 1), padding=(2, 0), bias=False), (4, 3, 8, 7)),
        (nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"), (2, 3, 6, 6)),
        (nn.Conv2d(3, 3, 3, padding="same"), (2, 3, 6, 6)),  # string padding: runs natively
        (nn.Conv3d(2, 3, 2, stride=(1, 2, 1)), (3, 2, 4, 5, 4)),
    ],
)
def test_convolutions_have_the_native_gradient_and_products(layer: nn.Module, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(*shape)
    model(x)
    _assert_same_derivatives(model, x)


def test_convolution_batch_norm_relu_blocks_fold_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        _eval_batch_norm(nn.BatchNorm2d(4)),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, bias=False),
        _eval_batch_norm(nn.BatchNorm2d(4, affine=False)),
        nn.ReLU(),
        nn.Conv2d(4, 2, 1),  # a bias: the next batch norm is not folded into it
        _eval_batch_norm(nn.BatchNorm2d(2)),
        nn.Flatten(),
        nn.LazyLinear(3),
    )
    x = torch.randn(4, 3, 8, 8)
    model(x)
    _assert_same_derivatives(model, x)


class _SharedConvolutionOutput(nn.Module):
    """A convolution's output normalized and also added back (a residual): folding must keep both."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.norm = _eval_batch_norm(nn.BatchNorm2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return F.relu(self.norm(y)) + y.sin()


def test_a_convolution_output_used_twice_keeps_both_uses() -> None:
    torch.manual_seed(0)
    _assert_same_derivatives(_SharedConvolutionOutput(), torch.randn(3, 2, 5, 5))


def test_relu_at_kinks_and_in_place_relu_keep_their_derivatives() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(4, 4)
    model = nn.Sequential(linear, nn.ReLU(), nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 1))
    x = torch.randn(6, 4)
    x[0] = 0.0
    with torch.no_grad():
        linear.bias[0] = 0.0  # a pre-activation exactly at the kink: ReLU's derivative there is 0
    _assert_same_derivatives(model, x)


def test_a_third_derivative_through_the_forms_raises() -> None:
    weight = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 3, 7, dtype=torch.float64)
    with SecondOrderForms():
        y = F.conv1d(x, weight)
    (grad,) = torch.autograd.grad(y.pow(3).sum(), weight, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable twice, not three times"):
        torch.autograd.grad(grad.sum(), weight, create_graph=True)


def test_operator_products_on_a_batch_norm_cnn_match_forward_over_reverse() -> None:
    """Reverse-over-reverse (built with the forms) against forward-over-reverse (the module as is)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, bias=False),
        _eval_batch_norm(nn.BatchNorm2d(3)),
        nn.ReLU(),
        nn.Flatten(),
        nn.LazyLinear(2),
    )
    x, y = torch.randn(4, 1, 6, 6), torch.tensor([0, 1, 1, 0])
    model(x)
    model.double()
    batches = [(x.double(), y)]

    def loss_fn(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(module(batch[0]), batch[1])

    reverse = lh.HessianOperator(model, loss_fn, batches, hvp="reverse-over-reverse")
    forward = lh.HessianOperator(model, loss_fn, batches, hvp="forward-over-reverse")
    V = torch.randn(reverse.shape[0], 4, dtype=torch.float64)
    expected = forward @ V
    assert torch.allclose(reverse @ V, expected, rtol=0, atol=TOLERANCE * float(expected.abs().max()))
