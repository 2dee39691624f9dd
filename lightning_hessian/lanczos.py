"""Extreme eigenvalues of a symmetric operator: Lanczos with full reorthogonalization.

The Krylov basis, its float64 projection and the exact residuals of its Ritz pairs are kept by
:class:`~lightning_hessian.krylov.KrylovBasis`; this module decides when to stop and what to return.
Convergence is judged on true residuals, never on the change of a value.

- Single-vector Lanczos sees one vector per eigenspace. For ``k`` greater than the block size, once the
  ``k`` wanted values have converged a fresh random chain orthogonal to the basis is started and run on
  its own (the compression of ``A`` to the unexplored space). A value it finds beyond the ``k``-th
  (a missed copy of a repeated eigenvalue, or a missed eigenvalue) rejoins the iteration and the check
  repeats; the check ends once that chain's best Ritz value is converged below the ``k``-th value.
- The basis only restarts (thick restart, keeping the best Ritz vectors) when it would exceed
  ``max_basis`` vectors, by default about 1 GiB of memory.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from .contractions import local_rows
from .krylov import KrylovBasis, Ritz
from .linear_operator import SymmetricOperator, operator_size
from .probes import make_generator
from .results import EigenResult
from .validation import check_choice, check_int, check_positive_float

WHICH = ("largest", "smallest")
#: Default memory for the Krylov basis before thick restarts set in.
BASIS_BYTES = 2**30
#: Default product budget: ``min(N, max(DEFAULT_MIN_BUDGET, DEFAULT_BUDGET_PER_VALUE * k))``.
DEFAULT_MIN_BUDGET = 500
DEFAULT_BUDGET_PER_VALUE = 50
#: Accepted chance that a missed copy of a repeated eigenvalue escapes the verification chain.
MISS_PROBABILITY = 0.01


class HessianConvergenceWarning(UserWarning):
    """An iterative estimate used up its product budget before reaching its tolerance."""


def _validate(
    n: int,
    k: object,
    which: object,
    tol: object,
    max_matvecs: object,
    block_size: object,
    max_basis: object,
) -> tuple[int, float, int, int, int | None]:
    """Check the arguments of :func:`eigenvalues`; return ``(k, tol, budget, block, max_basis)``."""
    k = check_int("k", k, 1, "Ask for at least one eigenvalue, e.g. k=1.")
    if k > n:
        raise ValueError(f"`k` must be <= N = {n} (the operator's size), got k={k}.")
    check_choice("which", which, WHICH)
    tol = check_positive_float("tol", tol, "It is a relative residual, e.g. tol=1e-4.")
    block = check_int("block_size", block_size, 1, "Use block_size=1 for plain Lanczos.")
    block = min(block, n)
    if max_matvecs is None:
        budget = min(n, max(DEFAULT_MIN_BUDGET, DEFAULT_BUDGET_PER_VALUE * k))
    else:
        budget = check_int("max_matvecs", max_matvecs, k, f"It must allow at least k={k} products; raise it.")
    basis = None
    if max_basis is not None:
        basis = check_int(
            "max_basis",
            max_basis,
            k + 2 * block,
            f"The basis must hold the k={k} wanted vectors and two blocks; raise it.",
        )
    return k, float(tol), budget, block, basis


def _default_capacity(n: int, k: int, block: int, budget: int, dtype: torch.dtype) -> int:
    """Basis capacity: the budget, capped by :data:`BASIS_BYTES` of memory (at least ``k + 2b``)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    by_memory = BASIS_BYTES // max(1, n * itemsize)
    return max(k + 2 * block + 8, min(budget, by_memory))


