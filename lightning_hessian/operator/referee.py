"""The referee: gradient differences that judge an exact product on one vector, or say they cannot.

An exact method can be wrong without raising. A custom ``autograd.Function`` whose backward is
``@once_differentiable`` (as fused kernels' are) gives reverse-over-reverse products that silently lack
the second-order terms through it, and it has no forward-mode rule, so forward-over-reverse fails
and there is no second exact method to compare with. Gradient differences need no second-order
formula at all, so they referee every exact method on its first product, at two gradients.

# NOTE [Referee verdicts]
An exact product ``p`` of a direction ``d`` is compared with the central difference
``D(h) = (g(θ + h d) - g(θ - h d)) / (2h)`` (two gradients). Within :func:`agreement_tolerance` of it
(relative to the larger norm), ``p`` is right: the verdict of every smooth model, at 3e-5 in float32
and 1e-10 in float64 on the benchmark's. Beyond it, the referee's own reliability decides, in two
steps. First the second difference ``g(θ + h d) + g(θ - h d) - 2 g(θ)`` against the first (the
gradient at ``θ`` is free from the cached first-order graphs): on a smooth loss their ratio is about
``h / L``, 5e-3 in float32; a kink inside the step (NOTE [Kinks] in :mod:`.differences`) puts its jump
into both, and where the product is nearly zero both are rounding noise, so the ratio nears 1. Above
0.1 there is no verdict, and the exact method stays, recorded as unverified: so the referee cannot
judge float32 products of networks whose kinks the differences do not freeze (``abs``, ``clamp``, a
compiled module's; ReLU and max-pool kinks are frozen at ``θ``, NOTE [Frozen kinks] in :mod:`.kinks`,
and their networks' products are judged like smooth ones), nor the zero Hessian of a bias before a
train-mode BatchNorm (NOTE [Disagreement the referee cannot resolve]). Otherwise a second difference at a
quarter of the step measures the referee's spread ``||D(h) - D(h/4)||`` (two more gradients; rounding
grows and truncation shrinks at the smaller step, so the spread is at least about ``D(h)``'s error), and
``p`` is wrong only if it is more than :data:`REFEREE_MARGIN` times further from ``D(h)`` than that.
A once-differentiable tanh is found 30-60% off, against a spread of 1e-4 in float32.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ..distributed import all_finite
from .kernels import ProductKernels

#: How much further from the gradient differences than their own spread a product must be to be wrong.
REFEREE_MARGIN = 10.0
_SECOND_STEP = 0.25  # the second opinion's step, as a multiple of the first
_USEFUL_SPREAD = 0.1  # differences that move more than this between two steps verify nothing
_KINKED = 0.1  # a second difference this large against the first: kinks or noise, no verdict


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
        kinks: The gradients' second difference against their first, when measured (the product did
            not agree at once): near 0 on a smooth loss, near 1 across kinks or in rounding noise.
        spread: The differences' relative change between two steps, when measured, else ``None``.
    """

    wrong: bool
    difference: float
    kinks: float | None = None
    spread: float | None = None

    @property
    def verified(self) -> bool:
        """Whether the product agreed with a referee that could judge it (one whose spread is small)."""
        if self.wrong or self.kinks is None:
            return not self.wrong
        return self.spread is not None and self.spread < _USEFUL_SPREAD and self.difference <= self.spread

    def describe(self) -> str:
        """One line for a warning or an error message."""
        text = f"relative difference {self.difference:.2e} from gradient differences"
        if self.spread is not None:
            return f"{text}, whose own spread between two steps is {self.spread:.1e}"
        if self.kinks is not None:
            return f"{text}, which cross kinks or rounding noise here (second difference {self.kinks:.1e})"
        return text


