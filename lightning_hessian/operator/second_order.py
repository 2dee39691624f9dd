"""Second-order-friendly forms of common layers, used while first-order graphs are built.

A reverse-over-reverse product differentiates the graph of the gradient, so its cost is that of the
*double backward* of every layer. For some layers PyTorch's double backward does far more work than
the second derivative needs; :class:`SecondOrderForms` runs those layers, while a first-order graph is
built, as the same functions written so that their double backward is cheap. Each form computes the
same function with the same first and second derivatives (up to float rounding: tests compare them in
float64 against the native layers):

- **Convolutions** (``F.conv1d/2d/3d`` with numeric padding): native double backward computes the
  weight term by convolving batch-transposed copies of the activations (two strided copies of each
  activation per layer, then a convolution in a slow layout). :class:`_Convolution` writes the input and
  weight gradients as functions (:class:`_ConvolutionInputGradient`,
  :class:`_ConvolutionWeightGradient`) whose backward passes are ordinary convolutions and
  ``convolution_backward`` calls, the kernels a training step uses.
- **ReLU** (``F.relu``/``torch.relu``, not in place): ``x * m`` with the mask ``m = (x > 0)`` held as a
  constant of ``x``'s dtype. Native ReLU's double backward returns a zero tensor for the derivative
  through its saved output, which is then filled, added and carried back through the earlier layers.
- **Eval-mode BatchNorm**: the per-channel affine map it is (NOTE [Eval-mode BatchNorm as an affine
  map]); right after a bias-free convolution whose output it normalizes, folded into that
  convolution's weight (``conv(x, W) * s + t = conv(x, W * s) + t``), so no activation-sized
  multiplications remain in the products.

# NOTE [Second-order forms are for first-order graphs only]
The forms are used only where :class:`~.graphs.GraphCache` builds the graph that reverse-over-reverse
products differentiate. Their inner functions are differentiable once more (the products) but not a
third time (a backward pass that would build a third-order graph raises instead of silently
dropping terms),
and they have no forward-mode rules, so forward-over-reverse and gradient differences run the module
as it is. Every exact product method is checked on its first product by the referee
(:mod:`.referee`), these forms included. The saving is measured on the mid-size CNN of
``benchmarks/hvp.py`` (README, "Hessian-vector products").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import FunctionCtx
from torch.overrides import TorchFunctionMode

from .batchnorm import BATCH_NORM_ARGUMENTS, affine_batch_norm, affine_batch_norm_terms

_aten = torch.ops.aten
_CONVOLUTIONS = (F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d)
_CONVOLUTION_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_RELUS = (F.relu, torch.relu)

#: ``(stride, padding, dilation, groups)`` of a convolution, each spatial setting one int per dim.
ConvolutionSettings = tuple[list[int], list[int], list[int], int]


def _convolve(x: Tensor, weight: Tensor, settings: ConvolutionSettings) -> Tensor:
    stride, padding, dilation, groups = settings
    return _aten.convolution(x, weight, None, stride, padding, dilation, False, [0] * len(stride), groups)


def _convolution_backward(
    grad_output: Tensor, x: Tensor, weight: Tensor, settings: ConvolutionSettings, input_grad: bool
) -> Tensor:
    """The input (``input_grad``) or weight gradient of ``conv(x, weight)`` for ``grad_output``."""
    stride, padding, dilation, groups = settings
    mask = [input_grad, not input_grad, False]
    grads = _aten.convolution_backward(
        grad_output, x, weight, None, stride, padding, dilation, False, [0] * len(stride), groups, mask
    )
    return grads[0] if input_grad else grads[1]


def _refuse_third_derivatives() -> None:
    """Raise inside a backward pass that builds a graph (``create_graph=True``): the forms' second
    derivatives are not themselves differentiable, and a silent third derivative would be wrong.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            "lightning_hessian's second-order forms of convolutions are differentiable twice, not three "
            "times: differentiate a product again with hvp='forward-over-reverse' instead."
        )


class _ConvolutionInputGradient(Function):
    """``dL/dx`` of ``conv(x, W)`` from ``g = dL/dy``: linear in ``g`` and in ``W``."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, grad_output: Tensor, weight: Tensor, x_like: Tensor, settings: ConvolutionSettings
    ) -> Tensor:
        ctx.save_for_backward(grad_output, weight)
        ctx.settings = settings
        return _convolution_backward(grad_output, x_like, weight, settings, input_grad=True)

    @staticmethod
    def backward(ctx: Any, adjoint: Tensor) -> tuple[Tensor | None, ...]:
        _refuse_third_derivatives()
        grad_output, weight = ctx.saved_tensors
        d_grad_output = d_weight = None
        if ctx.needs_input_grad[0]:
            d_grad_output = _convolve(adjoint, weight, ctx.settings)
        if ctx.needs_input_grad[1]:
            d_weight = _convolution_backward(grad_output, adjoint, weight, ctx.settings, input_grad=False)
        return d_grad_output, d_weight, None, None


class _ConvolutionWeightGradient(Function):
    """``dL/dW`` of ``conv(x, W)`` from ``g = dL/dy``: linear in ``g`` and in ``x``."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, grad_output: Tensor, x: Tensor, weight_like: Tensor, settings: ConvolutionSettings
    ) -> Tensor:
        ctx.save_for_backward(grad_output, x)
        ctx.settings = settings
        return _convolution_backward(grad_output, x, weight_like, settings, input_grad=False)

    @staticmethod
    def backward(ctx: Any, adjoint: Tensor) -> tuple[Tensor | None, ...]:
        _refuse_third_derivatives()
        grad_output, x = ctx.saved_tensors
        d_grad_output = d_x = None
        if ctx.needs_input_grad[0]:
            d_grad_output = _convolve(x, adjoint, ctx.settings)
        if ctx.needs_input_grad[1]:
            d_x = _convolution_backward(grad_output, x, adjoint, ctx.settings, input_grad=True)
        return d_grad_output, d_x, None, None