def chebyshev_certifies(steps: int, top: float, low: float, bound: float, n: int) -> bool:
    """Whether ``steps`` Lanczos steps would have revealed an eigenvalue at ``bound`` or beyond.

    With Ritz values spanning ``[low, top]``, the Krylov polynomial can amplify an eigenvalue at
    ``bound`` over the rest by ``T_{steps-1}(1 + 2 gamma)``, ``gamma = (bound - top) / (top - low)``.
    A random start component is at least ``MISS_PROBABILITY / sqrt(n)`` of the norm with probability
    about ``1 - MISS_PROBABILITY``; once the amplification exceeds its inverse, such an eigenvalue
    would dominate the top Ritz vector.

    Args:
        steps: Lanczos steps (the Krylov polynomial's degree plus one).
        top: The largest Ritz value.
        low: The smallest Ritz value.
        bound: The eigenvalue to rule out.
        n: The operator's size.

    Returns:
        Whether an eigenvalue at ``bound`` or beyond would have shown by now.

    Example:
        >>> chebyshev_certifies(40, 1.0, 0.0, 1.5, 10_000)
        True
    """
    if steps < 2 or not top > low or not bound > top:
        return False
    growth = math.acosh(1 + 2 * (bound - top) / (top - low)) * (steps - 1)
    return growth >= math.log(2 * math.sqrt(n) / MISS_PROBABILITY)


