"""The first-order graph of each batch, built once and reused by every reverse-over-reverse product.

A reverse-over-reverse product differentiates the gradient ``g(θ)`` once more, so it needs the graph
that computed ``g`` with ``create_graph=True``. Building it is a forward and a backward pass; keeping it
makes every later product a single (double) backward pass. Graphs are kept while all of them fit in
:data:`GRAPH_CACHE_SHARE` of the device's free memory (measured on the first batch, scaled by samples).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..closure import LossClosure
from ..memory import available_memory, saved_tensor_bytes
from .second_order import SecondOrderForms

#: Share of free memory the cached first-order graphs may take.
GRAPH_CACHE_SHARE = 0.25


@dataclass
class FirstOrderGraph:
    """One batch's loss and gradient, with the graph that computed them.

    Attributes:
        leaves: The parameter tensors differentiated (in the operator's flat order).
        grads: ``d loss / d leaf`` with ``create_graph=True`` (``None`` where the loss does not
            depend on the leaf).
        loss: The batch's loss, detached.
    """

    leaves: list[Tensor]
    grads: list[Tensor | None]
    loss: Tensor


class GraphCache:
    """Builds first-order graphs of a closure's batches and keeps them while memory allows.

    Args:
        closure: The loss closure whose batches the graphs belong to.
        params: Parameter values to differentiate at, by name, in flat order.

    Example:
        >>> cache = GraphCache(closure, params)
        >>> graph = cache.get(0)  # doctest: +SKIP
    """

    def __init__(self, closure: LossClosure, params: Mapping[str, Tensor]) -> None:
        self.closure = closure
        self.params = dict(params)
        self.enabled = False
        self.first_graph_bytes = 0
        self._graphs: dict[int, FirstOrderGraph] = {}

    def build(self, index: int, create_graph: bool = True) -> FirstOrderGraph:
        """Build (never cache) the graph of batch ``index``; the first batch's size is measured.

        ``create_graph=False`` builds a plain gradient (for a dependence check where no product will
        differentiate it: gradient differences need no second-order graph, and some modules have none).
        """
        leaves = {n: p.detach().requires_grad_(True) for n, p in self.params.items()}
        with (
            self.closure.context(),
            saved_tensor_bytes() as counter,
            SecondOrderForms(),
            self.closure.evaluated(leaves, index) as loss,
        ):
            if not loss.requires_grad:
                grads: list[Tensor | None] = [None] * len(leaves)
            else:
                grads = list(
                    torch.autograd.grad(
                        loss, list(leaves.values()), create_graph=create_graph, allow_unused=True
                    )
                )
        if index == 0:
            self.first_graph_bytes = counter[0]
        return FirstOrderGraph(list(leaves.values()), grads, loss.detach())

    def enable(self, setting: bool | str, first: FirstOrderGraph | None = None) -> bool:
        """Decide whether graphs are kept, and keep ``first`` (batch 0's graph) if so.

        Args:
            setting: ``True``, ``False``, or ``"auto"``: keep them while all batches' graphs would fit
                in :data:`GRAPH_CACHE_SHARE` of free memory (estimated from the first batch's).
            first: Batch 0's graph, already built, to keep.

        Returns:
            Whether graphs are kept.
        """
        if setting == "auto":
            free = available_memory(next(iter(self.params.values())).device)
            per_sample = self.first_graph_bytes / max(1, self.closure.batch_sizes[0])
            self.enabled = free is None or per_sample * self.closure.num_samples <= GRAPH_CACHE_SHARE * free
        else:
            self.enabled = bool(setting)
        if self.enabled and first is not None:
            self._graphs[0] = first
        return self.enabled

    def get(self, index: int) -> FirstOrderGraph:
        """The graph of batch ``index``: the kept one, or a new one (kept when caching is on)."""
        graph = self._graphs.get(index)
        if graph is None:
            graph = self.build(index)
            if self.enabled:
                self._graphs[index] = graph
        return graph

    def kept(self, index: int) -> FirstOrderGraph | None:
        """The kept graph of batch ``index``, or ``None``."""
        return self._graphs.get(index)

    def release(self) -> None:
        """Free every kept graph (they are rebuilt when needed)."""
        self._graphs.clear()
