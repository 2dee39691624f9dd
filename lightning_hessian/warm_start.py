"""Vectors kept between evaluations: the top Ritz vectors a warm start begins the next Krylov space
from, and the top eigenvectors the next eigenvector overlap is measured against.

Each block's vectors are kept where memory allows: on the device, else on the CPU, else they are
dropped with one info message, whose consequence each store states (a warm start's next evaluation
starts cold, with the same accuracy; the next eigenvector overlap of that block is not logged).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from .memory import available_memory

#: Share of free memory the kept vectors may take.
KEEP_SHARE = 0.1


#: What a dropped warm start costs (:class:`RitzVectorStore`'s default ``consequence``).
COLD_START = "the evaluation after a drop starts cold (same accuracy, more products)"


class RitzVectorStore:
    """The previous evaluation's vectors by block name (Ritz vectors, or top eigenvectors).

    Args:
        inform: Called once with a message when vectors had to be dropped for memory.
        what: What the vectors are, for the message (e.g. ``"Ritz vectors"``).
        consequence: What a drop costs, for the message; ``{block}`` stands for the block's name.

    Example:
        >>> store = RitzVectorStore(print)
        >>> store.keep({"model": torch.ones(4, 2)})
        >>> store.vectors["model"].shape
        torch.Size([4, 2])
    """

    def __init__(
        self, inform: Callable[[str], None], what: str = "Ritz vectors", consequence: str = COLD_START
    ) -> None:
        self.vectors: dict[str, Tensor] = {}
        self._inform = inform
        self._what = what
        self._consequence = consequence
        self._informed = False

    def clear(self) -> None:
        """Forget every vector (a new or resumed run starts cold)."""
        self.vectors = {}

    def keep(self, vectors: Mapping[str, Tensor | None]) -> None:
        """Keep the given blocks' vectors (replacing the previous ones) where memory allows."""
        self.vectors = {}
        for name, block in vectors.items():
            if block is None:
                continue
            placed = self._place(block)
            if placed is None:
                if not self._informed:
                    self._informed = True
                    self._inform(
                        f"HessianCallback: no memory to keep the {self._what} of block {name!r} "
                        f"({block.numel() * block.element_size() / 2**20:.0f} MiB) between evaluations "
                        f"on the device or the CPU; {self._consequence.format(block=name)}. Later drops "
                        "are not reported."
                    )
                continue
            self.vectors[name] = placed

    @staticmethod
    def _place(block: Tensor) -> Tensor | None:
        size = block.numel() * block.element_size()
        for device in (block.device, torch.device("cpu")):
            free = available_memory(device)
            if free is None or size <= KEEP_SHARE * free:
                return block.detach().to(device)
        return None