class _Convolution(Function):
    """``conv(x, W)`` (no bias) whose gradients are the two functions above."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor, settings: ConvolutionSettings) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.settings = settings
        return _convolve(x, weight, settings)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = _ConvolutionInputGradient.apply(grad_output, weight, x.detach(), ctx.settings)
        if ctx.needs_input_grad[1]:
            grad_weight = _ConvolutionWeightGradient.apply(grad_output, x, weight.detach(), ctx.settings)
        return grad_x, grad_weight, None


def _per_dimension(value: int | tuple[int, ...] | list[int], dims: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (tuple, list)) else [int(value)] * dims


def convolution_settings(bound: dict[str, Any]) -> ConvolutionSettings | None:
    """``F.conv*d``'s settings as :data:`ConvolutionSettings`, or ``None`` when no form applies.

    Args:
        bound: The convolution's arguments by name.

    Returns:
        The settings, or ``None`` for string padding (``"same"``/``"valid"``), unbatched inputs, or
        mixed dtypes (those run natively).
    """
    x, weight = bound.get("input"), bound.get("weight")
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor) or x.ndim != weight.ndim:
        return None
    padding = bound.get("padding", 0)
    if isinstance(padding, str) or x.dtype != weight.dtype or x.device != weight.device:
        return None
    dims = weight.ndim - 2
    return (
        _per_dimension(bound.get("stride", 1), dims),
        _per_dimension(padding, dims),
        _per_dimension(bound.get("dilation", 1), dims),
        int(bound.get("groups", 1)),
    )


def _channel_shape(ndim: int) -> tuple[int, ...]:
    return (1, -1) + (1,) * (ndim - 2)


class SecondOrderForms(TorchFunctionMode):
    """Inside this mode, convolutions, ReLU and eval-mode BatchNorm run in their second-order-friendly
    forms (see the module docstring); every other call runs unchanged.

    Example:
        >>> with SecondOrderForms():
        ...     loss = loss_fn(model, batch)  # doctest: +SKIP
        ...     grads = torch.autograd.grad(loss, params, create_graph=True)  # doctest: +SKIP
    """

    def __init__(self) -> None:
        super().__init__()
        # The latest bias-free convolution's output and operands, for folding a BatchNorm into it.
        self._latest_convolution: tuple[Tensor, Tensor, Tensor, ConvolutionSettings] | None = None

    def __exit__(self, *exc: object) -> None:
        self._latest_convolution = None
        super().__exit__(*exc)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _CONVOLUTIONS:
            bound = {**dict(zip(_CONVOLUTION_ARGUMENTS, args, strict=False)), **kwargs}
            settings = convolution_settings(bound)
            if settings is not None:
                return self._convolution(bound, settings)
        elif func in _RELUS and len(args) == 1 and not kwargs.get("inplace", False):
            x = args[0]
            if isinstance(x, Tensor) and x.is_floating_point():
                return x * (x > 0).to(x.dtype)
        elif func is F.batch_norm:
            bound = {**dict(zip(BATCH_NORM_ARGUMENTS, args, strict=False)), **kwargs}
            normalized = self._batch_norm(bound)
            if normalized is not None:
                return normalized
        return func(*args, **kwargs)

    def _convolution(self, bound: dict[str, Any], settings: ConvolutionSettings) -> Tensor:
        x, weight, bias = bound["input"], bound["weight"], bound.get("bias")
        output = _Convolution.apply(x, weight, settings)
        if bias is not None:
            self._latest_convolution = None
            return output + bias.reshape(_channel_shape(output.ndim))
        self._latest_convolution = (output, x, weight, settings)
        return output

    def _batch_norm(self, bound: dict[str, Any]) -> Tensor | None:
        latest, self._latest_convolution = self._latest_convolution, None
        if latest is None or bound.get("input") is not latest[0]:
            return affine_batch_norm(bound)
        terms = affine_batch_norm_terms(bound)
        if terms is None:
            return None
        scale, shift = terms
        _, x, weight, settings = latest
        folded = weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
        output = _Convolution.apply(x, folded, settings)
        return output + shift.reshape(_channel_shape(output.ndim))
