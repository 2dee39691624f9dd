"""Random probes: private seeded generators, Rademacher and Gaussian vectors (the global RNG is never used).

Both kinds consume the generator entry by entry in row-major order (on CPU), so drawing ``[N, m]`` at
once gives the same numbers as drawing its row blocks one after another: a sharded operator, which
draws one parameter's rows at a time, gets the probes of the unsharded one with the same seed.
"""

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


def standard_normal(
    n: int, m: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """An ``[n, m]`` matrix of independent standard normal numbers, drawn entry by entry.

    ``torch.randn`` draws in vectorized blocks, so ``randn(N, m)`` differs from its row blocks drawn in
    turn; here each entry is the normal quantile (in float64) of one uniform draw (``torch.rand``
    consumes the generator entry by entry on CPU), taken at the middle of ``rand``'s grid step (at
    its first step for float64, whose midpoints float64 cannot hold) so that no entry is infinite.
    Tails beyond about 5.3 (float32) or 8.2 (float64) standard deviations are cut.

    Args:
        n: Rows.
        m: Columns.
        generator: Random generator (on ``device``).
        dtype: Element type.
        device: Device.

    Returns:
        Standard normal entries; the row blocks of one call are those of consecutive calls.

    Example:
        >>> whole = standard_normal(5, 2, make_generator("cpu", 0), torch.float64, torch.device("cpu"))
        >>> generator = make_generator("cpu", 0)
        >>> parts = [standard_normal(k, 2, generator, torch.float64, torch.device("cpu")) for k in (2, 3)]
        >>> torch.equal(whole, torch.cat(parts))
        True
    """
    uniform = torch.rand(n, m, generator=generator, dtype=dtype, device=device).double()
    if dtype == torch.float64:
        uniform.clamp_(min=torch.finfo(torch.float64).eps / 4)
    else:
        uniform.add_(torch.finfo(dtype).eps / 4)  # rand's grid step is eps / 2: exact in float64
    return torch.special.ndtri(uniform).to(dtype)
