"""Hessian-vector products from gradient differences: the step, and the accuracy to expect.

``H d`` is the derivative of the gradient ``g`` along ``d``, so two gradients approximate it without
any second-order formula: ``(g(θ + h d) - g(θ - h d)) / (2h)``. That works wherever training works
(compiled modules, fused kernels whose backward has no derivative of its own), at two gradients per
product and a few digits less than the exact methods.

# NOTE [Step of gradient differences]
For a unit direction ``d``, a step ``h`` and ``T_k`` the k-th derivative tensor of the loss,
``g(θ ± h d) = g ± h H d + h²/2 T3[d,d] ± h³/6 T4[d,d,d] + h⁴/24 T5[d⁴] ± h⁵/120 T6[d⁵] + ...``, so
the central difference ``D(h) = (g(θ + h d) - g(θ - h d)) / (2h) = H d + h²/6 T4[d³] + O(h⁴)``
carries a truncation error ``h² |T4| / 6``. Each computed gradient also carries a rounding error of
about ``u G`` (``u`` the unit roundoff of the dtype, ``G`` the size of the terms summed into the
gradient), which the difference divides by ``2h``: about ``u G / h`` in all. Their sum is least at
``h³ = 3 u G / |T4|``. Neither ``G`` nor ``|T4|`` is known beforehand, but both come from one length
``L``, the distance along ``d`` over which the curvature changes by its own size: ``G ~ |H| L`` and
``|T4| ~ |H| / L²``, so ``h = (3u)^(1/3) L`` and the error is about ``(3u)^(2/3) |H|``: a relative
``u^(2/3)`` (1.5e-5 in float32, 2.3e-11 in float64) times a model's constant.

The length: a layer's output changes by its own size when its weights move by about their own norm,
or by about 1 where they are near zero, so a direction whose part on parameter tensor ``k`` is ``d_k``
may go ``(1 + ||θ_k||) / ||d_k||`` before tensor ``k`` changes by its own size; ``L`` is the least of
these over the tensors ``d`` moves. For a random direction spread over all tensors this is about
``1 + ||θ||``; for the top eigenvectors, which sit on a few tensors (a head, a bias), it is far shorter,
and a step sized from the whole ``||θ||`` made products along them 10 to 100 times less accurate
(and the top-5 eigenvalues of a transformer layer 2e-3 off in float32). The measured error on the
models of ``benchmarks/gradient_products.py``, along random directions and the top eigenvectors
alike, was least at about half of ``(3u)^(1/3) L``, which is the step (not the ``sqrt(u)`` that
balances a one-sided difference, whose truncation is ``O(h)``).

The higher-order (Richardson) form ``R(h) = (4 D(h/2) - D(h)) / 3 = H d - h⁴/480 T6[d⁵] + ...``
cancels the ``h²`` term at four gradients per product; its rounding grows to about ``3 u G / h``, so
the best step is ``h⁵ = 360 u G / |T6| ~ 360 u L⁵``. Measured, the least error sat at about a sixth
of ``(360 u)^(1/5) L``, so the step is ``u^(1/5) L / 2``, and the relative error about ``u^(4/5)``.

# NOTE [Gradient differences leave the module alone]
The two gradients are taken at ``θ ± h d`` written into the operator's own tensors from its saved copy
of the parameters (:mod:`.points`), which the loss closure puts in the module's slots for the call and
takes out again (:class:`~lightning_hessian.state.TensorSlots`), as every product does: the module's
own parameter tensors, buffers and ``.grad`` are never written, so nothing is restored by subtracting
a step, and the closure's context restores modes, BatchNorm statistics and every random generator. Each
gradient is a plain first-order backward (no ``create_graph``) through the module's own forward,
with autocast off and the parameters' (or ``dtype=``'s) dtype, so any layer that trains
can be differentiated, and the attention kernel is the module's own.

# NOTE [Kinks]
On a piecewise-smooth loss (ReLU, max-pooling, ``abs``) the exact methods differentiate the piece that
contains ``θ`` (``relu'' = 0``), while gradient differences average the gradient's change over
``[θ - h d, θ + h d]``: every kink inside adds its jump divided by ``2h``. They agree only where no
kink is crossed. Float64 steps (about ``7e-6 L``) cross few on small models; float32 steps (about
``6e-3 L``) cross many on any ReLU network, whose products were then wrong by 100% and more. So the
forwards at ``θ ± h d`` replay the activation patterns recorded at ``θ`` (NOTE [Frozen kinks] in
:mod:`.kinks`) of ReLU, leaky ReLU, threshold, hardtanh and max-pooling, which then cost nothing in
accuracy: on ``benchmarks/gradient_products.py``'s ReLU CNN and ReLU transformer layer the products are
as accurate as on their smooth versions. The other kinks (``abs``, ``clamp``, ``max``, a compiled
module's) are crossed as before, so the first product of gradient differences also measures their
spread between two steps, and a large spread is reported (README, "Models without second
derivatives").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Central differences of two gradients (the method ``hvp="finite-difference"``).
FINITE_DIFFERENCE = "finite-difference"
#: Richardson extrapolation of two central differences: four gradients, more digits.
RICHARDSON = "finite-difference-richardson"
DIFFERENCE_METHODS = (FINITE_DIFFERENCE, RICHARDSON)
# Worst relative error over smooth models, in units of the rounding term u^(2/3) (central) or u^(4/5)
# (Richardson); measured with benchmarks/gradient_products.py, rounded up.
_ERROR_CONSTANT = {FINITE_DIFFERENCE: 10.0, RICHARDSON: 30.0}


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon of a floating dtype (``2**-24`` for float32).

    Example:
        >>> unit_roundoff(torch.float64)
        1.1102230246251565e-16
    """
    return torch.finfo(dtype).eps / 2


