"""The trace of a symmetric operator: exact, or estimated from a fixed budget of products.

Methods (all spend exactly the products they are given; none stops early on a tolerance):

- ``"exact"``: the sum of the diagonal of the dense matrix (``op.to_dense()`` when the operator has
  it, else ``op @ I`` in column chunks). Standard error 0.
- ``"hutchinson"`` (Hutchinson 1989): the mean of ``z^T A z`` over Rademacher probes ``z``; standard
  error = sample standard deviation / sqrt(probes).
- ``"hutch++"`` (Meyer, Musco, Musco, Woodruff 2021): a third of the budget sketches the range of
  ``A`` (``Q = orth(A S)``), a third takes ``tr(Q^T A Q)`` exactly, and the last third runs
  Hutchinson on the deflated ``(I - QQ^T) A (I - QQ^T)``; its standard error is that of the
  Hutchinson part.
- ``"xtrace"`` (Epperly, Tropp, Webber 2024): half the budget sketches ``Y = A Omega``, half
  multiplies the basis ``Q = orth(Y)``; every probe is used both in the sketch and, leaving it out,
  as a Hutchinson probe of the deflated remainder (with the sphere-normalized scaling of the paper).
  The estimate is the mean of these exchangeable estimates. They share their sketches, so their
  spread would understate the error; the standard error is the jackknife over the probes instead
  (on the safe side from about 30 products; with the smallest budgets it can still understate the
  error). Usually the most accurate for a given budget.

With a single Hutchinson probe the sample deviation is undefined; the standard error then uses the
Rademacher variance bound ``Var(z^T B z) <= 2 ||B||_F^2`` with ``||B||_F^2`` estimated by ``||B z||^2``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .contractions import (
    column_dots,
    inner,
    is_sharded,
    local_rows,
    orthonormalize,
    random_normal,
    random_signs,
    shards_of,
    total,
)
from .linear_operator import SymmetricOperator, default_chunk_size, matmul_chunked, operator_size
from .probes import make_generator
from .results import TraceResult
from .validation import check_choice, check_int

METHODS = ("exact", "hutchinson", "hutch++", "xtrace")
#: Fewest products each stochastic method can work with.
MIN_MATVECS = {"hutchinson": 1, "hutch++": 3, "xtrace": 4}
#: Most jackknife replicates of the XTrace standard error (delete-a-group beyond this many probes;
#: each replicate costs a QR of the ``s x s`` sketch factor).
JACKKNIFE_GROUPS = 32


def _mean_stderr(samples: Tensor, frobenius2: Tensor) -> tuple[float, float]:
    """Mean of Hutchinson samples and its standard error (variance bound for a single sample)."""
    m = samples.numel()
    mean = float(samples.mean())
    if m >= 2:
        return mean, float(samples.std(unbiased=True)) / math.sqrt(m)
    return mean, math.sqrt(2.0 * float(frobenius2.mean()) / m)


def _float_dtype(op: SymmetricOperator) -> torch.dtype:
    return op.dtype if op.dtype.is_floating_point else torch.float32


def _exact(op: SymmetricOperator, n: int, chunk_size: int | None) -> TraceResult:
    """Sum of the diagonal of the dense operator."""
    if is_sharded(op):
        return _exact_sharded(op, n, chunk_size)
    if hasattr(op, "to_dense"):
        before = getattr(op, "num_matvecs", None)
        value = float(torch.diagonal(op.to_dense()).double().sum())
        after = getattr(op, "num_matvecs", None)
        used = after - before if isinstance(before, int) and isinstance(after, int) else n
        return TraceResult(value=value, stderr=0.0, num_matvecs=used, method="exact")
    dtype = _float_dtype(op)
    chunk = chunk_size or default_chunk_size(n, dtype)
    total = 0.0
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        cols = torch.arange(stop - start, device=op.device)
        eye = torch.zeros(n, stop - start, dtype=dtype, device=op.device)
        eye[start + cols, cols] = 1
        total += float((op @ eye)[start + cols, cols].double().sum())
    return TraceResult(value=total, stderr=0.0, num_matvecs=n, method="exact")


def _exact_sharded(op: SymmetricOperator, n: int, chunk_size: int | None) -> TraceResult:
    """Sum of the diagonal from identity columns, for an operator with sharded vectors (no dense matrix)."""
    dtype = _float_dtype(op)
    shards = shards_of(op)
    chunk = chunk_size or default_chunk_size(local_rows(op), dtype)
    total = 0.0
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        eye = shards.unit_columns(start, stop, dtype)
        total += float(column_dots(op, eye, (op @ eye).to(dtype)).double().sum())
    return TraceResult(value=total, stderr=0.0, num_matvecs=n, method="exact")


def _hutchinson(op: SymmetricOperator, n: int, m: int, gen: torch.Generator, chunk: int) -> TraceResult:
    """Plain Hutchinson with ``m`` Rademacher probes."""
    dtype = _float_dtype(op)
    samples, frob = [], []
    for start in range(0, m, chunk):
        z = random_signs(op, n, min(chunk, m - start), gen, dtype, op.device)
        az = (op @ z).to(dtype)
        samples.append(column_dots(op, z, az).double())
        frob.append(column_dots(op, az.double(), az.double()))
    value, stderr = _mean_stderr(torch.cat(samples), torch.cat(frob))
    return TraceResult(value=value, stderr=stderr, num_matvecs=m, method="hutchinson")


def _orth(op: SymmetricOperator, y: Tensor) -> Tensor:
    """Orthonormal basis of the columns of ``y`` (reduced QR)."""
    return orthonormalize(op, y)[0]


def _hutchpp(op: SymmetricOperator, n: int, m: int, gen: torch.Generator, chunk: int) -> TraceResult:
    """Hutch++: sketch ``m // 3`` columns, exact trace on them, Hutchinson on the rest."""
    dtype = _float_dtype(op)
    sketch = min(m // 3, n)
    probes = m - 2 * sketch
    q = _orth(op, matmul_chunked(op, random_signs(op, n, sketch, gen, dtype, op.device), chunk))
    top = float(total(op, (q * matmul_chunked(op, q, chunk)).double()))
    used = 2 * sketch
    if sketch >= n or probes == 0:
        return TraceResult(value=top, stderr=0.0, num_matvecs=used, method="hutch++")
    samples, frob = [], []
    for start in range(0, probes, chunk):
        g = random_signs(op, n, min(chunk, probes - start), gen, dtype, op.device)
        g = g - q @ inner(op, q, g)
        ag = (op @ g).to(dtype)
        samples.append(column_dots(op, g, ag).double())
        rest = (ag - q @ inner(op, q, ag)).double()
        frob.append(column_dots(op, rest, rest))
    rest, stderr = _mean_stderr(torch.cat(samples), torch.cat(frob))
    return TraceResult(value=top + rest, stderr=stderr, num_matvecs=used + probes, method="hutch++")


def _xtrace_estimates(h: Tensor, r: Tensor, w: Tensor, omega_norm2: Tensor, n: int) -> Tensor:
    """The ``s`` exchangeable XTrace estimates from the small ``s x s`` matrices.

    Args:
        h: ``Q^T A Q`` (symmetric, float64).
        r: ``R`` of ``A Omega = Q R`` (float64, invertible).
        w: ``Q^T Omega`` (float64).
        omega_norm2: ``||omega_i||^2`` per probe (float64).
        n: The operator's size.

    Returns:
        ``[s]`` estimates; the i-th leaves probe ``i`` out of the sketch and uses it as the probe.
    """
    s = r.shape[0]
    eye = torch.eye(s, dtype=r.dtype, device=r.device)
    # Column i of R^{-T} is orthogonal to every column of R but the i-th: the direction the
    # leave-one-out basis lacks.
    lost = torch.linalg.solve_triangular(r.T, eye, upper=False)
    lost = lost / lost.norm(dim=0, keepdim=True)
    sw = (lost * w).sum(0)
    c = w - lost * sw  # coordinates of Q_i Q_i^T omega_i in Q
    top = torch.trace(h) - (lost * (h @ lost)).sum(0)
    x_a_x = (w * r).sum(0) - 2 * (c * r).sum(0) + (c * (h @ c)).sum(0)
    x_norm2 = (omega_norm2 - (c * w).sum(0)).clamp_min(torch.finfo(r.dtype).tiny)
    return top + (n - s + 1) * x_a_x / x_norm2


def _xtrace(op: SymmetricOperator, n: int, m: int, gen: torch.Generator, chunk: int) -> TraceResult:
    """XTrace with ``m // 2`` Gaussian probes (Epperly, Tropp, Webber 2024, normalized variant)."""
    dtype = _float_dtype(op)
    s = min(m // 2, n)
    omega = random_normal(op, n, s, gen, dtype, op.device)
    q, r = orthonormalize(op, matmul_chunked(op, omega, chunk))
    h = inner(op, q, matmul_chunked(op, q, chunk)).double()
    h = 0.5 * (h + h.T)
    r = r.double()
    w = inner(op, q, omega).double()
    omega_norm2 = column_dots(op, omega.double(), omega.double())
    diag = r.diagonal().abs()
    eps = torch.finfo(dtype).eps
    if s >= n or bool((diag <= 100 * eps * diag.max()).any()):
        estimates = _xtrace_low_rank(h, r, w, omega_norm2, n, eps)
        stderr = float(estimates.std(unbiased=True)) / math.sqrt(s) if s >= 2 else 0.0
    else:
        estimates = _xtrace_estimates(h, r, w, omega_norm2, n)
        stderr = _xtrace_jackknife(h, r, w, omega_norm2, n)
    return TraceResult(value=float(estimates.mean()), stderr=stderr, num_matvecs=2 * s, method="xtrace")


def _xtrace_jackknife(h: Tensor, r: Tensor, w: Tensor, omega_norm2: Tensor, n: int) -> float:
    """Jackknife standard error of XTrace over its probes (delete-a-group, at most JACKKNIFE_GROUPS).

    The ``s`` exchangeable estimates share their sketches, so their spread understates the error of
    their mean. XTrace is a symmetric function of i.i.d. probes, so the jackknife applies: each
    replicate reruns XTrace without one group of probes, from the same small matrices
    (``A Omega = Q R`` keeps every reduced sketch inside ``range(Q)``). The jackknife variance is
    biased upward (Efron-Stein); with very few probes it can understate the error, like every error
    estimate from so few samples. See NOTE [XTrace standard error calibration].
    """
    # NOTE [XTrace standard error calibration]
    # Measured on the estimators benchmark's MLP (2,685 parameters) over 200 seeds: the spread of the
    # exchangeable estimates understated the error of their mean 1.4x at 99 products (RMS of
    # (estimate - true) / stderr = 1.43); the jackknife gives 0.46-0.75, i.e. it overstates the error
    # 1.3x-2.2x from 15 probes (30 products) on, and understates it 1.5x at 5 probes (far more at 2).
    # tests/test_trace.py checks the calibration of every estimator across seeds.
    s = r.shape[0]
    groups = torch.arange(s, device=r.device).tensor_split(min(s, JACKKNIFE_GROUPS))
    replicates = []
    for group in groups:
        keep = torch.ones(s, dtype=torch.bool, device=r.device)
        keep[group] = False
        u, r_kept = torch.linalg.qr(r[:, keep])
        estimates = _xtrace_estimates(u.T @ h @ u, r_kept, u.T @ w[:, keep], omega_norm2[keep], n)
        replicates.append(estimates.mean())
    reps = torch.stack(replicates)
    g = reps.numel()
    return math.sqrt((g - 1) / g * float((reps - reps.mean()).pow(2).sum()))


def _xtrace_low_rank(h: Tensor, r: Tensor, w: Tensor, omega_norm2: Tensor, n: int, eps: float) -> Tensor:
    """XTrace fallback when ``A Omega`` is numerically rank deficient (``rank(A) < s``).

    The sketch then captures the range of ``A``: the estimates use the numerical range of ``R``
    (shared by all probes) plus the scaled remainder of each probe, which is ~0.
    """
    u, sigma, _ = torch.linalg.svd(r)
    keep = sigma > 100 * eps * sigma.max()
    u = u[:, keep]
    rank = u.shape[1]
    top = torch.trace(u.T @ h @ u)
    if rank >= n:
        return top.expand(r.shape[0]).clone()
    c = u @ (u.T @ w)
    x_a_x = (w * r).sum(0) - 2 * (c * r).sum(0) + (c * (h @ c)).sum(0)
    x_norm2 = (omega_norm2 - (c * w).sum(0)).clamp_min(torch.finfo(r.dtype).tiny)
    return top + (n - rank) * x_a_x / x_norm2


def trace(
    op: SymmetricOperator,
    method: str = "hutch++",
    num_matvecs: int = 99,
    *,
    seed: int = 0,
    chunk_size: int | None = None,
) -> TraceResult:
    """The trace of a symmetric operator, exact or estimated with a fixed budget of products.

    See the module docstring for the methods. The stochastic methods spend exactly their budget
    (``"hutch++"`` uses ``3 * (num_matvecs // 3)`` plus the remainder as extra probes,
    ``"xtrace"`` an even number) and always report a standard error.

    Args:
        op: Symmetric operator with ``shape (N, N)``, ``dtype``, ``device`` and ``op @ V``.
        method: ``"exact"``, ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"``.
        num_matvecs: Product budget of the stochastic methods (ignored by ``"exact"``, which needs
            ``N``). At least 1 for ``"hutchinson"``, 3 for ``"hutch++"`` and 4 for ``"xtrace"``.
        seed: Seed of the private random generator for the probes.
        chunk_size: Most columns per product (bounds memory); default keeps a block under 256 MiB.

    Returns:
        A :class:`~lightning_hessian.results.TraceResult` with ``value``, ``stderr`` (0.0 when
        exact), ``num_matvecs`` and ``method``.

    Raises:
        TypeError: If ``op`` is not an operator or an integer argument is not an integer.
        ValueError: If ``op`` is not square, ``method`` is unknown or ``num_matvecs`` is too small.

    Example:
        >>> from lightning_hessian.linear_operator import MatrixOperator
        >>> op = MatrixOperator(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)))
        >>> trace(op, method="exact").value
        55.0
        >>> estimate = trace(op, method="hutch++", num_matvecs=30, seed=0)
        >>> round(estimate.value, 6), estimate.stderr
        (55.0, 0.0)
    """
    n = operator_size(op)
    check_choice("method", method, METHODS)
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size, 1, "Or pass None for the default.")
    gen = make_generator(op.device, seed)
    if method == "exact":
        return _exact(op, n, chunk_size)
    least = MIN_MATVECS[method]
    m = check_int(
        "num_matvecs",
        num_matvecs,
        least,
        f"method={method!r} needs at least {least} products; raise `num_matvecs`.",
    )
    chunk = chunk_size or default_chunk_size(n, _float_dtype(op))
    if method == "hutchinson":
        return _hutchinson(op, n, m, gen, chunk)
    if method == "hutch++":
        return _hutchpp(op, n, m, gen, chunk)
    return _xtrace(op, n, m, gen, chunk)