class Referee:
    """Central gradient differences of one chunk of vectors, computed when first asked for.

    Args:
        kernels: The product kernels (their gradients are the referee's).
        rows: ``[m, N_support]`` vectors; :meth:`judge` and :meth:`spread` look at the first.
        support: Parameter names the vectors live on.
        targets: Parameter names whose product entries are compared.
        product: ``D(h)`` of the rows when already computed (``"finite-difference"`` products).

    Example:
        >>> referee = Referee(kernels, rows, support, targets)  # doctest: +SKIP
        >>> referee.judge(exact_product).wrong  # doctest: +SKIP
        False
    """

    def __init__(
        self,
        kernels: ProductKernels,
        rows: Tensor,
        support: tuple[str, ...],
        targets: tuple[str, ...],
        product: Tensor | None = None,
    ) -> None:
        self.kernels, self.rows, self.support, self.targets = kernels, rows, support, targets
        self.seconds = math.nan  # per row, of the first difference
        self._product = product
        self._own_product = product is None
        self._gradients: dict[float, Tensor] = {}  # of the first row, by multiple of the step
        self._step = math.nan
        self._version = kernels.kinks.version

    def product(self) -> Tensor:
        """``D(h)`` of every row (two gradients each): the referee, and the fallback's product.

        Raises:
            RuntimeError: If the differences are not finite.
        """
        self._sync()
        while self._product is None:
            start = time.perf_counter()
            out = torch.zeros(
                self.rows.shape[0],
                self.kernels.space.subspace(self.targets).numel,
                dtype=self.kernels.dtype,
                device=self.kernels.device,
            )
            for j, row in enumerate(self.rows):
                if float(row.norm()) > 0:
                    out[j] = self._central(row, 1.0, keep=j == 0)
            self.seconds = (time.perf_counter() - start) / self.rows.shape[0]
            if not self._sync():  # else freezing stopped on the way: all rows again, unfrozen
                self._product = _finite(out)
        return self._product

    def kinks(self) -> float:
        """``||g(θ + h d) + g(θ - h d) - 2 g(θ)|| / ||g(θ + h d) - g(θ - h d)||`` of the first row.

        On a smooth loss it is about ``h |T3[d, d]| / (2 |H d|)``, small; a kink inside the step puts
        its jump into both differences, and rounding noise makes both alike, so it nears 1. The
        gradient at ``θ`` comes from the cached first-order graphs when there are any.
        """
        first = self.rows[0]
        if not self._gradients or float(first.norm()) == 0:
            return math.inf
        (plus, minus, middle), _ = self._fill(first, (1.0, -1.0, 0.0))
        difference = float((plus - minus).norm())
        return float((plus + minus - 2 * middle).norm()) / difference if difference > 0 else math.inf

    def spread(self) -> float:
        """``||D(h) - D(h/4)|| / ||D(h)||`` of the first row: how the differences change with their step."""
        first = self.product()[0]
        if float(self.rows[0].norm()) == 0:
            return math.inf
        second = _finite(self._central(self.rows[0], _SECOND_STEP, keep=True))
        return float((first - second).norm()) / max(float(first.norm()), torch.finfo(first.dtype).tiny)

    def judge(self, product: Tensor) -> Verdict:
        """Whether an exact ``product`` of the first row is wrong (NOTE [Referee verdicts]).

        Raises:
            RuntimeError: If the gradient differences fail or are not finite (the caller decides).
        """
        reference = self.product()[0]
        product = product.reshape(-1)
        tiny = torch.finfo(reference.dtype).tiny
        distance = float((product - reference).norm()) / max(float(reference.norm()), tiny)
        if relative_difference(product, reference) <= agreement_tolerance(self.kernels.dtype):
            return Verdict(False, distance)
        kinks = self.kinks()
        if kinks > _KINKED:
            return Verdict(False, distance, kinks)
        spread = self.spread()
        return Verdict(distance > REFEREE_MARGIN * spread, distance, kinks, spread)

    def _central(self, row: Tensor, multiple: float, keep: bool) -> Tensor:
        (plus, minus), step = self._fill(row, (multiple, -multiple), keep)
        return (plus - minus) / (2 * multiple * step)

    def _fill(
        self, row: Tensor, multiples: tuple[float, ...], keep: bool = True
    ) -> tuple[list[Tensor], float]:
        """The gradients at the given multiples of the step along ``row``, and the step; ``keep``
        (the first row) computes each multiple once.
        """
        if not keep:
            return self.kernels.gradients_along(row, self.support, self.targets, multiples)
        self._sync()
        missing = tuple(k for k in multiples if k not in self._gradients)
        if missing:
            found, self._step = self.kernels.gradients_along(row, self.support, self.targets, missing)
            if self._sync():  # freezing stopped on the way: the kept gradients are dropped
                return self._fill(row, multiples, keep)
            self._gradients.update(zip(missing, found, strict=True))
        return [self._gradients[k] for k in multiples], self._step

    def _sync(self) -> bool:
        """Drop the differences kept from before the kernels stopped freezing kinks (NOTE [Frozen
        kinks]), so that a referee never mixes frozen and unfrozen gradients; whether it did.
        """
        if self.kernels.kinks.version == self._version:
            return False
        self._version = self.kernels.kinks.version
        self._gradients.clear()
        if self._own_product:
            self._product = None
        return True


def _finite(values: Tensor) -> Tensor:
    if not all_finite(values):
        raise RuntimeError("gradient differences are not finite")
    return values
