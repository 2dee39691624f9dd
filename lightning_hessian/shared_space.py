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

Memory: the basis takes at most :data:`BASIS_MEMORY_SHARE` of free memory; everything else a run
holds is a few blocks of vectors (products and projections go in place, the trace probes in chunks
of the block), counted by :func:`peak_bytes`, which :func:`check_basis_fits` refuses by before any
product. Where the cap, not ``max_steps``, bounds the basis, a run without density thick-restarts
within it (:func:`_restart`).

About 600 lines for that one job: the space, its stopping rules (cold with its restarts, and the warm
chain with its certificate), the three readers and the memory they share (formula, check, warning)
stay together.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from .contractions import column_norms, column_sums, inner, local_rows, random_signs
from .errors import HessianTooLargeError
from .krylov import KrylovBasis, Ritz
from .lanczos import HessianConvergenceWarning, chebyshev_certifies
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
MIB = 1024**2
#: Working vectors of a run besides the basis, in start blocks (see :func:`peak_bytes`).
STEP_BLOCKS = 2
#: float64 ``capacity x capacity`` matrices of a run (see :func:`peak_bytes`).
PROJECTION_MATRICES = 4
#: Allowance for the heap the C allocator keeps from freed working vectors, in start blocks: glibc
#: kept 7 to 32 columns (block 4) beyond the tensors at N = 1e6 and 2e6 (benchmarks/basis_memory.py)
#: in 12 of 15 runs; with 99 trace probes (25 chunks) 3 of 5 runs kept more, up to 85 columns (two
#: runs under MALLOC_ARENA_MAX=1 kept 12 and 18): not covered, see the README's memory section.
HEAP_BLOCKS = 6
#: Allowance for the runtime's own growth on a first run (BLAS/LAPACK and thread start-up: 15 MiB
#: measured at N = 4000), with the rest of the kept heap at small N (61 MiB in all at N = 250,000).
RUNTIME_BYTES = 64 * MIB


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


def peak_bytes(rows: int, capacity: int, block: int, returned: int, dtype: torch.dtype) -> int:
    """Peak memory of a shared-space run besides the operator's own: what :func:`check_basis_fits` checks.

    ``itemsize * rows * (capacity + (STEP_BLOCKS + HEAP_BLOCKS) * block + returned)
    + 8 * PROJECTION_MATRICES * capacity**2 + RUNTIME_BYTES``. The tensors:

    - ``capacity`` basis columns;
    - ``STEP_BLOCKS * block`` working columns: at the start, the probes and the pending vectors made
      from them; in a step, the contiguous copy of the new columns and their product, then the
      product (projected in place) and the new pending vectors; in the trace, one chunk of at most
      ``block`` Hutchinson probes and its product (the chunks bound the trace's memory, so
      ``trace_probes`` does not enter);
    - ``returned`` Ritz vectors handed back (``top_k`` with ``return_vectors``, plus
      ``keep_vectors``);
    - float64 ``capacity x capacity`` matrices: the projection, and the Ritz coordinates with the
      eigensolver's copy and workspace.

    And what the process adds around them, measured as peak RSS growth: the heap the C allocator
    keeps from freed working vectors (glibc's malloc, whose threshold for returning memory rises
    with the sizes freed; ``HEAP_BLOCKS * block`` columns) and the runtime's growth on its first run
    (``RUNTIME_BYTES``). ``benchmarks/basis_memory.py`` measures the whole against the peak RSS growth
    of a fresh process, and the tests the tensors against the bytes PyTorch's allocator holds at the
    peak.

    Args:
        rows: Rows of a basis vector on this process (``N``, or a sharded operator's local size).
        capacity: Basis columns (:func:`basis_capacity`).
        block: Start columns (probes plus warm-start vectors).
        returned: Ritz vectors returned.
        dtype: Basis dtype.

    Returns:
        Bytes.
    """
    return tensor_bytes(rows, capacity, block, returned, dtype) + (
        _itemsize(dtype) * rows * HEAP_BLOCKS * block + RUNTIME_BYTES
    )


