"""Plain-data results of the estimators and of :func:`lightning_hessian.analyze`.

Every result holds tensors and numbers only, so it can be saved with ``torch.save``, compared in
tests and logged without touching the model again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class EigenResult:
    """Eigenvalues of a symmetric operator, in the style of ``scipy.sparse.linalg.eigsh``.

    Attributes:
        values: ``[k]`` eigenvalues, largest first for ``which="largest"``, smallest first for
            ``which="smallest"``.
        vectors: ``[N, k]`` unit eigenvectors (columns) when requested, else ``None``.
        converged: ``[k]`` bools: the value's residual ``||A x - value x||`` met the tolerance.
        residuals: ``[k]`` residual norms (float64).
        num_matvecs: Operator-vector products used.
        which: ``"largest"`` or ``"smallest"``.
        tol: The absolute residual tolerance that ``converged`` was judged against.
    """

    values: Tensor
    vectors: Tensor | None
    converged: Tensor
    residuals: Tensor
    num_matvecs: int
    which: str = "largest"
    tol: float = 0.0

    @property
    def all_converged(self) -> bool:
        """Whether every returned value converged."""
        return bool(self.converged.all())


@dataclass
class TraceResult:
    """A trace estimate.

    Attributes:
        value: The estimate of ``tr(A)``.
        stderr: Its standard error (``0.0`` when exact).
        num_matvecs: Operator-vector products used.
        method: The estimator that produced it.
    """

    value: float
    stderr: float
    num_matvecs: int
    method: str


def default_broadening(nodes: Tensor) -> float:
    """Default Gaussian width for :meth:`SpectralDensity.pdf`: 1% of the spectrum's span.

    Args:
        nodes: Quadrature nodes (eigenvalue estimates).

    Returns:
        ``0.01 * (max - min)``, or ``1e-3 * max(1, |max|)`` for a spectrum of one point.
    """
    lo, hi = float(nodes.min()), float(nodes.max())
    span = hi - lo
    return 0.01 * span if span > 0 else 1e-3 * max(1.0, abs(hi))


@dataclass
class SpectralDensity:
    """An eigenvalue density as a weighted set of nodes (a discrete measure of total mass 1).

    From stochastic Lanczos quadrature the nodes are the Ritz values of the block Krylov space of the
    probes and the weights the squared components of their Ritz vectors on the probes, averaged over
    probes (with one probe: the squared first components); from a dense Hessian the nodes are the exact
    eigenvalues, each of weight ``1/N``.

    Attributes:
        nodes: ``[M]`` node locations (float64).
        weights: ``[M]`` non-negative weights summing to 1 (float64).
        num_matvecs: Operator-vector products used (0 when exact).
        num_probes: Number of random probes averaged (0 when exact).
        exact: Whether the nodes are the exact spectrum.
    """

    nodes: Tensor
    weights: Tensor
    num_matvecs: int = 0
    num_probes: int = 0
    exact: bool = False

    def pdf(self, grid: Tensor, sigma: float | None = None) -> Tensor:
        """Evaluate the Gaussian-broadened density on ``grid``.

        Args:
            grid: Points at which to evaluate the density.
            sigma: Width of the Gaussian around each node; default
                :func:`default_broadening` (1% of the spectrum's span).

        Returns:
            The density at ``grid`` (float64), integrating to 1 over the real line.

        Raises:
            ValueError: If ``sigma`` is not positive.
        """
        sigma = default_broadening(self.nodes) if sigma is None else float(sigma)
        if not sigma > 0:
            raise ValueError(f"`sigma` must be positive, got {sigma}.")
        grid = torch.as_tensor(grid, dtype=torch.float64, device=self.nodes.device)
        diff = (grid.reshape(-1, 1) - self.nodes.reshape(1, -1)) / sigma
        kernel = torch.exp(-0.5 * diff**2) / (sigma * math.sqrt(2 * math.pi))
        return (kernel @ self.weights.to(torch.float64)).reshape(grid.shape)

    def histogram(self, bins: int = 64) -> tuple[Tensor, Tensor]:
        """Bin the weighted nodes.

        Args:
            bins: Number of equal-width bins spanning the nodes.

        Returns:
            ``(edges, mass)``: ``[bins + 1]`` bin edges and ``[bins]`` weights per bin (summing to 1).

        Raises:
            ValueError: If ``bins`` is not a positive integer.
        """
        if not isinstance(bins, int) or bins < 1:
            raise ValueError(f"`bins` must be a positive integer, got {bins!r}.")
        nodes = self.nodes.to(torch.float64).cpu()
        weights = self.weights.to(torch.float64).cpu()
        lo, hi = float(nodes.min()), float(nodes.max())
        if hi <= lo:
            pad = 0.5 * max(1e-12, abs(lo) * 1e-6)
            lo, hi = lo - pad, hi + pad
        edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
        index = torch.bucketize(nodes, edges[1:-1], right=True)
        mass = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, weights)
        return edges, mass

    @property
    def mean(self) -> float:
        """The first moment ``sum(weights * nodes)`` (an estimate of ``trace / N``)."""
        return float((self.weights.to(torch.float64) * self.nodes.to(torch.float64)).sum())


@dataclass
class BlockReport:
    """Curvature of one diagonal block of the Hessian.

    Attributes:
        name: Block name (``"model"`` for the whole selection).
        size: Number of parameters in the block.
        method: ``"dense"`` (exact), ``"iterative"`` (Hessian-vector products) or ``"zero"`` (the loss
            does not depend on the block's parameters: its Hessian is exactly zero).
        eigenvalues: Top eigenvalues, largest first, or ``None`` if not requested.
        min_eigenvalue: The smallest eigenvalue (with its convergence), or ``None``.
        trace: The trace with its standard error, or ``None``.
        density: The eigenvalue density, or ``None``.
        spectrum: All eigenvalues, ascending, when computed exactly; else ``None``.
        num_matvecs: Hessian-vector products spent on this block.
        seconds: Wall time spent on this block.
        ritz_vectors: ``[n, r]`` top Ritz vectors kept for a warm start of the next evaluation
            (``krylov="shared"`` with ``keep_vectors > 0``), else ``None``.
    """

    name: str
    size: int
    method: str
    eigenvalues: EigenResult | None = None
    min_eigenvalue: EigenResult | None = None
    trace: TraceResult | None = None
    density: SpectralDensity | None = None
    spectrum: Tensor | None = None
    num_matvecs: int = 0
    seconds: float = 0.0
    ritz_vectors: Tensor | None = None


@dataclass
class HessianReport:
    """Everything one :func:`lightning_hessian.analyze` call measured.

    Attributes:
        blocks: Per-block reports, in block order.
        loss: The (size-weighted mean) loss at which the Hessian was taken.
        num_samples: Samples in the data the loss was averaged over (all ranks).
        num_matvecs: Hessian-vector products spent in total.
        seconds: Wall time of the whole analysis.
    """

    blocks: dict[str, BlockReport] = field(default_factory=dict)
    loss: float = float("nan")
    num_samples: int = 0
    num_matvecs: int = 0
    seconds: float = 0.0

    def non_finite(self) -> list[str]:
        """Sorted names of the loss and logged scalars that are NaN or infinite (empty: all finite)."""
        values = {"loss": self.loss, **self.scalars()}
        return sorted(name for name, value in values.items() if not math.isfinite(value))

    def scalars(self, prefix: str = "hessian") -> dict[str, float]:
        """Flatten the report into the logged scalar names of the design contract.

        Args:
            prefix: Leading name component.

        Returns:
            ``{"hessian/B/trace": ..., "hessian/B/eigenvalue_1": ..., "hessian/B/eigenvalue_min": ...}``
            for every block ``B`` and every metric it has.
        """
        out: dict[str, float] = {}
        for name, block in self.blocks.items():
            if block.trace is not None:
                out[f"{prefix}/{name}/trace"] = float(block.trace.value)
            if block.eigenvalues is not None:
                for i, value in enumerate(block.eigenvalues.values.tolist(), start=1):
                    out[f"{prefix}/{name}/eigenvalue_{i}"] = float(value)
            if block.min_eigenvalue is not None:
                out[f"{prefix}/{name}/eigenvalue_min"] = float(block.min_eigenvalue.values[0])
        return out
