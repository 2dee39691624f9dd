"""Hessian-vector product kernels: the exact ones, and gradient differences.

Every kernel computes this rank's weighted sum over batches of ``H_b @ v``. The exact ones use
Pearlmutter's trick:

- ``"reverse-over-reverse"``: differentiate each batch's cached gradient once more with
  ``grad_outputs=v``; many vectors at once through ``is_grads_batched`` (vmap over the backward).
- ``"forward-over-reverse"``: ``torch.func.jvp`` of ``torch.func.grad``; many vectors at once through
  ``torch.func.vmap``.

``"finite-difference"`` and ``"finite-difference-richardson"`` difference two (four) plain gradients
instead (:mod:`.differences`), with ReLU and max-pool kinks frozen at ``θ`` so that they differentiate
the function the exact methods do (NOTE [Frozen kinks] in :mod:`.kinks`); their "batched" form is a
loop over the vectors.

Vectors may live on a subset of the parameters (``support``) and only some entries of the product
may be wanted (``targets``): autograd then skips every layer that neither touches, which the dense
path uses to compute one triangle of the matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial

import torch
from torch import Tensor

from ..closure import LossClosure
from ..parameters import ParameterSpace
from ..state import differentiable_context
from .differences import (
    DIFFERENCE_METHODS,
    FINITE_DIFFERENCE,
    difference_step,
    parameter_lengths,
)
from .graphs import FirstOrderGraph, GraphCache
from .kinks import FrozenKinks, KinkCache, KinkMismatch
from .points import PerturbedPoint, Targets

REVERSE = "reverse-over-reverse"
FORWARD = "forward-over-reverse"
#: The exact methods, which ``hvp="auto"`` times and chooses from.
EXACT_METHODS = (REVERSE, FORWARD)
METHODS = EXACT_METHODS + DIFFERENCE_METHODS


class ProductKernels:
    """This rank's Hessian-vector products of a loss closure at fixed parameter values.

    Args:
        closure: The loss closure.
        params: Parameter values, by name, in flat order.
        graphs: The first-order graph cache of ``closure`` at ``params``.
        num_samples: Samples over all ranks: batch ``i`` is weighted ``batch_size_i / num_samples``.

    Example:
        >>> kernels = ProductKernels(closure, params, graphs, closure.num_samples)
        >>> hv = kernels.products(v.unsqueeze(0), REVERSE, batched=False)  # doctest: +SKIP
    """

    def __init__(
        self, closure: LossClosure, params: Mapping[str, Tensor], graphs: GraphCache, num_samples: int
    ) -> None:
        self.closure = closure
        self.params = dict(params)
        self.space = ParameterSpace.from_tensors(self.params)
        self.graphs = graphs
        self.num_samples = num_samples
        first = next(iter(self.params.values()))
        self.dtype, self.device = first.dtype, first.device
        self._lengths = dict(
            zip(self.space.names, parameter_lengths(list(self.params.values())), strict=True)
        )
        #: The activation patterns at θ that gradient differences replay (NOTE [Frozen kinks]).
        self.kinks = KinkCache(closure, self.params)
        self._perturbed: PerturbedPoint | None = None

    def products(
        self,
        rows: Tensor,
        method: str,
        batched: bool,
        support: tuple[str, ...] | None = None,
        targets: tuple[str, ...] | None = None,
        out: Tensor | None = None,
        step_factor: float = 1.0,
    ) -> Tensor:
        """Local weighted sum over batches of ``H_b @ rows[j]`` for each row ``j``.

        Each parameter's product is written straight into its columns of ``out`` (no concatenation,
        no zero-filled accumulator), so ``out`` may be rows of a dense matrix; gradient differences
        write each row's flat difference into its row.

        Args:
            rows: ``[m, N_support]`` vectors over the ``support`` parameters.
            method: One of :data:`METHODS`.
            batched: All rows in one batched call (else ``m`` must be 1); gradient differences loop.
            support: Parameter names the vectors live on (default all).
            targets: Parameter names whose product entries are wanted (default all).
            out: ``[m, N_targets]`` destination (any strides); default a new tensor.
            step_factor: Gradient differences only: a multiple of their step (the referee's second
                opinion uses a quarter of it).

        Returns:
            ``[m, N_targets]`` (``out`` when given).
        """
        support = self.space.subspace(support or self.space.names).names  # in flat order
        target_space = self.space.subspace(targets or self.space.names)
        if out is None:
            out = torch.empty(rows.shape[0], target_space.numel, dtype=self.dtype, device=self.device)
        if method in DIFFERENCE_METHODS:
            targets = target_space.names
            try:
                self._differences(rows, method, support, targets, out, step_factor)
            except KinkMismatch:  # freezing is off now: every row and batch again, unfrozen
                self._differences(rows, method, support, targets, out, step_factor)
            return out
        tangents = self.space.subspace(support).unflatten(rows)
        columns = [out[:, piece] for piece in target_space.slices().values()]
        product = self._reverse if method == REVERSE else self._forward
        self._accumulate(product, tangents, batched, target_space.names, columns)
        return out

    def _accumulate(
        self,
        product: Callable[..., list[Tensor | None]],
        tangents: dict[str, Tensor],
        batched: bool,
        targets: tuple[str, ...],
        columns: list[Tensor],
    ) -> None:
        """Write the weighted sum over batches of ``product``'s pieces into ``columns``."""
        m = next(iter(tangents.values())).shape[0]
        with self.closure.held():
            for i in range(len(self.closure.batches)):
                weight = self.closure.weight(i, self.num_samples)
                pieces = product(i, tangents, batched, targets)
                for destination, piece in zip(columns, pieces, strict=True):
                    if piece is None:  # the target does not depend on the support
                        if i == 0:
                            destination.zero_()
                        continue
                    piece = piece.detach().reshape(m, -1)
                    if i > 0:
                        destination.add_(piece, alpha=weight)
                    elif weight == 1.0:
                        destination.copy_(piece)
                    else:
                        torch.mul(piece, weight, out=destination)

    def _reverse(
        self, index: int, tangents: dict[str, Tensor], batched: bool, targets: tuple[str, ...]
    ) -> list[Tensor | None]:
        graph = self.graphs.get(index)
        leaf = dict(zip(self.space.names, graph.leaves, strict=True))
        grad = dict(zip(self.space.names, graph.grads, strict=True))
        pairs = [
            (grad[name], t if batched else t[0])
            for name, t in tangents.items()
            if grad[name] is not None and grad[name].requires_grad
        ]
        if not pairs:
            return [None] * len(targets)
        with differentiable_context(self.device):
            hv = torch.autograd.grad(
                [g for g, _ in pairs],
                [leaf[name] for name in targets],
                grad_outputs=[t for _, t in pairs],
                retain_graph=self.graphs.enabled,
                allow_unused=True,
                is_grads_batched=batched,
            )
        return list(hv)

    def _forward(
        self, index: int, tangents: dict[str, Tensor], batched: bool, targets: tuple[str, ...]
    ) -> list[Tensor]:
        closure = self.closure
        support = tuple(tangents)
        with closure.context():
            fixed = closure.buffers()
            constants = {n: p for n, p in self.params.items() if n not in support}

            def gradient(support_values: dict[str, Tensor]) -> dict[str, Tensor]:
                def loss(target_values: dict[str, Tensor]) -> Tensor:
                    return closure.batch_loss({**constants, **support_values, **target_values}, index, fixed)

                start = {n: support_values[n] if n in support_values else constants[n] for n in targets}
                return torch.func.grad(loss)(start)

            primals = {n: self.params[n] for n in support}

            def hvp(tangent: dict[str, Tensor]) -> dict[str, Tensor]:
                return torch.func.jvp(gradient, (primals,), (tangent,))[1]

            try:
                if batched:
                    result = torch.func.vmap(hvp, randomness="same")(tangents)
                else:
                    result = hvp({k: t[0] for k, t in tangents.items()})
            except RuntimeError as error:
                if "ZeroTensors are immutable" not in str(error):
                    raise
                raise RuntimeError(
                    "forward-over-reverse products fail on this loss: torch.func's forward-mode AD raises "
                    "'ZeroTensors are immutable' (a torch limitation, e.g. with F.mse_loss). Use "
                    "hvp='auto' (it falls back to reverse-over-reverse) or hvp='reverse-over-reverse'."
                ) from error
        return [result[n] for n in targets]

    def local_loss(self, params: Mapping[str, Tensor], use_graphs: bool = True) -> Tensor:
        """This rank's weighted loss ``[1]`` (float64) at ``params``; from the kept graphs if allowed."""
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        for i in range(len(self.closure.batches)):
            graph = self.graphs.kept(i) if use_graphs else None
            if graph is None:
                with self.closure.context(), torch.no_grad():
                    value = self.closure.batch_loss(params, i)
            else:
                value = graph.loss
            total += float(value) * self.closure.weight(i, self.num_samples)
        return total

    def local_gradient(self) -> Tensor:
        """This rank's weighted gradient ``[N]`` at the kernels' parameters, from the kept graphs
        where every batch has one, else one backward per batch (:meth:`gradient`).
        """
        batches = range(len(self.closure.batches))
        if not all(self.graphs.kept(i) is not None for i in batches):
            return self.gradient(self.params)
        total = torch.zeros(self.space.numel, dtype=self.dtype, device=self.device)
        for i in batches:
            graph = self.graphs.kept(i)
            flat = [
                torch.zeros_like(leaf).reshape(-1) if g is None else g.detach().reshape(-1)
                for leaf, g in zip(graph.leaves, graph.grads, strict=True)
            ]
            total += self.closure.weight(i, self.num_samples) * torch.cat(flat)
        return total

    def gradient(self, params: Mapping[str, Tensor]) -> Tensor:
        """This rank's weighted gradient ``[N]`` of the loss at ``params`` (a plain backward pass)."""
        total = torch.zeros(self.space.numel, dtype=self.dtype, device=self.device)
        for i in range(len(self.closure.batches)):
            leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
            with self.closure.context():
                grads = self._batch_gradient(i, leaves)
            total += self.closure.weight(i, self.num_samples) * torch.cat([g.reshape(-1) for g in grads])
        return total

    def _batch_gradient(self, index: int, leaves: Mapping[str, Tensor]) -> list[Tensor]:
        """Batch ``index``'s gradient w.r.t. ``leaves`` swapped in, the backward inside the swap
        (:meth:`LossClosure.evaluated`); zeros where the loss does not depend on the leaves. Call inside
        the closure's context.
        """
        with self.closure.evaluated(leaves, index) as loss:
            if not loss.requires_grad:
                return [torch.zeros_like(leaf) for leaf in leaves.values()]
            return list(
                torch.autograd.grad(loss, list(leaves.values()), allow_unused=True, materialize_grads=True)
            )

    def gradients_along(
        self, row: Tensor, support: tuple[str, ...], targets: tuple[str, ...], multiples: tuple[float, ...]
    ) -> tuple[list[Tensor], float]:
        """Weighted gradients ``[N_targets]`` at ``θ + k h d`` for each multiple ``k``, for the referee.

        ``d`` is ``row`` over the support and ``h`` the central step along it (as the
        ``"finite-difference"`` products take it); a multiple of 0 reads the gradient at ``θ`` from
        the cached first-order graphs when every batch has one.

        Args:
            row: ``[N_support]`` direction (not zero).
            support: Parameter names the direction lives on.
            targets: Parameter names whose gradient entries are wanted.
            multiples: The steps, as multiples of ``h``.

        Returns:
            The gradients, in the order of ``multiples``, and ``h`` (per unit of ``row``).
        """
        support = self.space.subspace(support).names  # in flat order, as the row's entries
        targets = self.space.subspace(targets).names
        norms = self._norms(row[None], support)[0]
        step = difference_step(self.dtype, self._support_lengths(support), norms)
        try:
            return self._gradients_along(row, step, support, targets, multiples), step
        except KinkMismatch:  # freezing is off now: every gradient again, unfrozen
            return self._gradients_along(row, step, support, targets, multiples), step

    def _gradients_along(
        self,
        row: Tensor,
        step: float,
        support: tuple[str, ...],
        targets: tuple[str, ...],
        multiples: tuple[float, ...],
    ) -> list[Tensor]:
        cached = [self.graphs.kept(i) for i in range(len(self.closure.batches))]
        point = self._point(keep=False)
        selected = point.targets(targets)
        totals = [torch.zeros_like(selected.gradient) for _ in multiples]
        with self.closure.context(second_order=False):
            fixed = self.closure.buffers()
            with self.closure.swapped(point.tensors, fixed):
                for i, graph in enumerate(cached):
                    weight = self.closure.weight(i, self.num_samples)
                    for total, multiple in zip(totals, multiples, strict=True):
                        if multiple == 0 and graph is not None:
                            selected.store(self._kept_gradient(graph, targets))
                        else:
                            self._gradient_at(i, row, multiple * step, support, selected, fixed)
                        total.add_(selected.gradient, alpha=weight)
        return totals

    def _kept_gradient(self, graph: FirstOrderGraph, targets: tuple[str, ...]) -> list[Tensor]:
        """The targets' gradient at ``θ`` from a batch's cached first-order graph (zeros where unused)."""
        kept = dict(zip(self.space.names, graph.grads, strict=True))
        return [torch.zeros_like(self.params[n]) if kept[n] is None else kept[n].detach() for n in targets]

    def _differences(
        self,
        rows: Tensor,
        method: str,
        support: tuple[str, ...],
        targets: tuple[str, ...],
        out: Tensor,
        step_factor: float,
    ) -> None:
        """Each row's weighted sum over batches of its gradient differences, into its row of ``out``
        (NOTE [Step of gradient differences]); a zero row gives zeros.

        The point's tensors stay in the module's slots for all of them (NOTE [Cost of gradient
        differences]).
        """
        batches = range(len(self.closure.batches))
        point = self._point()
        selected = point.targets(targets)
        lengths = self._support_lengths(support)
        with self.closure.context(second_order=False):
            fixed = self.closure.buffers()
            with self.closure.swapped(point.tensors, fixed):
                rows_norms = self._norms(rows, support)
                for row, destination, norms in zip(rows.unbind(), out.unbind(), rows_norms, strict=True):
                    if not any(norms):
                        destination.zero_()
                        continue
                    step = difference_step(self.dtype, lengths, norms, method) * step_factor
                    for i in batches:
                        weight = self.closure.weight(i, self.num_samples)
                        difference = partial(self._difference, i, row, step, method, support, selected, fixed)
                        if i > 0:
                            destination.add_(difference(), alpha=weight)
                        elif weight == 1.0:
                            difference(out=destination)
                        else:
                            torch.mul(difference(), weight, out=destination)

    def _difference(
        self,
        index: int,
        row: Tensor,
        step: float,
        method: str,
        support: tuple[str, ...],
        targets: Targets,
        fixed: Mapping[str, Tensor],
        out: Tensor | None = None,
    ) -> Tensor:
        """Batch ``index``'s central difference along ``row`` ``[N_targets]``, or its Richardson form
        ``(4 D(h/2) - D(h)) / 3``; into ``out`` when given.
        """
        if method == FINITE_DIFFERENCE:
            return self._central(index, row, step, support, targets, fixed, out)
        coarse = self._central(index, row, step, support, targets, fixed)
        fine = self._central(index, row, step / 2, support, targets, fixed)
        return torch.div(4 * fine - coarse, 3, out=out)

    def _central(
        self,
        index: int,
        row: Tensor,
        step: float,
        support: tuple[str, ...],
        targets: Targets,
        fixed: Mapping[str, Tensor],
        out: Tensor | None = None,
    ) -> Tensor:
        """``(g(θ + step d) - g(θ - step d)) / (2 step)`` of batch ``index`` ``[N_targets]``, ``d`` being
        ``row`` on the support; into ``out`` when given.
        """
        self._gradient_at(index, row, step, support, targets, fixed)
        self._gradient_at(index, row, -step, support, targets, fixed, subtract=True)
        return torch.div(targets.gradient, 2 * step, out=out)

    def _gradient_at(
        self,
        index: int,
        row: Tensor,
        step: float,
        support: tuple[str, ...],
        targets: Targets,
        fixed: Mapping[str, Tensor],
        subtract: bool = False,
    ) -> None:
        """Batch ``index``'s gradient w.r.t. the targets at ``θ + step d`` into ``targets.gradient``, or
        subtracted from it (call with the point swapped in, inside the context).

        The point ``θ + step d`` is the operator's own tensor; the saved ``θ`` and the module are
        never written (NOTE [Gradient differences leave the module alone]). Only the targets require
        grad, so autograd stops at the first layer that holds one. The forward replays the activation
        patterns at ``θ`` (NOTE [Frozen kinks]).

        Raises:
            KinkMismatch: If the forward did not follow the recorded patterns (freezing is off now).
        """
        targets.point.move(row, step, support)
        sink = targets.subtract if subtract else targets.store
        self.kinks.run(index, fixed, partial(self._gradient_into, index, targets.leaves, sink))

    def _gradient_into(
        self,
        index: int,
        leaves: tuple[Tensor, ...],
        sink: Callable[[Sequence[Tensor]], None],
        replay: FrozenKinks | None,
    ) -> None:
        """Batch ``index``'s gradient w.r.t. ``leaves`` (zeros where the loss does not depend on them),
        given to ``sink``; ``replay`` is closed after the forward.
        """
        loss = self.closure.module_loss(index)
        if replay is not None:
            replay.close()
        if loss.requires_grad:
            sink(torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True))
        else:
            sink([torch.zeros_like(leaf) for leaf in leaves])

    def _point(self, keep: bool = True) -> PerturbedPoint:
        """The point of gradient differences (NOTE [Cost of gradient differences]): three tensors of
        ``θ``'s size (``θ`` flat, the point's values, a gradient), made on first use and kept for the
        products; ``keep=False`` (the referee's gradients) keeps no new one, so that an operator whose
        products are exact holds none.
        """
        if self._perturbed is not None:
            return self._perturbed
        point = PerturbedPoint(self.space, self.space.flatten(self.params))
        if keep:
            self._perturbed = point
        return point

    def _norms(self, rows: Tensor, support: tuple[str, ...]) -> list[list[float]]:
        """``||d_k||`` of each row's part on each support tensor ``k`` (one reduction, one sync)."""
        sizes = self.space.subspace(support).sizes
        parts = [part for row in rows.unbind() for part in row.split_with_sizes(sizes)]
        return torch.stack(torch._foreach_norm(parts)).view(rows.shape[0], len(sizes)).tolist()

    def _support_lengths(self, support: tuple[str, ...]) -> list[float]:
        return [self._lengths[n] for n in support]
