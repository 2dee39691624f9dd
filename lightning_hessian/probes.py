"""Random probes: private seeded generators and Rademacher vectors (the global RNG is never used)."""

from __future__ import annotations

import torch
from torch import Tensor

from .validation import check_int


def make_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A private random generator on ``device`` seeded with ``seed`` (the global RNG is untouched).

    Args:
        device: Device the random numbers are drawn on.
        seed: Integer seed.

    Returns:
        A seeded :class:`torch.Generator`.

    Raises:
        TypeError: If ``seed`` is not an integer.
    """
    seed = check_int("seed", seed)
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(int(seed))
    return generator


def rademacher(
    n: int, m: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """An ``[n, m]`` matrix of independent random signs.

    Args:
        n: Rows.
        m: Columns.
        generator: Random generator (on ``device``).
        dtype: Element type.
        device: Device.

    Returns:
        Entries ``+1`` or ``-1`` with probability 1/2 each.
    """
    signs = torch.empty(n, m, dtype=dtype, device=device).bernoulli_(0.5, generator=generator)
    return signs.mul_(2).sub_(1)
