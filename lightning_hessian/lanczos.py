"""Extreme eigenvalues of a symmetric operator: Lanczos with full reorthogonalization.

The method grows one orthonormal Krylov basis ``Q`` (in the operator's dtype, on its device) and keeps
the projection ``H = Q^T A Q`` (float64; tridiagonal for plain Lanczos, banded once blocks or fresh start
vectors enter) together with the pending residual directions ``P`` and their couplings ``C``, so that
``A Q = Q H + P C`` holds to rounding at every step. Ritz pairs come from ``torch.linalg.eigh(H)`` in
float64, and the residual of a Ritz pair ``(theta, Q y)`` is the exact ``||C y||`` (the pending
directions are orthonormal), so convergence is judged on true residuals, never on the change of a value.

- Every new vector is orthogonalized twice (classical Gram-Schmidt) against the whole basis, so there
  are no ghost copies of converged values.
- When the Krylov space becomes invariant (breakdown) a fresh random vector orthogonal to everything
  so far continues the basis, so the space can reach ``N``, where the results are exact.
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
import numbers
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from .linear_operator import SymmetricOperator, check_int, make_generator, operator_size
from .results import EigenResult

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


@dataclass
class _Pending:
    """A residual direction not yet multiplied by the operator.

    Attributes:
        vec: ``[N]`` unit vector, orthogonal to the basis and to the other pending vectors.
        coupling: ``[capacity]`` float64: the component of ``A q_j`` along ``vec`` for each basis
            column ``j`` (zero for columns whose product it does not touch).
        chain: Id of the start vector whose Krylov sequence produced it.
    """

    vec: Tensor
    coupling: Tensor
    chain: int


@dataclass
class _Ritz:
    """Ritz pairs of the current basis: ascending ``values``, ``coords`` (columns), ``residuals``."""

    values: Tensor
    coords: Tensor
    residuals: Tensor


class KrylovBasis:
    """Orthonormal basis ``Q``, projection ``H`` and pending directions with ``A Q = Q H + P C``.

    Args:
        op: The symmetric operator.
        n: Its side length.
        capacity: Most basis vectors held at once.
        generator: Source of fresh random start vectors.
    """

    def __init__(self, op: SymmetricOperator, n: int, capacity: int, generator: torch.Generator) -> None:
        self.op = op
        self.n = n
        self.capacity = capacity
        self.dtype = op.dtype if op.dtype.is_floating_point else torch.float32
        self.device = torch.device(op.device)
        self.eps = torch.finfo(self.dtype).eps
        self.generator = generator
        self.basis = torch.empty(n, capacity, dtype=self.dtype, device=self.device)
        self.proj = torch.zeros(capacity, capacity, dtype=torch.float64, device=self.device)
        self.chain_of = [-1] * capacity
        self.pending: list[_Pending] = []
        self.m = 0
        self.num_chains = 0
        self.num_matvecs = 0

    # -- orthogonalization ------------------------------------------------------------------------
    def _project_out(self, block: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Orthogonalize ``block`` ``[N, b]`` twice against the basis and the pending vectors.

        Returns:
            ``(remainder, basis_coefficients [m, b], pending_coefficients [p, b])`` (float64).
        """
        q = self.basis[:, : self.m]
        p = torch.stack([item.vec for item in self.pending], 1) if self.pending else None
        cq = torch.zeros(self.m, block.shape[1], dtype=torch.float64, device=self.device)
        cp = torch.zeros(len(self.pending), block.shape[1], dtype=torch.float64, device=self.device)
        for _ in range(2):
            if self.m:
                c = q.T @ block
                block = block - q @ c
                cq += c.double()
            if p is not None:
                c = p.T @ block
                block = block - p @ c
                cp += c.double()
        return block, cq, cp

    def inject(self) -> bool:
        """Append a fresh random pending vector orthogonal to everything so far (a new chain).

        Returns:
            False when the basis and the pending vectors already span the whole space.
        """
        if self.m + len(self.pending) >= self.n:
            return False
        z = torch.randn(self.n, 1, generator=self.generator, dtype=self.dtype, device=self.device)
        return self.start(z) == 1

    def start(self, vectors: Tensor) -> int:
        """Append the columns of ``vectors`` ``[N, b]`` as new chains, orthonormalized against everything.

        Returns:
            How many columns were kept (a column already in the span is dropped).
        """
        kept = 0
        for j in range(vectors.shape[1]):
            if self.m + len(self.pending) >= self.n:
                break
            z = vectors[:, j : j + 1].to(self.dtype)
            norm0 = float(z.norm())
            z, _, _ = self._project_out(z)
            norm = float(z.norm())
            if not norm > 10 * self.eps * math.sqrt(self.m + len(self.pending) + 1) * norm0:
                continue
            coupling = torch.zeros(self.capacity, dtype=torch.float64, device=self.device)
            self.pending.append(_Pending(z[:, 0] / norm, coupling, self.num_chains))
            self.num_chains += 1
            kept += 1
        return kept

    # -- one (block) Lanczos step -----------------------------------------------------------------
    def step(self, indices: list[int]) -> None:
        """Move the pending vectors at ``indices`` into the basis and multiply them by ``A``."""
        taken = set(indices)
        chosen = [self.pending[i] for i in indices]
        self.pending = [item for i, item in enumerate(self.pending) if i not in taken]
        m0, b = self.m, len(chosen)
        m1 = m0 + b
        for j, item in enumerate(chosen):
            self.basis[:, m0 + j] = item.vec
            self.proj[m0 + j, :m0] = item.coupling[:m0]
            self.chain_of[m0 + j] = item.chain
        self.m = m1
        # A single vector goes as a contiguous [N] vector: operators multiply those fastest.
        block = self.basis[:, m0] if b == 1 else self.basis[:, m0:m1]
        products = (self.op @ block.contiguous()).to(self.dtype).reshape(self.n, b)
        self.num_matvecs += b
        norms = products.norm(dim=0).double()
        residual, cq, cp = self._project_out(products)
        # Columns from the product; rows [m0:m1, :m0] averaged with the couplings (same numbers in
        # exact arithmetic) to keep H symmetric.
        rows = 0.5 * (self.proj[m0:m1, :m0] + cq[:m0].T)
        self.proj[m0:m1, :m0] = rows
        self.proj[:m0, m0:m1] = rows.T
        diag = cq[m0:m1]
        self.proj[m0:m1, m0:m1] = 0.5 * (diag + diag.T)
        for r, item in enumerate(self.pending):
            item.coupling[m0:m1] = cp[r]
        self._add_residuals(residual, norms, m0, [item.chain for item in chosen])

    def _add_residuals(self, residual: Tensor, norms: Tensor, m0: int, chains: list[int]) -> None:
        """Orthonormalize the new residual columns among themselves, dropping negligible ones."""
        accepted: list[_Pending] = []
        for j in range(residual.shape[1]):
            w = residual[:, j]
            for _ in range(2):
                for item in accepted:
                    c = torch.dot(item.vec, w)
                    w = w - c * item.vec
                    item.coupling[m0 + j] += float(c)
            beta = float(w.norm())
            if beta <= 10 * self.eps * math.sqrt(self.m + 1) * float(norms[j]) or beta == 0.0:
                continue  # A q_j lies in the span: deflate this direction
            coupling = torch.zeros(self.capacity, dtype=torch.float64, device=self.device)
            coupling[m0 + j] = beta
            accepted.append(_Pending(w / beta, coupling, chains[j]))
        self.pending.extend(accepted)

    # -- Rayleigh-Ritz ----------------------------------------------------------------------------
    def ritz(self, columns: Tensor | None = None) -> _Ritz:
        """Ritz pairs of the basis (or of the sub-basis ``columns``), with exact residual norms."""
        h = self.proj[: self.m, : self.m]
        if columns is not None:
            h = h[columns][:, columns]
        values, coords = torch.linalg.eigh(h)
        if columns is not None:
            full = torch.zeros(self.m, coords.shape[1], dtype=torch.float64, device=self.device)
            full[columns] = coords
            coords = full
            inside = self.proj[: self.m, : self.m] @ coords - coords * values
            res2 = inside.pow(2).sum(0)
        else:
            res2 = torch.zeros_like(values)
        if self.pending:
            couplings = torch.stack([item.coupling[: self.m] for item in self.pending])
            res2 = res2 + (couplings @ coords).pow(2).sum(0)
        return _Ritz(values, coords, res2.sqrt())

    def chain_ritz(self, chain: int | None) -> tuple[_Ritz | None, int, bool]:
        """Ritz pairs of one chain's columns in the compression to their own span.

        Residuals count only the chain's own pending directions (the compression of ``A`` to the
        complement of all other vectors).

        Returns:
            ``(ritz or None when the chain has no column yet, number of columns, pending left)``.
        """
        cols = [j for j in range(self.m) if self.chain_of[j] == chain]
        own = [item for item in self.pending if item.chain == chain]
        if not cols:
            return None, 0, bool(own)
        index = torch.tensor(cols, device=self.device)
        values, coords = torch.linalg.eigh(self.proj[index][:, index])
        res = torch.zeros_like(values)
        if own:
            couplings = torch.stack([item.coupling[index] for item in own])
            res = (couplings @ coords).norm(dim=0)
        return _Ritz(values, coords, res), len(cols), bool(own)

    def vectors(self, coords: Tensor) -> Tensor:
        """Unit Ritz vectors ``Q y`` for the coordinate columns ``coords``."""
        x = self.basis[:, : self.m] @ coords.to(self.dtype)
        return x / x.norm(dim=0, keepdim=True).clamp_min(torch.finfo(self.dtype).tiny)

    def restart(self, keep: Tensor, ritz: _Ritz) -> None:
        """Thick restart: keep only the Ritz vectors ``keep`` (indices into ``ritz``)."""
        coords = ritz.coords[:, keep]
        r = coords.shape[1]
        kept = self.basis[:, : self.m] @ coords.to(self.dtype)
        chain_ids = torch.tensor(self.chain_of[: self.m], device=self.device)
        owners = []
        for col in range(r):
            mass = coords[:, col].pow(2)
            ids = chain_ids.unique()
            owners.append(int(ids[torch.stack([mass[chain_ids == i].sum() for i in ids]).argmax()]))
        self.basis[:, :r] = kept
        self.proj.zero_()
        self.proj[:r, :r] = torch.diag(ritz.values[keep])
        for item in self.pending:
            c = item.coupling[: self.m] @ coords
            item.coupling.zero_()
            item.coupling[:r] = c
        self.chain_of = owners + [-1] * (self.capacity - r)
        self.m = r


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
    if which not in WHICH:
        raise ValueError(f"`which` must be 'largest' or 'smallest', got {which!r}.")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not math.isfinite(tol) or not tol > 0:
        raise ValueError(
            f"`tol` must be a positive finite number (relative residual, e.g. 1e-4), got {tol!r}."
        )
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


