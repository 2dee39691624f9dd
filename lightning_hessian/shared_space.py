"""One block Krylov space per block and evaluation: eigenvalues, density and trace from the same products.

Separately, top-k Lanczos, the smallest eigenvalue, a stochastic trace and stochastic Lanczos quadrature
each build their own Krylov space and pay for information the others already have. Here one block
Lanczos run from ``p`` random Rademacher probes (plus, optionally, warm-start vectors such as the
previous evaluation's Ritz vectors) builds one orthonormal basis ``Q`` with its exact projection
``H = Q^T A Q`` (:class:`~lightning_hessian.krylov.KrylovBasis`), and every quantity is read from it:

- **Extreme eigenvalues**: the Ritz values of ``H`` at both ends, each with its exact residual
  ``||A x - θ x||``, which bounds its distance to an eigenvalue; the run stops once the wanted ones
  are converged (residual at most ``tol`` times the spectral scale ``max |θ|``). A block of ``p``
  probes resolves up to ``p`` copies of a repeated eigenvalue.
- **Density**: block Gauss quadrature over the probes (see :mod:`lightning_hessian.density`): nodes
  are the Ritz values, weights the probes' squared coordinates on the Ritz vectors. It stays exact
  for polynomials of degree below ``2 s`` (``s`` steps) when warm-start vectors widen the space,
  since the space still contains the probes' block Krylov space.
- **Trace** (Krylov-aware, after Chen & Hallman 2023 and the deflation argument of Meyer et al.
  2021): ``tr(A) = tr(Q^T A Q) + tr(P A P)`` with ``P = I - Q Q^T``. The first term is ``tr(H)``,
  exact and free; the second is estimated by Hutchinson with ``m`` fresh probes projected out of
  ``Q`` (independent of ``Q``, so unbiased), whose sample deviation gives the standard error. The
  space holds the top of the spectrum, so the remainder and its variance are small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .contractions import column_dots, inner, local_rows, random_signs
from .errors import HessianTooLargeError
from .krylov import KrylovBasis, Ritz
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
        num_steps: Block steps taken.
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
        max_steps: Most steps.
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
        # NOTE [Warm start without density]: only the density needs several random probes (its
        # quadrature averages over them); the eigenvalues and the Krylov-aware trace (exact on the
        # space, Hutchinson on the rest) hold for any start block. Warm vectors then need one fresh
        # random direction beside them, so that a new eigenvalue entering the top is still found.
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
    kept_probes = krylov.start(probes)
    if start_vectors is not None:
        krylov.start(start_vectors.to(probes))
    steps = 0
    while krylov.pending and steps < max_steps and krylov.m + len(krylov.pending) <= krylov.capacity:
        krylov.step(list(range(len(krylov.pending))))
        steps += 1
        if steps >= min_steps:
            ritz = krylov.ritz()
            top, low = _wanted(ritz, top_k, min_eigenvalue)
            if bool(_converged(ritz, torch.cat([top, low]), tol).all()):
                break
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
