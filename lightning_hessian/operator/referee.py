"""The referee: gradient differences that judge an exact product on one vector, or say they cannot.

An exact method can be wrong without raising. A custom ``autograd.Function`` whose backward is
``@once_differentiable`` (as fused kernels' are) gives reverse-over-reverse products that silently lack
the second-order terms through it, and it has no forward-mode rule, so forward-over-reverse fails
and there is no second exact method to compare with. Gradient differences need no second-order
formula at all, so they referee every exact method on its first product, at two gradients.

# NOTE [Referee verdicts]
An exact product ``p`` is compared with the central difference ``D(h)`` of the same vector. Within
:func:`agreement_tolerance` of it (relative to the larger norm), ``p`` is right. Beyond it, the
referee's own reliability decides, measured as the spread ``||D(h) - D(h/4)||`` of a second
difference at a quarter of the step (two more gradients): rounding grows and truncation shrinks at
the smaller step, and kinks (NOTE [Kinks] in :mod:`.differences`) or pure rounding noise change the
difference completely. ``p`` is wrong only if it is more than :data:`REFEREE_MARGIN` times further
from ``D(h)`` than that spread. This is also NOTE [Disagreement the referee cannot resolve]: where a
product is (nearly) zero, e.g. a bias before a train-mode BatchNorm, the exact methods return
rounding noise and the differences return larger noise that changes with the step, so no verdict is
given and the exact method stays. So the referee cannot judge float32 products of ReLU networks
(their differences cross kinks); there it keeps the exact method, recorded as unverified.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .differences import FINITE_DIFFERENCE
from .kernels import ProductKernels

#: How much further from the gradient differences than their own spread a product must be to be wrong.
REFEREE_MARGIN = 10.0
_SECOND_STEP = 0.25  # the second opinion's step, as a multiple of the first
_USEFUL_SPREAD = 0.1  # differences that move more than this between two steps verify nothing


def relative_difference(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / max(||a||, ||b||)`` (0 for two zero tensors)."""
    scale = max(float(a.norm()), float(b.norm()), torch.finfo(a.dtype).tiny)
    return float((a - b).norm()) / scale


def agreement_tolerance(dtype: torch.dtype) -> float:
    """Relative difference two exact methods, or an exact method and the referee, may show from rounding."""
    return 1e-3 if dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-7


@dataclass(frozen=True)
class Verdict:
    """What the referee concluded about one product.

    Attributes:
        wrong: The product is wrong (see NOTE [Referee verdicts]).
        difference: ``||product - D(h)|| / ||D(h)||``.
        spread: The referee's relative spread between two steps, when it had to be measured (the
            product did not agree at once), else ``None``.
    """

    wrong: bool
    difference: float
    spread: float | None = None

    @property
    def verified(self) -> bool:
        """Whether the product agreed with a referee that could judge it (one whose spread is small)."""
        if self.wrong or self.spread is None:
            return not self.wrong
        return self.spread < _USEFUL_SPREAD and self.difference <= self.spread

    def describe(self) -> str:
        """One line for a warning or an error message."""
        spread = "" if self.spread is None else f", whose own spread between two steps is {self.spread:.1e}"
        return f"relative difference {self.difference:.2e} from gradient differences{spread}"


class Referee:
    """Central gradient differences of one chunk of vectors, computed when first asked for.

    Args:
        kernels: The product kernels (their gradient differences are the referee).
        rows: ``[m, N_support]`` vectors.
        support: Parameter names the vectors live on.
        targets: Parameter names whose product entries are compared.

    Example:
        >>> referee = Referee(kernels, rows, support, targets)  # doctest: +SKIP
        >>> referee.judge(exact_product).wrong  # doctest: +SKIP
        False
    """

    def __init__(
        self, kernels: ProductKernels, rows: Tensor, support: tuple[str, ...], targets: tuple[str, ...]
    ) -> None:
        self.kernels, self.rows, self.support, self.targets = kernels, rows, support, targets
        self.seconds = math.nan  # per row, of the first difference
        self._product: Tensor | None = None
        self._second: Tensor | None = None

    def product(self) -> Tensor:
        """``D(h)`` of every row (two gradients each): the referee, and the fallback's product."""
        if self._product is None:
            start = time.perf_counter()
            self._product = self._differences(1.0)
            self.seconds = (time.perf_counter() - start) / self.rows.shape[0]
        return self._product

    def spread(self) -> float:
        """``||D(h) - D(h/4)|| / ||D(h)||``: how much the differences change with their step."""
        first = self.product()
        if self._second is None:
            self._second = self._differences(_SECOND_STEP)
        tiny = torch.finfo(first.dtype).tiny
        return float((first - self._second).norm()) / max(float(first.norm()), tiny)

    def judge(self, product: Tensor) -> Verdict:
        """Whether an exact ``product`` of the rows is wrong (NOTE [Referee verdicts]).

        Raises:
            RuntimeError: If the gradient differences fail or are not finite (the caller decides).
        """
        reference = self.product()
        tiny = torch.finfo(reference.dtype).tiny
        distance = float((product - reference).norm()) / max(float(reference.norm()), tiny)
        if relative_difference(product, reference) <= agreement_tolerance(self.kernels.dtype):
            return Verdict(False, distance)
        spread = self.spread()
        return Verdict(distance > REFEREE_MARGIN * spread, distance, spread)

    def _differences(self, factor: float) -> Tensor:
        out = self.kernels.products(
            self.rows, FINITE_DIFFERENCE, True, self.support, self.targets, step_factor=factor
        )
        if not bool(torch.isfinite(out).all()):
            raise RuntimeError("gradient differences are not finite")
        return out