def _chebyshev_certifies(steps: int, top: float, low: float, bound: float, n: int) -> bool:
    """Whether ``steps`` Lanczos steps would have revealed an eigenvalue at ``bound`` or beyond.

    With Ritz values spanning ``[low, top]``, the Krylov polynomial can amplify an eigenvalue at
    ``bound`` over the rest by ``T_{steps-1}(1 + 2 gamma)``, ``gamma = (bound - top) / (top - low)``.
    A random start component is at least ``MISS_PROBABILITY / sqrt(n)`` of the norm with probability
    about ``1 - MISS_PROBABILITY``; once the amplification exceeds its inverse, such an eigenvalue
    would dominate the top Ritz vector.
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

    def wanted(self, ritz: _Ritz) -> Tensor:
        """Indices of the ``k`` Ritz values at the wanted end, best first."""
        order = torch.argsort(self.sign * ritz.values, descending=True)
        return order[: self.k]

    def threshold(self, ritz: _Ritz) -> float:
        """Absolute residual tolerance: ``tol * max |Ritz value|``."""
        return self.tol * float(ritz.values.abs().max()) if ritz.values.numel() else 0.0

    def converged(self, ritz: _Ritz, thr: float) -> bool:
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
        certified = _chebyshev_certifies(steps, mu, float(values.min()), bound, self.kr.n)
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
    capacity = basis_cap or _default_capacity(n, k, block, budget, dtype)
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