def tensor_bytes(rows: int, capacity: int, block: int, returned: int, dtype: torch.dtype) -> int:
    """The tensors of :func:`peak_bytes` alone: the most bytes a run's tensors hold at once.

    Args:
        rows: Rows of a basis vector on this process.
        capacity: Basis columns.
        block: Start columns (probes plus warm-start vectors).
        returned: Ritz vectors returned.
        dtype: Basis dtype.

    Returns:
        ``itemsize * rows * (capacity + STEP_BLOCKS * block + returned) + 8 * PROJECTION_MATRICES *
        capacity**2``.
    """
    vectors = _itemsize(dtype) * rows * (capacity + STEP_BLOCKS * block + returned)
    return vectors + 8 * PROJECTION_MATRICES * capacity**2


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _size(nbytes: float) -> str:
    """``nbytes`` in GB from 1 GB on, in MB from 1 MB on, in kB below (binary units)."""
    if nbytes >= GIB:
        return f"{nbytes / GIB:.2f} GB"
    return f"{nbytes / MIB:.2f} MB" if nbytes >= MIB else f"{nbytes / 1024:.1f} kB"


def check_basis_fits(
    rows: int, capacity: int, block: int, returned: int, dtype: torch.dtype, device: torch.device
) -> None:
    """Refuse, before allocating, a run that does not fit in the device's free memory.

    The run needs :func:`peak_bytes`, plus the operator's own memory: its cached first-order graphs
    and, while it multiplies ``c`` columns at once, about ``c`` times (one graph's saved tensors +
    ``4 N itemsize``) of workspace (``HessianOperator.chunk_columns`` keeps that under a quarter of
    free memory).

    Args:
        rows: Rows of a basis vector on this process.
        capacity: Basis columns.
        block: Start columns (probes plus warm-start vectors).
        returned: Ritz vectors returned.
        dtype: Basis dtype.
        device: The device.

    Raises:
        HessianTooLargeError: Naming the sizes and, first, the settings that shrink them: the basis is
            already capped at a share of free memory, so what does not fit is the rest.
    """
    needed = peak_bytes(rows, capacity, block, returned, dtype)
    free = available_memory(device)
    if free is None or needed <= free:
        return
    per_start = STEP_BLOCKS + HEAP_BLOCKS + 2
    ways = [
        f"lower `density_probes` (`num_probes`; {block} start vector(s) here, with warm-start vectors): "
        f"each costs {per_start} vectors of {_size(_itemsize(dtype) * rows)} ({STEP_BLOCKS + HEAP_BLOCKS} "
        "working, 2 in the smallest basis)"
    ]
    if returned:
        ways.append(f"return fewer Ritz vectors (`keep_vectors`, `eigenvectors`: {returned} here)")
    ways.append("select fewer parameters with `params=`, or split them with `blocks=`")
    raise HessianTooLargeError(
        f"The shared Krylov space needs {_size(needed)} ({rows} parameters x ({capacity} basis + "
        f"{(STEP_BLOCKS + HEAP_BLOCKS) * block} working + {returned} returned) vectors, {dtype}; "
        f"{_size(8 * PROJECTION_MATRICES * capacity**2)} of float64 projections; {_size(RUNTIME_BYTES)} "
        f"for the runtime) but {device} has {_size(free)} free. The basis is already capped at "
        f"{BASIS_MEMORY_SHARE:.0%} of free memory (`max_basis_bytes`), so `density_steps` changes "
        f"little and `trace_matvecs` nothing (its probes run in chunks of the block). To fit: "
        f"{'; '.join(ways)}."
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
    restart: bool = False,
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
        restart: When the next step would not fit, thick-restart the basis (:func:`_restart`)
            instead of stopping (only where no density is wanted: the quadrature needs the
            unrestarted block Krylov space of its probes).

    Returns:
        The steps taken; the run also stops when no vector is pending or the basis is full (and
        cannot restart).
    """
    steps = 0
    while krylov.pending and steps < max_steps:
        full = krylov.m + len(krylov.pending) > krylov.capacity - reserve
        if full and not (restart and _restart(krylov, top_k, smallest)):
            break
        krylov.step(list(range(len(krylov.pending))))
        steps += 1
        if steps >= min_steps and _all_converged(krylov, top_k, smallest, tol):
            break
    return steps


def _restart(krylov: KrylovBasis, top_k: int, smallest: bool) -> bool:
    """Thick restart keeping the Ritz vectors at both ends, to make room for the next steps.

    Keeps the top ``top_k`` Ritz vectors and the smallest one (wanted, or kept so that the spectral
    scale ``max |θ|`` of the tolerance does not drop), plus half of the remaining room, from the top
    (split evenly with the bottom when the smallest eigenvalue is wanted): the Ritz vectors next to
    the wanted ones speed their convergence, as in thick-restart Lanczos. The pending block stays, so
    the block steps go on from the compressed basis (Krylov-Schur).

    Returns:
        False when the wanted vectors and the pending block alone fill the basis: nothing to restart.
    """
    ritz = krylov.ritz()
    pending, count = len(krylov.pending), ritz.values.shape[0]
    wanted = min(top_k, count - 1) + 1
    if wanted + pending > krylov.capacity or wanted >= count:
        return False
    extras = (krylov.capacity - pending - wanted) // 2
    low = 1 + (extras // 2 if smallest else 0)
    high = wanted - 1 + extras - (low - 1)
    keep = torch.cat(
        [
            torch.arange(low, device=ritz.values.device),
            torch.arange(count - high, count, device=ritz.values.device),
        ]
    )
    krylov.restart(keep, ritz, workspace_columns=max(1, pending))
    return True


def _mixed_start(op: SymmetricOperator, probe: Tensor, vectors: Tensor) -> Tensor:
    """The chain's start ``v / ||v|| + z / ||z||``, ``v`` the sum of the unit warm vectors, ``z`` a probe.

    The warm vectors are summed one at a time (in the probe's dtype), so no copy of them is made.
    """
    tiny = torch.finfo(probe.dtype).tiny
    norms = column_norms(op, vectors).clamp_min(tiny)
    combined = torch.zeros_like(probe)
    for j in range(vectors.shape[1]):
        combined.add_(vectors[:, j : j + 1].to(probe.dtype), alpha=1.0 / float(norms[j]))
    length = float(column_norms(op, combined).max()) if vectors.shape[1] else 0.0
    start = probe / column_norms(op, probe, keepdim=True).clamp_min(tiny)
    return start.add_(combined, alpha=1.0 / length) if length > 0 else start


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
        krylov: The empty basis, with room for at least ``w + 2`` columns; its generator draws the
            ``[N, 1]`` random probe (here, so that it is released once the chain has started).
        vectors: ``[N, w]`` warm vectors (cast to the basis dtype a column at a time).
        top_k: Largest eigenvalues wanted.
        smallest: Whether the smallest eigenvalue is wanted too.
        tol: Relative residual tolerance.
        min_steps: Fewest steps of the chain.

    Returns:
        Steps taken (one product each in the chain; one step of the warm vectors; then block steps).
    """
    chain = krylov.num_chains
    probe = random_signs(krylov.op, krylov.n, 1, krylov.generator, krylov.dtype, krylov.device)
    krylov.start(_mixed_start(krylov.op, probe, vectors))
    del probe
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
    op: SymmetricOperator, krylov: KrylovBasis, probes: int, chunk: int, generator: torch.Generator
) -> TraceResult:
    """``tr(H)`` plus Hutchinson on the deflated remainder, with its standard error.

    The probes are drawn, projected and multiplied ``chunk`` at a time, each chunk projected in place
    and multiplied into its product in place, so the trace holds at most two ``[N, chunk]`` blocks
    whatever ``probes`` is (:func:`peak_bytes`).
    """
    exact = float(krylov.proj[: krylov.m, : krylov.m].diagonal().sum())
    if krylov.m >= krylov.n or probes == 0:
        return TraceResult(exact, 0.0, 0, "krylov-aware")
    q = krylov.basis[:, : krylov.m]
    samples = []
    for first in range(0, probes, chunk):
        g = random_signs(op, krylov.n, min(chunk, probes - first), generator, krylov.dtype, krylov.device)
        for _ in range(2):  # twice, as the basis itself: the remainder must be orthogonal to Q
            g.addmm_(q, inner(op, q, g), alpha=-1)
        product = (op @ g).to(krylov.dtype)
        samples.append(column_sums(op, g.mul_(product)).double())  # g_j^T A g_j, in g's memory
        del g, product
    values = torch.cat(samples)
    stderr = float(values.std(unbiased=True)) / math.sqrt(probes) if probes > 1 else float("nan")
    return TraceResult(exact + float(values.mean()), stderr, probes, "krylov-aware")


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
            cannot be told). Where that caps the basis below ``block * max_steps`` columns: without a
            density the basis thick-restarts within the cap, keeping the wanted Ritz vectors (and
            the smallest, for the tolerance's scale), and goes on to ``max_steps``; a density cannot
            restart, so its run stops at the cap. Either way a run the cap left short (a wanted value
            unconverged, or fewer than ``min_steps`` steps with a density) warns once
            (:class:`~lightning_hessian.lanczos.HessianConvergenceWarning`) and its flags say so.

    Returns:
        A :class:`SharedSpaceResult`.

    Raises:
        TypeError: For arguments of the wrong type.
        ValueError: For arguments out of range or start vectors of the wrong shape.
        HessianTooLargeError: When :func:`peak_bytes` exceeds the free memory, before any product.

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
    warm = None if start_vectors is None else start_vectors.to(device=op.device)  # cast per column
    block = num_probes + (0 if warm is None else warm.shape[1])
    if max_basis_bytes is None:
        free = available_memory(op.device)
        max_basis_bytes = BASIS_BYTES if free is None else int(BASIS_MEMORY_SHARE * free)
    capacity = basis_capacity(n, block, max_steps, dtype, max_basis_bytes, rows)
    returned = min(capacity, (top_k if return_vectors else 0) + keep_vectors)
    check_basis_fits(rows, capacity, block, returned, dtype, torch.device(op.device))
    krylov = KrylovBasis(op, n, capacity, generator)
    if warm is not None and not density:
        kept_probes = 0
        steps = _warm_chain(krylov, warm, top_k, min_eigenvalue, tol, min_steps)
    else:  # the probes, drawn here, live only as long as `start` (the pending vectors hold them then)
        kept_probes = krylov.start(random_signs(op, n, num_probes, generator, dtype, op.device))
        if warm is not None:
            krylov.start(warm)
        steps = _grow(krylov, top_k, min_eigenvalue, tol, min_steps, max_steps, restart=not density)
    ritz = krylov.ritz()
    if capacity < min(n, block * max_steps):  # memory, not max_steps, bounded the basis
        shortfall = _shortfall(ritz, steps, top_k, min_eigenvalue, tol, min_steps if density else 0)
        if shortfall:
            _warn_capped(krylov, shortfall, block, max_steps, density)
    krylov.pending = []  # the Ritz pairs are read: the residual directions are not needed any more
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
    trace_result = _trace(op, krylov, trace_probes, block, generator) if trace else None
    vectors = None
    if keep_vectors:
        count = min(keep_vectors, ritz.values.shape[0])
        vectors = krylov.vectors(ritz.coords[:, ritz.values.shape[0] - count :].flip(1))
    total = used + (trace_result.num_matvecs if trace_result is not None else 0)
    return SharedSpaceResult(eigen, smallest, quadrature, trace_result, vectors, total, steps)


def _shortfall(
    ritz: Ritz, steps: int, top_k: int, smallest: bool, tol: float, density_steps: int
) -> list[str]:
    """What a run missed: wanted eigenvalues unconverged, or fewer than ``density_steps`` steps."""
    top, low = _wanted(ritz, min(top_k, ritz.values.shape[0]), smallest)
    missing = int((~_converged(ritz, torch.cat([top, low]), tol)).sum()) + max(0, top_k - top.numel())
    short = []
    if missing:
        short.append(f"{missing} of {top_k + int(smallest)} wanted eigenvalue(s) unconverged")
    if steps < density_steps:
        short.append(f"{steps} block steps, below the density's min_steps={density_steps}")
    return short


def _warn_capped(
    krylov: KrylovBasis, shortfall: list[str], block: int, max_steps: int, density: bool
) -> None:
    """Warn that the memory cap on the basis left the run short, naming what to change."""
    if density:
        how = (
            "A density cannot restart (its quadrature needs the whole block Krylov space of its probes): "
            "raise `max_basis_bytes`, lower `num_probes` (`density_probes`), or select fewer parameters "
            "(`params=`, `blocks=`); without a density the run restarts within the cap."
        )
    elif krylov.num_restarts:
        how = (
            f"It restarted {krylov.num_restarts} time(s) within the cap, keeping the wanted Ritz vectors: "
            "raise `max_steps` (`density_steps`) or `max_basis_bytes`."
        )
    else:
        how = (
            "The basis could not restart (a warm start without density does not; or the wanted vectors "
            "and one block fill it): raise `max_basis_bytes`, or select fewer parameters."
        )
    warnings.warn(
        f"shared_space_estimates: the Krylov basis was capped at {krylov.capacity} columns by memory "
        f"(`max_basis_bytes`, by default {BASIS_MEMORY_SHARE:.0%} of free memory) instead of "
        f"{block} x max_steps={max_steps}; the run ended with {' and '.join(shortfall)}. {how}",
        HessianConvergenceWarning,
        stacklevel=3,
    )
