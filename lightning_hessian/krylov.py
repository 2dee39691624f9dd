"""A growing orthonormal Krylov basis with its projection: the engine of Lanczos and of SLQ.

The basis ``Q`` (in the operator's dtype, on its device) grows by one vector or one block per product;
the projection ``H = Q^T A Q`` is kept in float64 (tridiagonal for plain Lanczos, banded once blocks or
fresh start vectors enter) together with the pending residual directions ``P`` and their couplings
``C``, so that ``A Q = Q H + P C`` holds to rounding at every step. Ritz pairs come from
``torch.linalg.eigh(H)`` in float64, and the residual of a Ritz pair ``(theta, Q y)`` is the exact
``||C y||`` (the pending directions are orthonormal).

- Every new vector is orthogonalized twice (classical Gram-Schmidt) against the whole basis, so there
  are no ghost copies of converged values.
- When the Krylov space becomes invariant (breakdown) a fresh random vector orthogonal to everything
  so far continues the basis, so the space can reach ``N``, where the results are exact.
- :meth:`KrylovBasis.restart` compresses the basis to chosen Ritz vectors (thick restart).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .contractions import column_norms, dot, inner, local_rows, norm, random_normal
from .linear_operator import SymmetricOperator


@dataclass
class Pending:
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
class Ritz:
    """Ritz pairs of the current basis: ascending ``values``, ``coords`` (columns), ``residuals``."""

    values: Tensor
    coords: Tensor
    residuals: Tensor


class KrylovBasis:
    """Orthonormal basis ``Q``, projection ``H`` and pending directions with ``A Q = Q H + P C``.

    Vectors are ``[rows]`` with ``rows = N``, or this rank's rows of them for an operator with
    sharded vectors; every contraction over ``N`` goes through :mod:`lightning_hessian.contractions`.

    Args:
        op: The symmetric operator.
        n: Its side length ``N``.
        capacity: Most basis vectors held at once.
        generator: Source of fresh random start vectors.
    """

    def __init__(self, op: SymmetricOperator, n: int, capacity: int, generator: torch.Generator) -> None:
        self.op = op
        self.n = n
        self.rows = n if getattr(op, "shards", None) is None else local_rows(op)
        self.capacity = capacity
        self.dtype = op.dtype if op.dtype.is_floating_point else torch.float32
        self.device = torch.device(op.device)
        self.eps = torch.finfo(self.dtype).eps
        self.generator = generator
        self.basis = torch.empty(self.rows, capacity, dtype=self.dtype, device=self.device)
        self.proj = torch.zeros(capacity, capacity, dtype=torch.float64, device=self.device)
        self.chain_of = [-1] * capacity
        self.pending: list[Pending] = []
        self.m = 0
        self.num_chains = 0
        self.num_matvecs = 0
        self.num_restarts = 0

    # -- orthogonalization ------------------------------------------------------------------------
    def _project_out(self, block: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Orthogonalize ``block`` ``[N, b]`` twice against the basis and the pending vectors, in place.

        ``block`` is overwritten (it must be a tensor of the caller's own); each pass subtracts the
        projection with one ``addmm_``, so no ``[N, b]`` temporary is made, and the pending vectors
        are taken one at a time rather than stacked into a copy.

        Returns:
            ``(block, basis_coefficients [m, b], pending_coefficients [p, b])`` (float64).
        """
        q = self.basis[:, : self.m]
        cq = torch.zeros(self.m, block.shape[1], dtype=torch.float64, device=self.device)
        cp = torch.zeros(len(self.pending), block.shape[1], dtype=torch.float64, device=self.device)
        for _ in range(2):
            if self.m:
                c = inner(self.op, q, block)
                block.addmm_(q, c, alpha=-1)
                cq += c.double()
            for r, item in enumerate(self.pending):
                vec = item.vec[:, None]
                c = inner(self.op, vec, block)
                block.addmm_(vec, c, alpha=-1)
                cp[r] += c[0].double()
        return block, cq, cp

    def inject(self) -> bool:
        """Append a fresh random pending vector orthogonal to everything so far (a new chain).

        Returns:
            False when the basis and the pending vectors already span the whole space.
        """
        if self.m + len(self.pending) >= self.n:
            return False
        z = random_normal(self.op, self.n, 1, self.generator, self.dtype, self.device)
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
            z = vectors[:, j : j + 1].to(self.dtype, copy=True)  # projected in place
            norm0 = float(norm(self.op, z))
            z, _, _ = self._project_out(z)
            length = float(norm(self.op, z))
            if not length > 10 * self.eps * math.sqrt(self.m + len(self.pending) + 1) * norm0:
                continue
            coupling = torch.zeros(self.capacity, dtype=torch.float64, device=self.device)
            self.pending.append(Pending(z[:, 0].div_(length), coupling, self.num_chains))
            self.num_chains += 1
            kept += 1
        return kept

    # -- one (block) Lanczos step -----------------------------------------------------------------
    def step(self, indices: list[int]) -> None:
        """Move the pending vectors at ``indices`` into the basis and multiply them by ``A``.

        Memory: besides the basis and the pending vectors, at most two ``[N, b]`` blocks at once (the
        contiguous copy of the new columns with their product, then the product with the new
        residual directions); the moved pending vectors are released once copied into the basis.
        """
        taken = set(indices)
        chosen = [self.pending[i] for i in indices]
        self.pending = [item for i, item in enumerate(self.pending) if i not in taken]
        m0, b = self.m, len(chosen)
        m1 = m0 + b
        chains = [item.chain for item in chosen]
        self._append(chosen)
        del chosen  # the basis holds them now: their vectors are released
        self.m = m1
        # A single vector goes as a contiguous [N] vector: operators multiply those fastest.
        block = self.basis[:, m0] if b == 1 else self.basis[:, m0:m1]
        products = (self.op @ block.contiguous()).to(self.dtype).reshape(self.rows, b)
        if not products.is_contiguous() or products.untyped_storage().data_ptr() == self.basis.data_ptr():
            products = products.clone()  # an operator that returned a view: project a copy in place
        self.num_matvecs += b
        norms = column_norms(self.op, products).double()
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
        self._add_residuals(residual, norms, m0, chains)

    def _append(self, chosen: list[Pending]) -> None:
        """Copy the pending vectors ``chosen`` into the basis columns from ``m`` on, with their couplings."""
        m0 = self.m
        for j, item in enumerate(chosen):
            self.basis[:, m0 + j] = item.vec
            self.proj[m0 + j, :m0] = item.coupling[:m0]
            self.chain_of[m0 + j] = item.chain

    def _add_residuals(self, residual: Tensor, norms: Tensor, m0: int, chains: list[int]) -> None:
        """Orthonormalize the new residual columns among themselves (in place), dropping negligible ones."""
        accepted: list[Pending] = []
        for j in range(residual.shape[1]):
            w = residual[:, j]
            for _ in range(2):
                for item in accepted:
                    c = float(dot(self.op, item.vec, w))
                    w.add_(item.vec, alpha=-c)
                    item.coupling[m0 + j] += c
            beta = float(norm(self.op, w))
            if beta <= 10 * self.eps * math.sqrt(self.m + 1) * float(norms[j]) or beta == 0.0:
                continue  # A q_j lies in the span: deflate this direction
            coupling = torch.zeros(self.capacity, dtype=torch.float64, device=self.device)
            coupling[m0 + j] = beta
            accepted.append(Pending(w / beta, coupling, chains[j]))
        self.pending.extend(accepted)

    # -- Rayleigh-Ritz ----------------------------------------------------------------------------
    def ritz(self, columns: Tensor | None = None) -> Ritz:
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
        return Ritz(values, coords, res2.sqrt())

    def chain_ritz(self, chain: int | None) -> tuple[Ritz | None, int, bool]:
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
        return Ritz(values, coords, res), len(cols), bool(own)

    def vectors(self, coords: Tensor) -> Tensor:
        """Unit Ritz vectors ``Q y`` for the coordinate columns ``coords``."""
        x = self.basis[:, : self.m] @ coords.to(self.dtype)
        return x.div_(column_norms(self.op, x, keepdim=True).clamp_min(torch.finfo(self.dtype).tiny))

    def restart(self, keep: Tensor, ritz: Ritz, workspace_columns: int = 1) -> None:
        """Thick restart: keep only the Ritz vectors ``keep`` (indices into ``ritz``).

        The basis becomes ``Q Y`` (``Y`` the kept coordinates), computed in place a slab of rows at a
        time (row ``i`` of ``Q Y`` needs only row ``i`` of ``Q``), so the temporary is at most
        ``workspace_columns`` basis columns' worth of memory. The projection becomes the diagonal of
        the kept Ritz values and the pending couplings become ``C Y``, so ``A Q = Q H + P C`` still
        holds (the Krylov-Schur form).

        Args:
            keep: Indices into ``ritz`` of the Ritz pairs to keep.
            ritz: The current Ritz pairs (:meth:`ritz`).
            workspace_columns: Memory allowed for the temporary, in basis columns.
        """
        coords = ritz.coords[:, keep]
        r = coords.shape[1]
        chain_ids = torch.tensor(self.chain_of[: self.m], device=self.device)
        owners = []
        for col in range(r):
            mass = coords[:, col].pow(2)
            ids = chain_ids.unique()
            owners.append(int(ids[torch.stack([mass[chain_ids == i].sum() for i in ids]).argmax()]))
        y = coords.to(self.dtype)
        slab = max(1, (self.rows * max(1, workspace_columns)) // max(1, r))
        for first in range(0, self.rows, slab):
            rows = slice(first, min(self.rows, first + slab))
            self.basis[rows, :r] = self.basis[rows, : self.m] @ y
        self.proj.zero_()
        self.proj[:r, :r] = torch.diag(ritz.values[keep])
        for item in self.pending:
            c = item.coupling[: self.m] @ coords
            item.coupling.zero_()
            item.coupling[:r] = c
        self.chain_of = owners + [-1] * (self.capacity - r)
        self.m = r
        self.num_restarts += 1
