"""One block Krylov space per block and evaluation: eigenvalues, density and trace from the same products.

Separately, top-k Lanczos, the smallest eigenvalue, a stochastic trace and stochastic Lanczos quadrature
each build their own Krylov space and pay for information the others already have. Here one block
Lanczos run from ``p`` random Rademacher probes (plus, optionally, warm-start vectors such as the
previous evaluation's Ritz vectors) builds one orthonormal basis ``Q`` with its exact projection
``H = Q^T A Q`` (:class:`~lightning_hessian.krylov.KrylovBasis`), and every quantity is read from it:

- **Extreme eigenvalues**: the Ritz values of ``H`` at both ends, each with its exact residual
  ``||A x - θ x||``, which bounds its distance to an eigenvalue; the run stops once the wanted ones
  are converged (residual at most ``tol`` times the spectral scale ``max |θ|``). A block of ``p``
  probes resolves up to ``p`` copies of a repeated eigenvalue. Without a density, warm-start
  vectors instead seed one chain mixed with one probe, join the basis after it, and the chain runs
  on until a Chebyshev bound certifies the probe's reach (NOTE [Warm start without density]).
- **Density**: block Gauss quadrature over the probes (see :mod:`lightning_hessian.density`): nodes
  are the Ritz values, weights the probes' squared coordinates on the Ritz vectors. It stays exact
  for polynomials of degree below ``2 s`` (``s`` steps) when warm-start vectors widen the space,
  since the space still contains the probes' block Krylov space.
- **Trace** (Krylov-aware, after Chen & Hallman 2023 and the deflation argument of Meyer et al.
  2021): ``tr(A) = tr(Q^T A Q) + tr(P A P)`` with ``P = I - Q Q^T``. The first term is ``tr(H)``,
  exact and free; the second is estimated by Hutchinson with ``m`` fresh probes projected out of
  ``Q`` (independent of ``Q``, so unbiased), whose sample deviation gives the standard error. The
  space holds the top of the spectrum, so the remainder and its variance are small.

About 450 lines for that one job: the space, its stopping rules (cold, and the warm chain with its
certificate) and the three readers share the basis and its memory check, so they stay together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .contractions import column_dots, column_norms, inner, local_rows, random_signs
from .errors import HessianTooLargeError
from .krylov import KrylovBasis, Ritz
from .lanczos import chebyshev_certifies
from .linear_operator import SymmetricOperator, operator_size
from .memory import GIB, available_memory
from .probes import make_generator, rademacher  # noqa: F401 - the probes' source, as tests import it
from .results import EigenResult, SpectralDensity, TraceResult
from .validation import check_int, check_positive_float

#: Share of the device's free memory the shared basis may take (see :func:`basis_capacity`).
BASIS_MEMORY_SHARE = 0.25
#: Memory the basis may take where the free memory cannot be told.
BASIS_BYTES = 2**30
#: Fewest block steps when a density is wanted (its resolution grows with the steps).
MIN_DENSITY_STEPS = 8


@dataclass
class SharedSpaceResult:
    """What one shared block Krylov space gave.

    Attributes:
        eigenvalues: The top-k, largest first (``None`` when ``top_k=0``).
        min_eigenvalue: The smallest eigenvalue (``None`` when not asked).
        density: The block quadrature density (``None`` when not asked).
        trace: The Krylov-aware trace with its standard error (``None`` when not asked).
        vectors: ``[N, r]`` Ritz vectors of the top of the spectrum, for a warm start next time.
        num_matvecs: Products spent in total.
        num_steps: Steps taken (block steps; single-vector steps in a warm start without density).
    """

    eigenvalues: EigenResult | None
    min_eigenvalue: EigenResult | None
    density: SpectralDensity | None
    trace: TraceResult | None
    vectors: Tensor | None
    num_matvecs: int
    num_steps: int


def basis_capacity(
    n: int,
    block: int,
    max_steps: int,
    dtype: torch.dtype,
    max_bytes: int = BASIS_BYTES,
    rows: int | None = None,
) -> int:
    """Columns of the shared basis: ``block * max_steps``, capped by memory and by ``n``.

    The basis is the run's largest allocation: ``rows * capacity * itemsize`` bytes.

    Args:
        n: Operator size ``N``.
        block: Columns per step.
        max_steps: Most steps.
        dtype: Basis dtype.
        max_bytes: Memory allowed for the basis.
        rows: Rows of a basis vector on this process (default ``n``; a sharded operator's local size).

    Returns:
        The capacity (at least two blocks).
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    by_memory = max_bytes // max(1, (n if rows is None else rows) * itemsize)
    return max(2 * block, min(n, block * max_steps, by_memory))


def check_basis_fits(n: int, capacity: int, extra: int, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, before allocating, a basis that does not fit in the device's free memory.

    Peak memory of a shared-space run: ``itemsize * N * (capacity + extra)`` for the basis,
    ``capacity = min(N, block * max_steps, max_basis_bytes / (itemsize * N))`` columns, and ``extra``
    columns (the start block and the trace probes); plus the operator's own memory: its cached
    first-order graphs and, while it multiplies ``c`` columns at once, about ``c`` times (one graph's
    saved tensors + ``4 N itemsize``) of workspace (``HessianOperator.chunk_columns`` keeps that
    under a quarter of free memory).

    Raises:
        HessianTooLargeError: Naming the sizes and the settings that shrink them.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    needed = itemsize * n * (capacity + extra)
    free = available_memory(device)
    if free is not None and needed > free:
        raise HessianTooLargeError(
            f"The Krylov basis needs {needed / GIB:.2f} GB ({n} parameters x {capacity + extra} vectors, "
            f"{dtype}) but {device} has {free / GIB:.2f} GB free. Lower `density_steps` or "
            "`density_probes`, select fewer parameters with `params=`, or split them with `blocks=`."
        )


def _wanted(ritz: Ritz, k: int, smallest: bool) -> tuple[Tensor, Tensor]:
    """Indices (into ascending Ritz values) of the top ``k`` and, if asked, of the smallest one."""
    count = ritz.values.shape[0]
    top = torch.arange(count - 1, max(-1, count - 1 - k), -1, device=ritz.values.device)
    low = torch.arange(min(1, count) if smallest else 0, device=ritz.values.device)
    return top, low


def _converged(ritz: Ritz, indices: Tensor, tol: float) -> Tensor:
    scale = float(ritz.values.abs().max()) if ritz.values.numel() else 0.0
    return ritz.residuals[indices] <= tol * max(scale, torch.finfo(torch.float64).tiny)


def _eigen(ritz: Ritz, indices: Tensor, tol: float, which: str, matvecs: int) -> EigenResult:
    scale = float(ritz.values.abs().max())
    return EigenResult(
        values=ritz.values[indices].cpu(),
        vectors=None,
        converged=_converged(ritz, indices, tol).cpu(),
        residuals=ritz.residuals[indices].cpu(),
        num_matvecs=matvecs,
        which=which,
        tol=tol * scale,
    )


def _all_converged(krylov: KrylovBasis, top_k: int, smallest: bool, tol: float) -> bool:
    """Whether the basis holds ``top_k`` Ritz values and every wanted Ritz pair is converged."""
    ritz = krylov.ritz()
    top, low = _wanted(ritz, top_k, smallest)
    return top.numel() >= top_k and bool(_converged(ritz, torch.cat([top, low]), tol).all())


def _grow(
    krylov: KrylovBasis,
    top_k: int,
    smallest: bool,
    tol: float,
    min_steps: int,
    max_steps: int,
    reserve: int = 0,
) -> int:
    """Multiply every pending vector, one step at a time, until the wanted Ritz pairs converge.

    Args:
        krylov: The basis to grow.
        top_k: Largest eigenvalues wanted.
        smallest: Whether the smallest eigenvalue is wanted too.
        tol: Relative residual tolerance (see :func:`_converged`).
        min_steps: Fewest steps before the convergence check may stop the run.
        max_steps: Most steps.
        reserve: Basis columns to leave free.

    Returns:
        The steps taken; the run also stops when no vector is pending or the basis is full.
    """
    steps = 0
    while (
        krylov.pending and steps < max_steps and krylov.m + len(krylov.pending) <= krylov.capacity - reserve
    ):
        krylov.step(list(range(len(krylov.pending))))
        steps += 1
        if steps >= min_steps and _all_converged(krylov, top_k, smallest, tol):
            break
    return steps


def _mixed_start(op: SymmetricOperator, probe: Tensor, vectors: Tensor) -> Tensor:
    """The chain's start ``v / ||v|| + z / ||z||``, ``v`` the sum of the unit warm vectors, ``z`` a probe."""
    tiny = torch.finfo(probe.dtype).tiny
    unit = vectors / column_norms(op, vectors, keepdim=True).clamp_min(tiny)
    combined = unit.sum(dim=1, keepdim=True)
    length = float(column_norms(op, combined).max()) if vectors.shape[1] else 0.0
    start = probe / column_norms(op, probe, keepdim=True).clamp_min(tiny)
    return start + combined / length if length > 0 else start


def _settle(krylov: KrylovBasis, top_k: int, smallest: bool, tol: float) -> int:
    """After a step that multiplied only some pending vectors: if a wanted Ritz pair is off its
    tolerance, multiply every pending vector, step by step, until they all converge again.

    Returns:
        The steps taken.
    """
    if _all_converged(krylov, top_k, smallest, tol):
        return 0
    return _grow(krylov, top_k, smallest, tol, 1, krylov.capacity)


def _probe_certified(krylov: KrylovBasis, chain: int, top_k: int, tol: float) -> bool:
    """Whether the mixed chain is long enough that an eigenvalue beyond the top-k would show.

    The Chebyshev bound of the Lanczos multiplicity check
    (:func:`~lightning_hessian.lanczos.chebyshev_certifies`), applied to the chain's degree and to
    the space with its converged Ritz pairs deflated: its Ritz values span ``[low, mu]``, ``mu`` the
    largest unconverged one below the top-k, and the bound is the k-th Ritz value plus the tolerance.
    The random probe is ``1/sqrt(2)`` of the chain's start, hence ``2 N`` for ``N``.

    Args:
        krylov: The basis.
        chain: Id of the mixed chain.
        top_k: Largest eigenvalues wanted.
        tol: Relative residual tolerance.

    Returns:
        True also when nothing at the top is wanted or every Ritz pair is converged.
    """
    ritz = krylov.ritz()
    count = ritz.values.shape[0]
    if top_k == 0:
        return True
    if count <= top_k:
        return False
    threshold = tol * float(ritz.values.abs().max())
    unconverged = (ritz.residuals[: count - top_k] > threshold).nonzero()
    if unconverged.numel() == 0:
        return True
    mu = float(ritz.values[int(unconverged.max())])
    bound = float(ritz.values[count - top_k]) + threshold
    degree = sum(1 for j in range(krylov.m) if krylov.chain_of[j] == chain)
    return chebyshev_certifies(degree, mu, float(ritz.values[0]), bound, 2 * krylov.n)


def _warm_chain(
    krylov: KrylovBasis,
    probe: Tensor,
    vectors: Tensor,
    top_k: int,
    smallest: bool,
    tol: float,
    min_steps: int,
) -> int:
    """A warm start without density: one Lanczos chain from the warm vectors mixed with a random
    probe, then the warm vectors themselves, then the chain until a Chebyshev bound certifies it.

    NOTE [Warm start without density]: a block of the random probe beside the ``w`` warm vectors
    multiplies ``1 + w`` vectors per step and stops as soon as the wanted Ritz pairs converge, which
    accurate warm vectors do after one step, before the probe's Krylov space could reveal a new
    eigenvalue (measured with ``min_steps=1``: a new eigenvalue orthogonal to the old top-3, even
    three times the old top, was missed in 10 of 10 draws, after 4 products). Here:

    1. One chain starts from ``x = v / ||v|| + z / ||z||`` (``v`` the warm vectors' sum, ``z`` the
       probe: the weight of a cold start's probe, up to ``1/sqrt(2)``) and runs until the wanted
       Ritz pairs converge. A wanted Ritz vector is a polynomial in ``A`` applied to ``x``, so it
       converges only once the polynomial has filtered ``z``'s spread over the spectrum; the warm
       part gives the wanted directions a head start, which saves the logarithm of that head start.
    2. The warm vectors join the basis (``w`` products). Were they exactly invariant, ``p(A) x -
       p(A) v`` would lie in the space for every polynomial ``p`` of the chain's degree: the space
       holds the probe's own Krylov space, not only its mixture with ``v``, so a new eigenvalue next
       to an old one is no longer hidden behind the old one's head start. The space also holds each
       copy of a repeated eigenvalue that the warm vectors carry, plus the probe's, as the block of
       the probe and the warm vectors does.
    3. The head start still shortens the chain, and with it the probe's degree. So the chain goes on
       until :func:`_probe_certified` says that an eigenvalue beyond the k-th Ritz value, with a
       typical component along the probe, would already show as a Ritz value (the bound of the
       Lanczos multiplicity check, miss probability ``MISS_PROBABILITY``).

    After each step that multiplied only some pending vectors, a wanted Ritz pair that moved off
    its tolerance sends the run back to multiplying every pending vector (:func:`_settle`); the
    residuals stay exact throughout, and the convergence rule is the cold one. Measured at
    ``tol=1e-3`` on 300 x 300 spectra with a new eigenvalue entering the top 3 beside an old one:
    steps 1-2 alone missed it in up to 8 of 20 draws, steps 1 and 3 alone in up to 8 of 20 (7 of 10
    on a Hessian of the digits CNN) and lost the copies of a repeated eigenvalue that the warm
    vectors carried; all three missed none. On the digits run the three take about 0.6 times the
    products of the cold block of 4 probes (``benchmarks/callback_overhead.py --only affordable``).

    Args:
        krylov: The empty basis, with room for at least ``w + 2`` columns.
        probe: ``[N, 1]`` random probe.
        vectors: ``[N, w]`` warm vectors (in the basis dtype).
        top_k: Largest eigenvalues wanted.
        smallest: Whether the smallest eigenvalue is wanted too.
        tol: Relative residual tolerance.
        min_steps: Fewest steps of the chain.

    Returns:
        Steps taken (one product each in the chain; one step of the warm vectors; then block steps).
    """
    chain = krylov.num_chains
    krylov.start(_mixed_start(krylov.op, probe, vectors))
    steps = _grow(krylov, top_k, smallest, tol, min_steps, krylov.capacity, reserve=vectors.shape[1])
    first = krylov.num_chains
    if krylov.start(vectors):
        krylov.step([i for i, item in enumerate(krylov.pending) if item.chain >= first])
        steps += 1 + _settle(krylov, top_k, smallest, tol)
    while not _probe_certified(krylov, chain, top_k, tol):
        own = [i for i, item in enumerate(krylov.pending) if item.chain == chain]
        if not own or krylov.m >= krylov.capacity:
            break
        krylov.step(own)
        steps += 1 + _settle(krylov, top_k, smallest, tol)
    return steps


def _trace(
    op: SymmetricOperator, krylov: KrylovBasis, probes: int, generator: torch.Generator
) -> TraceResult:
    """``tr(H)`` plus Hutchinson on the deflated remainder, with its standard error."""
    exact = float(krylov.proj[: krylov.m, : krylov.m].diagonal().sum())
    if krylov.m >= krylov.n or probes == 0:
        return TraceResult(exact, 0.0, 0, "krylov-aware")
    q = krylov.basis[:, : krylov.m]
    g = random_signs(op, krylov.n, probes, generator, krylov.dtype, krylov.device)
    for _ in range(2):  # twice, as the basis itself: the remainder must be orthogonal to Q
        g = g - q @ inner(op, q, g)
    samples = column_dots(op, g, (op @ g).to(krylov.dtype)).double()
    stderr = float(samples.std(unbiased=True)) / math.sqrt(probes) if probes > 1 else float("nan")
    return TraceResult(exact + float(samples.mean()), stderr, probes, "krylov-aware")


def shared_space_estimates(
    op: SymmetricOperator,
    *,
    top_k: int = 3,
    min_eigenvalue: bool = True,
    density: bool = True,
    trace: bool = True,
    tol: float = 1e-3,
    num_probes: int = 4,
    min_steps: int = MIN_DENSITY_STEPS,
    max_steps: int = 40,
    trace_probes: int = 16,
    seed: int = 0,
    start_vectors: Tensor | None = None,
    keep_vectors: int = 0,
    return_vectors: bool = False,
    max_basis_bytes: int | None = None,
) -> SharedSpaceResult:
    """Eigenvalues, density and trace of a symmetric operator from one block Krylov space.

    Block Lanczos from ``num_probes`` Rademacher probes (and ``start_vectors``, if given) runs until
    the wanted eigenvalues are converged and at least ``min_steps`` steps are taken, or ``max_steps``
    steps (or the memory cap) are reached. Each step multiplies every pending block vector once.
    Without a density, ``start_vectors`` instead seed one Lanczos chain mixed with a random probe
    and then join the basis themselves (NOTE [Warm start without density] in :func:`_warm_chain`).

    Args:
        op: Symmetric operator with ``shape (N, N)``, ``dtype``, ``device`` and ``op @ V``.
        top_k: Largest eigenvalues wanted (0 for none).
        min_eigenvalue: Also the smallest eigenvalue.
        density: Return the block quadrature density.
        trace: Return the Krylov-aware trace (``trace_probes`` more products).
        tol: Convergence: residual at most ``tol`` times the spectral scale (``max |θ|``).
        num_probes: Random probes of the start block (the density's probes); one beside
            ``start_vectors`` when no density is wanted (NOTE [Warm start without density]).
        min_steps: Fewest steps (the density's resolution grows with the steps).
        max_steps: Most steps (a warm start without density, which multiplies one vector per step,
            may take up to ``(1 + w) * max_steps`` steps: the products of a block of ``1 + w``).
        trace_probes: Hutchinson probes of the deflated remainder.
        seed: Seed of every random vector.
        start_vectors: ``[N, w]`` warm-start vectors (e.g. the previous evaluation's Ritz vectors;
            this rank's rows of them for an operator with sharded vectors).
        keep_vectors: How many top Ritz vectors to return in :attr:`SharedSpaceResult.vectors`.
        return_vectors: Put the top-k Ritz vectors in ``eigenvalues.vectors``.
        max_basis_bytes: Memory the basis may take (see :func:`basis_capacity`); default
            :data:`BASIS_MEMORY_SHARE` of the device's free memory (:data:`BASIS_BYTES` where it
            cannot be told). When the cap stops the run before the values converge, their flags say so.

    Returns:
        A :class:`SharedSpaceResult`.

    Raises:
        TypeError: For arguments of the wrong type.
        ValueError: For arguments out of range or start vectors of the wrong shape.

    Example:
        >>> from lightning_hessian.linear_operator import MatrixOperator
        >>> op = MatrixOperator(torch.diag(torch.linspace(0.0, 1.0, 200, dtype=torch.float64)))
        >>> result = shared_space_estimates(op, top_k=2, seed=0)
        >>> [round(v, 3) for v in result.eigenvalues.values.tolist()]
        [1.0, 0.995]
    """
    n = operator_size(op)
    rows = local_rows(op)  # N, or this rank's rows of a sharded operator's vectors
    top_k = check_int("top_k", top_k, 0, "Pass 0 for no top eigenvalues.")
    num_probes = check_int("num_probes", num_probes, 1, "Use at least one random probe.")
    min_steps = check_int("min_steps", min_steps, 1)
    max_steps = check_int("max_steps", max_steps, min_steps, "It must allow `min_steps` steps.")
    trace_probes = check_int("trace_probes", trace_probes, 0)
    keep_vectors = check_int("keep_vectors", keep_vectors, 0)
    tol = check_positive_float("tol", tol, "It is a relative residual, e.g. tol=1e-3.")
    if start_vectors is not None and (start_vectors.ndim != 2 or start_vectors.shape[0] != rows):
        raise ValueError(f"`start_vectors` must be [N={rows}, w], got {tuple(start_vectors.shape)}.")
    generator = make_generator(op.device, seed)
    dtype = op.dtype if op.dtype.is_floating_point else torch.float32
    if start_vectors is not None and not density:
        # Only the density needs several random probes (its quadrature averages over them); the
        # eigenvalues and the Krylov-aware trace (exact on the space, Hutchinson on the rest) hold
        # for any start. One probe goes beside the warm vectors (NOTE [Warm start without density]).
        num_probes = 1
    probes = random_signs(op, n, num_probes, generator, dtype, op.device)
    start = probes if start_vectors is None else torch.cat([probes, start_vectors.to(probes)], dim=1)
    block = start.shape[1]
    if max_basis_bytes is None:
        free = available_memory(op.device)
        max_basis_bytes = BASIS_BYTES if free is None else int(BASIS_MEMORY_SHARE * free)
    capacity = basis_capacity(n, block, max_steps, dtype, max_basis_bytes, rows)
    check_basis_fits(rows, capacity, block + trace_probes, dtype, torch.device(op.device))
    krylov = KrylovBasis(op, n, capacity, generator)
    if start_vectors is not None and not density:
        kept_probes = 0
        steps = _warm_chain(krylov, probes, start_vectors.to(probes), top_k, min_eigenvalue, tol, min_steps)
    else:
        kept_probes = krylov.start(probes)
        if start_vectors is not None:
            krylov.start(start_vectors.to(probes))
        steps = _grow(krylov, top_k, min_eigenvalue, tol, min_steps, max_steps)
    ritz = krylov.ritz()
    top, low = _wanted(ritz, min(top_k, ritz.values.shape[0]), min_eigenvalue)
    used = krylov.num_matvecs
    eigen = _eigen(ritz, top, tol, "largest", used) if top_k else None
    if eigen is not None and return_vectors:
        eigen.vectors = krylov.vectors(ritz.coords[:, top])
    smallest = _eigen(ritz, low, tol, "smallest", used) if min_eigenvalue else None
    quadrature = None
    if density:
        weights = ritz.coords[:kept_probes].pow(2).sum(0) / max(1, kept_probes)
        quadrature = SpectralDensity(
            ritz.values.cpu(), (weights / weights.sum()).cpu(), used, num_probes, exact=krylov.m >= n
        )
    trace_result = _trace(op, krylov, trace_probes, generator) if trace else None
    vectors = None
    if keep_vectors:
        count = min(keep_vectors, ritz.values.shape[0])
        vectors = krylov.vectors(ritz.coords[:, ritz.values.shape[0] - count :].flip(1))
    total = used + (trace_result.num_matvecs if trace_result is not None else 0)
    return SharedSpaceResult(eigen, smallest, quadrature, trace_result, vectors, total, steps)
