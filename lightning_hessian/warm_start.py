"""Ritz vectors kept between evaluations, to start the next evaluation's Krylov space from them.

Each block's top Ritz vectors are kept where memory allows: on the device, else on the CPU, else they
are dropped with one info message (the next evaluation then starts cold, with the same accuracy).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from .memory import available_memory

#: Share of free memory the kept vectors may take.
KEEP_SHARE = 0.1


class RitzVectorStore:
    """The previous evaluation's Ritz vectors by block name.

    Args:
        inform: Called once with a message when vectors had to be dropped for memory.

    Example:
        >>> store = RitzVectorStore(print)
        >>> store.keep({"model": torch.ones(4, 2)})
        >>> store.vectors["model"].shape
        torch.Size([4, 2])
    """

    def __init__(self, inform: Callable[[str], None]) -> None:
        self.vectors: dict[str, Tensor] = {}
        self._inform = inform
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
                        f"HessianCallback: no memory to keep the Ritz vectors of block {name!r} "
                        f"({block.numel() * block.element_size() / 2**20:.0f} MiB) between evaluations; "
                        "the next evaluations start cold (same accuracy, more products)."
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