def _check_interval(m: int) -> int:
    """Steps between convergence checks: every step while the basis is small, then ~2% of it."""
    return max(1, m // 50)


class _Search:
    """The state machine of :func:`eigenvalues`: iterate, check, verify multiplicity, stop."""

    def __init__(
        self,
        krylov: KrylovBasis,
        k: int,
        sign: float,
        tol: float,
        budget: int,
        block: int,
        verify: bool,
    ) -> None:
        self.kr = krylov
        self.k = k
        self.sign = sign
        self.tol = tol
        self.budget = budget
        self.block = block
        self.verify = verify
        self.verify_chain: int | None = None
        self.verify_last = -math.inf
        self.verified = False
        self.reference = 0.0
        self.done = False

    def wanted(self, ritz: Ritz) -> Tensor:
        """Indices of the ``k`` Ritz values at the wanted end, best first."""
        order = torch.argsort(self.sign * ritz.values, descending=True)
        return order[: self.k]

    def threshold(self, ritz: Ritz) -> float:
        """Absolute residual tolerance: ``tol * max |Ritz value|``."""
        return self.tol * float(ritz.values.abs().max()) if ritz.values.numel() else 0.0

    def converged(self, ritz: Ritz, thr: float) -> bool:
        """Whether the ``k`` wanted values all have residuals within ``thr``."""
        wanted = self.wanted(ritz)
        return wanted.numel() >= self.k and bool((ritz.residuals[wanted] <= thr).all())

    def choose(self) -> list[int]:
        """Pending vectors to multiply next (the verification chain alone while verifying)."""
        if self.verify_chain is not None:
            ids = [i for i, p in enumerate(self.kr.pending) if p.chain == self.verify_chain]
            return ids[:1]
        return list(range(min(self.block, len(self.kr.pending))))

    def check(self) -> None:
        """Update the state from the current Ritz pairs."""
        ritz = self.kr.ritz()
        thr = self.threshold(ritz)
        if self.verify_chain is None:
            if not self.converged(ritz, thr):
                return
            if not self.verify or self.verified or self.kr.m + len(self.kr.pending) >= self.kr.n:
                self.done = True
                return
            self.reference = float(self.sign * ritz.values[self.wanted(ritz)[-1]])
            self.verify_last = -math.inf
            if not self.kr.inject():
                self.done = True
                return
            self.verify_chain = self.kr.num_chains - 1
            return
        self._check_verification(thr)

    def _check_verification(self, thr: float) -> None:
        """Found a value beyond the ``k``-th (resume), certified none (stop), or keep going.

        The verification chain explores the compression ``B`` of ``A`` to the complement of every
        other vector so far; an exactly repeated eigenvalue whose copies the first chains missed is
        an eigenvalue of ``B``. Its top Ritz value ``mu`` (residual ``rho`` in ``B``) certifies that
        none lies beyond the ``k``-th value ``ref`` (plus the tolerance) when either
        - the chain has stagnated: at least 3 steps, ``mu + 2 rho <= ref + thr`` and the last rise
          of ``mu`` is below a tenth of the remaining gap; or
        - a Chebyshev bound says any eigenvalue beyond ``ref + thr`` with a random start component
          of typical size (miss probability ``MISS_PROBABILITY``) would already show as a Ritz value.
        """
        ritz, steps, chain_left = self.kr.chain_ritz(self.verify_chain)
        if ritz is None:
            if not chain_left:
                self._verified()
            return
        values = self.sign * ritz.values
        best = int(torch.argmax(values))
        mu, rho = float(values[best]), float(ritz.residuals[best])
        bound = self.reference + thr
        previous, self.verify_last = self.verify_last, mu
        if mu > bound:
            self.verify_chain = None  # a missed value: iterate all chains again, then re-check
            return
        stagnant = steps >= 3 and mu + 2 * rho <= bound and mu - previous <= 0.1 * (bound - mu)
        certified = chebyshev_certifies(steps, mu, float(values.min()), bound, self.kr.n)
        if not chain_left or stagnant or certified:  # no chain left: B's Krylov space is invariant
            self._verified()

    def _verified(self) -> None:
        """Stop, unless the verification columns moved a wanted value off its tolerance: then resume."""
        self.verified = True
        ritz = self.kr.ritz()
        if self.converged(ritz, self.threshold(ritz)):
            self.done = True
        else:
            self.verify_chain = None

    def make_room(self, needed: int) -> None:
        """Thick-restart the basis if ``needed`` more columns would not fit."""
        if self.kr.m + needed <= self.kr.capacity:
            return
        ritz = self.kr.ritz()
        order = torch.argsort(self.sign * ritz.values, descending=True)
        free = self.kr.capacity - self.k - needed
        keep = min(self.kr.m - needed, self.k + max(1, free // 2))
        self.kr.restart(order[: max(self.k, keep)], ritz)

    def run(self) -> None:
        """Iterate until converged (and verified), the space is exhausted, or the budget ends."""
        last_check = 0
        while not self.done:
            if self.kr.m >= self.kr.n:
                return
            if not self.kr.pending and not self.kr.inject():
                return
            remaining = self.budget - self.kr.num_matvecs
            if remaining <= 0:
                return
            chosen = self.choose()[:remaining]
            if not chosen:  # the verification chain deflated: judging it stops or resumes the search
                self.check()
                continue
            self.make_room(len(chosen))
            self.kr.step(chosen)
            # Counted in products, not basis columns: a thick restart shrinks the basis.
            due = self.kr.num_matvecs - last_check >= _check_interval(self.kr.m) or not self.kr.pending
            if due or self.verify_chain is not None:
                last_check = self.kr.num_matvecs
                self.check()


def eigenvalues(
    op: SymmetricOperator,
    k: int = 1,
    which: str = "largest",
    *,
    tol: float = 1e-4,
    max_matvecs: int | None = None,
    return_vectors: bool = False,
    seed: int = 0,
    block_size: int = 1,
    max_basis: int | None = None,
    check_multiplicity: bool = True,
) -> EigenResult:
    """The ``k`` largest or smallest eigenvalues of a symmetric operator, by Lanczos.

    Lanczos with full reorthogonalization grows one Krylov basis until the ``k`` wanted Ritz values
    converge: a value is converged when its residual ``||A x - theta x||`` is at most
    ``tol * max|theta|`` (``tol`` relative to the spectral scale, estimated by the largest Ritz value
    in magnitude). The projected eigenproblem is solved in float64. For ``k > block_size`` the result is
    then checked for missed multiplicity with a fresh random start vector orthogonal to the basis (see
    the module docstring). When the basis reaches ``N`` the results are exact. If ``max_matvecs`` ends
    first, a :class:`HessianConvergenceWarning` is issued and ``converged`` says which values made it.

    Args:
        op: Symmetric operator with ``shape (N, N)``, ``dtype``, ``device`` and ``op @ V``
            (e.g. :class:`lightning_hessian.HessianOperator` or
            :class:`~lightning_hessian.linear_operator.MatrixOperator`).
        k: Number of eigenvalues, ``1 <= k <= N``.
        which: ``"largest"`` (algebraically largest, largest first) or ``"smallest"`` (smallest
            first).
        tol: Relative residual tolerance (see above).
        max_matvecs: Product budget; default ``min(N, max(500, 50 * k))``.
        return_vectors: Also return the ``[N, k]`` unit eigenvectors.
        seed: Seed of the private random generator for start vectors.
        block_size: Vectors multiplied together per step (``1``: plain Lanczos, fewest products;
            larger blocks batch the products and see multiplicities up to the block size).
        max_basis: Most basis vectors kept before a thick restart; default: the budget, capped at
            about 1 GiB of basis memory.
        check_multiplicity: Run the fresh-vector check for missed copies of repeated eigenvalues
            (only needed when ``k > block_size``).

    Returns:
        An :class:`~lightning_hessian.results.EigenResult` with ``values``, optional ``vectors``,
        per-value ``converged`` flags and ``residuals``, ``num_matvecs``, ``which`` and the absolute
        ``tol`` that was applied.

    Raises:
        TypeError: If ``op`` is not an operator or an integer argument is not an integer.
        ValueError: If ``op`` is not square, ``k`` is outside ``[1, N]``, ``which`` is unknown,
            ``tol <= 0``, ``max_matvecs < k`` or ``max_basis`` is too small.

    Example:
        >>> from lightning_hessian.linear_operator import MatrixOperator
        >>> op = MatrixOperator(torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64)))
        >>> result = eigenvalues(op, k=2)
        >>> [round(v, 3) for v in result.values.tolist()], result.all_converged
        ([100.0, 99.0], True)
    """
    n = operator_size(op)
    k, tol, budget, block, basis_cap = _validate(n, k, which, tol, max_matvecs, block_size, max_basis)
    sign = 1.0 if which == "largest" else -1.0
    dtype = op.dtype if op.dtype.is_floating_point else torch.float32
    capacity = basis_cap or _default_capacity(local_rows(op), k, block, budget, dtype)
    capacity = min(n, capacity)
    krylov = KrylovBasis(op, n, capacity, make_generator(op.device, seed))
    for _ in range(block):
        krylov.inject()
    search = _Search(krylov, k, sign, tol, budget, block, check_multiplicity and k > block)
    search.run()
    return _result(search, which, return_vectors, budget)


def _result(search: _Search, which: str, return_vectors: bool, budget: int) -> EigenResult:
    """Package the wanted Ritz pairs; warn when some did not converge."""
    kr = search.kr
    ritz = kr.ritz()
    thr = search.threshold(ritz)
    wanted = search.wanted(ritz)
    values = ritz.values[wanted]
    residuals = ritz.residuals[wanted]
    exhausted = kr.m >= kr.n
    converged = torch.ones_like(values, dtype=torch.bool) if exhausted else residuals <= thr
    vectors = kr.vectors(ritz.coords[:, wanted]) if return_vectors else None
    if not bool(converged.all()):
        missing = int((~converged).sum())
        warnings.warn(
            f"eigenvalues: {missing} of {search.k} {which} eigenvalue(s) did not reach the "
            f"residual tolerance {thr:.3g} (tol={search.tol:g} x spectral scale) within "
            f"max_matvecs={budget} products (worst residual {float(residuals.max()):.3g}). "
            f"Raise `max_matvecs` or `tol`; `converged` flags the values that made it.",
            HessianConvergenceWarning,
            stacklevel=3,
        )
    return EigenResult(
        values=values,
        vectors=vectors,
        converged=converged,
        residuals=residuals,
        num_matvecs=kr.num_matvecs,
        which=which,
        tol=thr,
    )