def difference_step(
    dtype: torch.dtype,
    lengths: Sequence[float],
    direction_norms: Sequence[float],
    method: str = FINITE_DIFFERENCE,
) -> float:
    """The step ``h`` along a direction ``v`` (NOTE [Step of gradient differences]).

    Args:
        dtype: The dtype the gradients are computed in.
        lengths: ``1 + ||θ_k||`` of each parameter tensor ``k`` of the support.
        direction_norms: ``||v_k||`` of the direction's part on each of those tensors.
        method: :data:`FINITE_DIFFERENCE` or :data:`RICHARDSON` (whose base step is larger).

    Returns:
        ``c * min_k (1 + ||θ_k||) / ||v_k||`` over the tensors the direction moves, with
        ``c = (3u)^(1/3) / 2`` for central differences and ``u^(1/5) / 2`` for Richardson.

    Raises:
        ValueError: If ``method`` is not a gradient-difference method, or the direction is zero.

    Example:
        >>> round(difference_step(torch.float64, [1.0, 3.0], [1.0, 0.0]), 9)
        3.466e-06
    """
    u = unit_roundoff(dtype)
    if method == FINITE_DIFFERENCE:
        scale = (3 * u) ** (1 / 3) / 2
    elif method == RICHARDSON:
        scale = u ** (1 / 5) / 2
    else:
        raise ValueError(f"`method` must be one of {DIFFERENCE_METHODS}, got {method!r}.")
    ratios = [length / norm for length, norm in zip(lengths, direction_norms, strict=True) if norm > 0]
    if not ratios:
        raise ValueError("The direction is zero; gradient differences need a nonzero direction.")
    return scale * min(ratios)


def expected_error(dtype: torch.dtype, method: str = FINITE_DIFFERENCE) -> float:
    """The relative error to expect of a gradient-difference product on a smooth model.

    ``u^(2/3)`` (central) or ``u^(4/5)`` (Richardson) times the worst constant measured on the
    benchmark's models. Kinks make it larger (NOTE [Kinks]).

    Args:
        dtype: The dtype of the products.
        method: :data:`FINITE_DIFFERENCE` or :data:`RICHARDSON`.

    Returns:
        The relative error, e.g. about 1.5e-4 for float32 central differences.

    Example:
        >>> expected_error(torch.float32) < 1e-3
        True
    """
    u = unit_roundoff(dtype)
    power = 2 / 3 if method == FINITE_DIFFERENCE else 4 / 5
    return min(1.0, _ERROR_CONSTANT[method] * u**power)


def half_precision_advice(dtype: torch.dtype) -> str | None:
    """What products in float16/bfloat16 are worth, and the way out; ``None`` for other dtypes.

    Measured by ``benchmarks/half_precision.py`` against float64 at the same weights: exact products
    0.55-8.7% off in bfloat16 and 0.07-2.1% in float16 (the most on ReLU networks, whose masks flip
    with the rounding); gradient differences 2.5-7.2% and 0.6-1.7%.

    Example:
        >>> half_precision_advice(torch.float32) is None
        True
    """
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    exact, differences = (
        ("1e-2 (up to 1e-1 on ReLU networks)", "1e-1")
        if dtype == torch.bfloat16
        else (
            "1e-3 (up to 2e-2 on ReLU networks)",
            "2e-2",
        )
    )
    return (
        f"The Hessian is computed in {dtype}, the parameters' dtype: exact products are off by about "
        f"{exact} and gradient differences by up to {differences} (relative), and some eigenvalue "
        f"solvers' factorizations have no {dtype} kernels. Pass dtype=torch.float32 to compute in float32 "
        "(parameters, buffers and floating inputs are cast for the products; the model is not changed), "
        "which works wherever the model's layers accept float32; HessianCallback does so by default."
    )


def parameter_lengths(tensors: Sequence[torch.Tensor]) -> list[float]:
    """``1 + ||θ_k||`` of each tensor (the lengths of NOTE [Step of gradient differences]), in float64."""
    return [1.0 + float(t.detach().to(torch.float64).norm()) for t in tensors]
