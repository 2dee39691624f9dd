"""The points ``θ + h d`` that gradient differences take their gradients at, made once and rewritten.

# NOTE [Cost of gradient differences]
A product of gradient differences is two plain gradients plus what it takes to set them up: the
step (norms of the direction's part on each parameter tensor), the points ``θ ± h d``, their leaves,
and the difference of the two gradients. On small models every tensor operation costs as much as a
layer's (a few microseconds each on a CPU, mostly dispatch), so making each point's tensors, leaves and
gradients anew, one per parameter tensor, cost more than half a gradient per product (a tanh MLP of
six tensors: 3.4 gradients per product instead of 2). A :class:`PerturbedPoint` holds one point's
values in one flat tensor, made once per operator: its views, by name, are what the module's slots get
(:class:`~lightning_hessian.state.TensorSlots`, swapped in once per call of the kernels) and the
targets' views are the leaves that require grad. Every gradient is taken at that point, rewritten in
between; the first of a difference is copied into a flat tensor of the point's and the second
subtracted from it. A gradient then costs a write of ``θ + h d``, its forward and backward and one copy
or subtraction, and the difference a division, whatever the number of parameter tensors; the values
are those of the per-tensor form, element by element (``θ + h d``, then ``(g₊ - g₋) / (2h)``). The
same tensors in the slots for every gradient also spare modules that cache their parameters
(``nn.LSTM``'s flat weights) a refresh per gradient. What remains above two gradients is fixed work:
about a dozen tensor operations (the norms and their sync, two writes, a copy, a subtraction, a
division, the finiteness check's sum, the vector's views) and the Python around them, 0.3-0.8 ms per
product on this machine's small models, less per product where a block of vectors goes through one
kernel call (``op @ V``, as the shared Krylov space multiplies). Measured with
``benchmarks/gradient_products.py --cost-only`` (1 thread, README "Gradient-difference products"): a
central product costs 2.0-2.2 gradients once a gradient takes about 10 ms, and 2.2-2.9 on the small
models of 0.4-3.9 ms gradients (this layout took the tanh MLP from 3.5 to 2.6-2.9).

The flat tensors are the operator's own (never the module's), taken at ``θ`` only through the values
written into them, and rewritten before every gradient: nothing is kept from one product to the next.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..parameters import ParameterSpace


def contiguous_runs(space: ParameterSpace, names: Sequence[str]) -> tuple[slice, ...]:
    """The flat index ranges of ``names`` in ``space``, adjacent tensors merged into one range.

    Example:
        >>> space = ParameterSpace(("a", "b", "c"), (torch.Size([2]), torch.Size([3]), torch.Size([1])))
        >>> contiguous_runs(space, ("a", "b"))
        (slice(0, 5, None),)
        >>> contiguous_runs(space, ("a", "c"))
        (slice(0, 2, None), slice(5, 6, None))
    """
    slices = space.slices()
    runs: list[slice] = []
    for name in names:
        piece = slices[name]
        if runs and runs[-1].stop == piece.start:
            runs[-1] = slice(runs[-1].start, piece.stop)
        else:
            runs.append(piece)
    return tuple(runs)


@dataclass(frozen=True)
class Targets:
    """The tensors a point's gradients are taken w.r.t., and where they go.

    Attributes:
        point: The point.
        names: The targets' names, in flat order.
        leaves: Their tensors in the point, the only ones that require grad.
        gradient: A flat tensor ``[N_targets]``: a gradient, or the difference of two.
        pieces: Its views shaped like the leaves.
    """

    point: PerturbedPoint
    names: tuple[str, ...]
    leaves: tuple[Tensor, ...]
    gradient: Tensor
    pieces: tuple[Tensor, ...]

    def store(self, gradient: Sequence[Tensor]) -> None:
        """Copy a gradient (one tensor per leaf) into :attr:`gradient`."""
        torch._foreach_copy_(self.pieces, gradient)

    def subtract(self, gradient: Sequence[Tensor]) -> None:
        """Subtract a gradient (one tensor per leaf) from :attr:`gradient`, in place."""
        torch._foreach_sub_(self.pieces, gradient)


class PerturbedPoint:
    """One reusable point near ``θ``: flat values, their named views, and a flat gradient (NOTE [Cost
    of gradient differences]).

    Args:
        space: The parameters' space (names, shapes, flat order).
        theta: ``θ`` as one flat tensor ``[N]`` in that order.

    Example:
        >>> point = PerturbedPoint(space, theta)
        >>> targets = point.targets(space.names)  # point.tensors go in the module's slots
        >>> point.move(direction, 1e-3, space.names)
        >>> targets.store(torch.autograd.grad(loss, targets.leaves))  # doctest: +SKIP
    """

    def __init__(self, space: ParameterSpace, theta: Tensor) -> None:
        self.space = space
        self.theta = theta
        self.values = torch.empty_like(theta)
        #: The values' views by name: what the module's slots get.
        self.tensors = space.unflatten(self.values)
        self._gradient = torch.empty_like(theta)
        self._targets: Targets | None = None
        self._runs: dict[tuple[str, ...], tuple[slice, ...]] = {}
        self._everything = (slice(0, space.numel),)

    def move(self, direction: Tensor, step: float, support: tuple[str, ...]) -> None:
        """Set the values to ``θ + step d``, ``d`` being ``direction`` on ``support`` and zero elsewhere.

        Args:
            direction: ``[N_support]``, in the flat order of the support's tensors.
            step: The multiple of ``direction``.
            support: The parameter names the direction lives on, in flat order.
        """
        runs = self._runs.get(support)
        if runs is None:
            runs = self._runs[support] = contiguous_runs(self.space, support)
        if runs == self._everything:
            torch.add(self.theta, direction, alpha=step, out=self.values)
            return
        self.values.copy_(self.theta)
        start = 0
        for run in runs:
            stop = start + run.stop - run.start
            torch.add(self.theta[run], direction[start:stop], alpha=step, out=self.values[run])
            start = stop

    def targets(self, names: tuple[str, ...]) -> Targets:
        """The :class:`Targets` of ``names`` (in flat order): their tensors then are the only ones of
        the point that require grad. Call before the forward passes.
        """
        if self._targets is None or self._targets.names != names:
            wanted = set(names)
            for name, tensor in self.tensors.items():
                tensor.requires_grad_(name in wanted)
            space = self.space.subspace(names)
            gradient = self._gradient[: space.numel]
            leaves = tuple(self.tensors[name] for name in names)
            pieces = tuple(space.unflatten(gradient).values())
            self._targets = Targets(self, names, leaves, gradient, pieces)
        return self._targets
