"""One call that measures the curvature of every block of a model's Hessian: :func:`analyze`.

The module is about 500 lines for one job, one analysis: the two entry points' argument
documentation (about 100 lines) and the per-block paths (dense, zero, shared space, separate
estimators, shared-probe traces) that differ too much to split without passing the whole state.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .batches import BatchSizeFn
from .closure import LossFn
from .contractions import local_rows
from .dense import agreed_dense_check, dense_from_operator
from .density import spectral_density
from .dynamics import block_dynamics, wants_eigenvectors
from .errors import NonFiniteHessianError
from .lanczos import eigenvalues
from .operator import HessianOperator
from .parameters import BlocksSpec, Patterns, resolve_blocks
from .probes import make_generator, rademacher
from .results import BlockReport, EigenResult, HessianReport, SpectralDensity, TraceResult
from .settings import AnalysisSettings
from .sharded import ShardedHessianOperator
from .shards import has_sharded_parameters
from .shared_space import MIN_DENSITY_STEPS, shared_space_estimates
from .trace import trace as estimate_trace
from .validation import check_callable

Progress = Callable[[int, int], None]


class _CountingOperator:
    """Forwards products to an operator and reports each to a progress callback."""

    def __init__(self, op: HessianOperator, tracker: _Progress) -> None:
        self.op, self.tracker = op, tracker

    shape = property(lambda self: self.op.shape)
    dtype = property(lambda self: self.op.dtype)
    device = property(lambda self: self.op.device)
    shards = property(lambda self: getattr(self.op, "shards", None))  # sharded vectors, if any

    def __matmul__(self, other: Tensor) -> Tensor:
        out = self.op @ other
        self.tracker.advance(1 if other.ndim == 1 else other.shape[1])
        return out


class _Progress:
    def __init__(self, callback: Progress | None, planned: int) -> None:
        self.callback, self.done, self.planned = callback, 0, planned

    def advance(self, count: int) -> None:
        self.done += count
        self.planned = max(self.planned, self.done)
        if self.callback is not None:
            self.callback(self.done, self.planned)


def _exact_eigen(values: Tensor, which: str, k: int) -> EigenResult:
    picked = values.flip(0)[:k] if which == "largest" else values[:k]
    return EigenResult(
        values=picked,
        vectors=None,
        converged=torch.ones(picked.shape[0], dtype=torch.bool),
        residuals=torch.zeros(picked.shape[0], dtype=torch.float64),
        num_matvecs=0,
        which=which,
        tol=0.0,
    )


def _dense_block(name: str, op: HessianOperator, settings: AnalysisSettings) -> BlockReport:
    matrix = dense_from_operator(op)
    if settings.eigenvectors:
        spectrum, basis = torch.linalg.eigh(matrix.to(torch.float64))
        spectrum = spectrum.cpu()
    else:
        spectrum, basis = torch.linalg.eigvalsh(matrix.to(torch.float64)).cpu(), None
    n = spectrum.shape[0]
    report = BlockReport(name=name, size=n, method="dense", spectrum=spectrum, num_matvecs=n)
    if settings.top_k:
        k = min(settings.top_k, n)
        report.eigenvalues = _exact_eigen(spectrum, "largest", k)
        if basis is not None:
            report.eigenvalues.vectors = basis[:, n - k :].flip(1).to(op.dtype)
    if settings.min_eigenvalue:
        report.min_eigenvalue = _exact_eigen(spectrum, "smallest", 1)
    if settings.trace:
        report.trace = TraceResult(float(matrix.diagonal().sum()), 0.0, n, "exact")
    if settings.density:
        weights = torch.full((n,), 1.0 / n, dtype=torch.float64)
        report.density = SpectralDensity(spectrum, weights, num_matvecs=0, num_probes=0, exact=True)
    return report


def _zero_block(name: str, n: int, settings: AnalysisSettings) -> BlockReport:
    """The exact report of a block whose Hessian is zero (the loss does not use its parameters)."""
    report = BlockReport(name=name, size=n, method="zero")
    zero = torch.zeros(1, dtype=torch.float64)
    if settings.top_k:
        report.eigenvalues = _exact_eigen(
            torch.zeros(min(settings.top_k, n), dtype=torch.float64), "largest", n
        )
    if settings.min_eigenvalue:
        report.min_eigenvalue = _exact_eigen(zero, "smallest", 1)
    if settings.trace:
        report.trace = TraceResult(0.0, 0.0, 0, "exact")
    if settings.density:
        report.density = SpectralDensity(zero, torch.ones(1, dtype=torch.float64), num_matvecs=0, exact=True)
    return report


def _shared_block(
    name: str, op: _CountingOperator, settings: AnalysisSettings, start_vectors: Tensor | None
) -> BlockReport:
    """Every quantity of an iterative block from one block Krylov space (``krylov="shared"``)."""
    n = op.shape[0]
    shared = shared_space_estimates(
        op,
        top_k=min(settings.top_k, n),
        min_eigenvalue=settings.min_eigenvalue,
        density=settings.density,
        trace=settings.trace,
        tol=settings.tol,
        num_probes=min(settings.density_probes, n),
        min_steps=min(MIN_DENSITY_STEPS, settings.density_steps) if settings.density else 1,
        max_steps=settings.density_steps,
        trace_probes=settings.trace_matvecs,
        seed=settings.seed,
        start_vectors=start_vectors
        if start_vectors is not None and start_vectors.shape[0] == local_rows(op)
        else None,
        keep_vectors=settings.keep_vectors,
        return_vectors=settings.eigenvectors,
    )
    return BlockReport(
        name=name,
        size=n,
        method="iterative",
        eigenvalues=shared.eigenvalues,
        min_eigenvalue=shared.min_eigenvalue,
        trace=shared.trace,
        density=shared.density,
        num_matvecs=shared.num_matvecs,
        ritz_vectors=shared.vectors,
    )


def _iterative_block(
    name: str, op: _CountingOperator, settings: AnalysisSettings, shared_trace: bool
) -> BlockReport:
    n = op.shape[0]
    report = BlockReport(name=name, size=n, method="iterative")
    seed, tol, budget = settings.seed, settings.tol, settings.max_matvecs
    if settings.top_k:
        report.eigenvalues = eigenvalues(
            op,
            min(settings.top_k, n),
            "largest",
            tol=tol,
            max_matvecs=budget,
            seed=seed,
            return_vectors=settings.eigenvectors,
        )
        report.num_matvecs += report.eigenvalues.num_matvecs
    if settings.min_eigenvalue:
        report.min_eigenvalue = eigenvalues(op, 1, "smallest", tol=tol, max_matvecs=budget, seed=seed)
        report.num_matvecs += report.min_eigenvalue.num_matvecs
    if settings.trace and not shared_trace:
        report.trace = estimate_trace(op, settings.trace_method, settings.trace_matvecs, seed=seed)
        report.num_matvecs += report.trace.num_matvecs
    if settings.density:
        steps = min(settings.density_steps, n)
        report.density = spectral_density(op, num_probes=settings.density_probes, num_steps=steps, seed=seed)
        report.num_matvecs += report.density.num_matvecs
    return report


def _shared_block_traces(
    op: _CountingOperator,
    groups: dict[str, tuple[str, ...]],
    space_slices: dict[str, slice],
    m: int,
    seed: int,
) -> dict[str, TraceResult]:
    """Hutchinson traces of every diagonal block from one set of probes of the full operator.

    For a Rademacher ``z``, ``E[z_B^T (H z)_B] = tr(H_BB)``: the same products serve every block.
    """
    n = op.shape[0]
    probes = rademacher(n, m, make_generator(op.device, seed), op.dtype, op.device)
    products = op @ probes
    samples = probes * products  # [N, m]: per-coordinate samples of the diagonal
    out = {}
    for name, names in groups.items():
        index = torch.cat([torch.arange(space_slices[p].start, space_slices[p].stop) for p in names])
        block_samples = samples[index.to(samples.device)].sum(0).to(torch.float64)
        stderr = float(block_samples.std(unbiased=True)) / math.sqrt(m) if m > 1 else float("nan")
        out[name] = TraceResult(float(block_samples.mean()), stderr, m, "hutchinson (shared probes)")
    return out


def analyze(
    model: nn.Module,
    loss_fn: LossFn | None = None,
    data: Iterable[Any] | None = None,
    *,
    params: Patterns = None,
    blocks: BlocksSpec = None,
    top_k: int = 3,
    min_eigenvalue: bool = True,
    trace: bool = True,
    density: bool = True,
    method: str = "auto",
    dense_limit: int = 1024,
    mode: str = "eval",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    batch_size_fn: BatchSizeFn | None = None,
    tol: float = 1e-4,
    max_matvecs: int | None = None,
    trace_method: str = "hutch++",
    trace_matvecs: int = 99,
    density_probes: int = 4,
    density_steps: int = 32,
    eigenvectors: bool = False,
    hvp: str = "auto",
    reduction: str = "mean",
    krylov: str = "separate",
    keep_vectors: int = 0,
    gradient_geometry: bool = False,
    landscape: bool = False,
    landscape_points: int = 21,
    optimizer: torch.optim.Optimizer | None = None,
    process_group: Any = "auto",
    progress: Progress | None = None,
) -> HessianReport:
    """Measure the curvature of every diagonal block of the Hessian in one call.

    Blocks of at most ``dense_limit`` parameters (``method="auto"``) are computed exactly from their
    dense matrix: exact eigenvalues, trace and spectrum. Larger blocks use Hessian-vector products:
    Lanczos for the top ``top_k`` and the smallest eigenvalue (with convergence flags), a stochastic
    trace with its standard error, and stochastic Lanczos quadrature for the density. With several
    iterative blocks, their traces come from one set of Hutchinson probes of the full operator.

    Args:
        model: Any ``nn.Module``; never modified.
        loss_fn: ``loss_fn(module, batch) -> scalar``; ``None`` uses a LightningModule's
            ``training_step``.
        data: Iterable of batches.
        params: Glob pattern(s) on parameter names; default all trainable parameters.
        blocks: ``None``/``"model"``, ``"module"``, ``"parameter"`` or ``{name: patterns}``.
        top_k: Number of top eigenvalues per block (0 to skip).
        min_eigenvalue: Also compute the smallest eigenvalue.
        trace: Compute the trace.
        density: Compute the eigenvalue density.
        method: ``"auto"``, ``"dense"`` (every block exactly) or ``"iterative"``. For a sharded model
            (FSDP2, see :class:`~lightning_hessian.sharded.ShardedHessianOperator`) ``"auto"`` estimates
            every block iteratively and ``"dense"`` is refused.
        dense_limit: Largest block computed densely under ``"auto"``.
        mode: ``"eval"`` or ``"train"``.
        dtype: Compute dtype, e.g. ``torch.float64`` (float32 rounding: see NOTE [Float32 Hessians] in
            :mod:`lightning_hessian.exact`).
        seed: Seed of every random probe.
        batch_size_fn: ``batch -> number of samples``.
        tol: Relative residual tolerance of the eigenvalues.
        max_matvecs: Product budget per eigenvalue search (default: the estimator's).
        trace_method: ``"hutch++"``, ``"xtrace"``, ``"hutchinson"`` or ``"exact"``.
        trace_matvecs: Products per stochastic trace.
        density_probes: Random probes of the density.
        density_steps: Block Lanczos steps of the density (``density_probes`` products each).
        eigenvectors: Also return the top eigenvectors (in ``eigenvalues.vectors``).
        hvp: Hessian-vector product method (see :class:`HessianOperator`).
        reduction: ``"mean"``: the size-weighted mean of batch losses; ``"sum"``: their plain sum (for a
            ``loss_fn`` with ``reduction="sum"``).
        krylov: ``"separate"``: each quantity of an iterative block from its own estimator (Lanczos
            per end of the spectrum, ``trace_method``, SLQ); ``"shared"``: all from one block Krylov
            space (:mod:`lightning_hessian.shared_space`): ``density_probes`` probes, at most
            ``density_steps`` steps, ``trace_matvecs`` remainder probes, far fewer products.
        keep_vectors: Top Ritz vectors each iterative block keeps (``krylov="shared"``), for a warm
            start of the next analysis (``analyze_with(..., start_vectors=...)``).
        gradient_geometry: Also measure each block's gradient alignment with its top-``k``
            eigenspace, curvature along the gradient and batch sharpness
            (:func:`lightning_hessian.geometry.gradient_geometry`; about two products).
        landscape: Also measure the loss along each block's top two eigenvectors and its gradient
            (:func:`lightning_hessian.landscape.loss_landscape`; forward passes).
        landscape_points: Points per landscape direction.
        optimizer: The optimizer training the model: each block gets its
            :func:`lightning_hessian.stability` (free for SGD with one learning rate per block).
        process_group: See :class:`HessianOperator`.
        progress: ``progress(done, planned)``, called as products complete.

    Returns:
        A :class:`~lightning_hessian.results.HessianReport`. Where a training-dynamics quantity needs
        them, the blocks' ``eigenvalues.vectors`` hold the top eigenvectors.

    Raises:
        ValueError: For bad arguments, before any product.
        TypeError: For arguments of the wrong type.
        HessianTooLargeError: If ``method="dense"`` is asked for blocks that do not fit in memory.
        NonFiniteHessianError: If the loss or a product is not finite (on any rank).

    Example:
        >>> report = analyze(model, loss_fn, [(x, y)], blocks="module", top_k=2)
        >>> report.scalars()["hessian/model/eigenvalue_1"]  # doctest: +SKIP
    """
    settings = AnalysisSettings(
        params=params,
        blocks=blocks,
        top_k=top_k,
        min_eigenvalue=min_eigenvalue,
        trace=trace,
        density=density,
        method=method,
        dense_limit=dense_limit,
        mode=mode,
        dtype=dtype,
        seed=seed,
        batch_size_fn=batch_size_fn,
        tol=tol,
        max_matvecs=max_matvecs,
        trace_method=trace_method,
        trace_matvecs=trace_matvecs,
        density_probes=density_probes,
        density_steps=density_steps,
        eigenvectors=eigenvectors,
        hvp=hvp,
        reduction=reduction,
        krylov=krylov,
        keep_vectors=keep_vectors,
        gradient_geometry=gradient_geometry,
        landscape=landscape,
        landscape_points=landscape_points,
    )
    return analyze_with(
        model, loss_fn, data, settings, process_group=process_group, progress=progress, optimizer=optimizer
    )


def analyze_with(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: Iterable[Any] | None,
    settings: AnalysisSettings,
    *,
    process_group: Any = "auto",
    progress: Progress | None = None,
    start_vectors: Mapping[str, Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    previous_vectors: Mapping[str, Tensor] | None = None,
) -> HessianReport:
    """:func:`analyze` with its settings given as one :class:`AnalysisSettings` object.

    Args:
        model: Any ``nn.Module``; never modified.
        loss_fn: ``loss_fn(module, batch) -> scalar``; ``None`` uses a LightningModule's ``training_step``.
        data: Iterable of batches.
        settings: What to measure and how.
        process_group: See :class:`HessianOperator`.
        progress: ``progress(done, planned)``, called as products complete.
        start_vectors: Warm-start vectors by block name (``krylov="shared"``), e.g. the previous
            evaluation's ``report.blocks[name].ritz_vectors``; ignored where the size differs.
        optimizer: The optimizer whose :func:`lightning_hessian.stability` each block reports.
        previous_vectors: The previous evaluation's top eigenvectors by block name (its
            ``report.blocks[name].eigenvalues.vectors``): each block then reports its
            ``eigenvector_overlap`` with them.

    Returns:
        A :class:`~lightning_hessian.results.HessianReport`.

    Raises:
        TypeError: If ``progress`` is not callable.
        HessianTooLargeError: If ``method="dense"`` is asked for blocks that do not fit in memory.
        NonFiniteHessianError: If the loss or a product is not finite (on any rank).

    Example:
        >>> report = analyze_with(model, loss_fn, [(x, y)], AnalysisSettings(top_k=2))  # doctest: +SKIP
    """
    if progress is not None:
        check_callable("progress", progress, "progress(done, planned)")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"`optimizer` must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}."
        )
    if wants_eigenvectors(settings, previous_vectors) and not settings.eigenvectors:
        settings = dataclasses.replace(settings, eigenvectors=True)
    started = time.perf_counter()
    sharded = has_sharded_parameters(model)
    if sharded and settings.method == "dense":
        raise ValueError(
            "`method='dense'` is refused for a sharded model (FSDP2): a dense Hessian is an N x N matrix "
            "on every rank. Use method='auto' or 'iterative' (for small blocks the iterative estimates "
            "span the whole block and are exact to the products' accuracy)."
        )
    op = (ShardedHessianOperator if sharded else HessianOperator)(
        model,
        loss_fn,
        data,
        params=settings.params,
        mode=settings.mode,
        dtype=settings.dtype,
        batch_size_fn=settings.batch_size_fn,
        hvp=settings.hvp,
        process_group=process_group,
        reduction=settings.reduction,
    )
    groups = resolve_blocks(op.space.names, settings.blocks)
    sizes = {name: op.space.subspace(names).numel for name, names in groups.items()}
    dense = {
        name
        for name, n in sizes.items()
        if not sharded
        and (settings.method == "dense" or (settings.method == "auto" and n <= settings.dense_limit))
    }
    if settings.method == "dense":
        agreed_dense_check(op, sizes.values())
    iterative = [name for name in groups if name not in dense]
    shared_trace = (
        settings.trace
        and len(iterative) > 1
        and settings.trace_method != "exact"
        and settings.krylov == "separate"
        and not sharded  # each sharded block estimates its own trace
    )
    tracker = _Progress(progress, _planned_products(sizes, dense, settings))
    with op.closure.held():  # the module's state is saved once, not around every product
        report = HessianReport(loss=op.loss(), num_samples=op.num_samples)
        if not math.isfinite(report.loss):
            raise NonFiniteHessianError(
                f"The loss at which the Hessian is taken is {report.loss} (over all ranks); no curvature "
                "can be computed there."
            )
        single = len(groups) == 1
        for name, names in groups.items():
            block_start = time.perf_counter()
            block_op = op if single else op.restrict(names)
            if not block_op.depends_on_parameters:
                block = _zero_block(name, block_op.shape[0], settings)
                warnings.warn(
                    f"The loss does not depend on the parameters of block {name!r} ({', '.join(names[:4])}"
                    f"{' ...' if len(names) > 4 else ''}): its Hessian is zero, and the other blocks are "
                    "evaluated as usual.",
                    UserWarning,
                    stacklevel=2,
                )
            elif name in dense:
                block = _dense_block(name, block_op, settings)
                tracker.advance(block.size)
            else:
                counting = _CountingOperator(block_op, tracker)
                if settings.krylov == "shared":
                    block = _shared_block(name, counting, settings, (start_vectors or {}).get(name))
                else:
                    block = _iterative_block(name, counting, settings, shared_trace)
            if block.method != "zero":
                previous = (previous_vectors or {}).get(name)
                spent = int(round(block_dynamics(block, block_op, settings, optimizer, previous)))
                if spent:
                    tracker.advance(spent)
            if not single:
                block_op.release_graphs()
            block.seconds = time.perf_counter() - block_start
            block.hvp = None if block.method == "zero" else block_op.choice.vector
            report.blocks[name] = block
        sharing = [name for name in iterative if report.blocks[name].method == "iterative"]
        if shared_trace and sharing:
            share_start = time.perf_counter()
            traces = _shared_block_traces(
                _CountingOperator(op, tracker),
                {k: groups[k] for k in sharing},
                op.space.slices(),
                settings.trace_matvecs,
                settings.seed,
            )
            share_seconds = (time.perf_counter() - share_start) / len(sharing)
            for name, result in traces.items():
                report.blocks[name].trace = result
                report.blocks[name].num_matvecs += settings.trace_matvecs / len(sharing)
                report.blocks[name].seconds += share_seconds
    for block in report.blocks.values():
        block.num_matvecs = int(round(block.num_matvecs))
    report.num_matvecs = tracker.done
    report.seconds = time.perf_counter() - started
    return report


def _planned_products(sizes: dict[str, int], dense: set[str], settings: AnalysisSettings) -> int:
    """Products the analysis expects to use (eigenvalue searches usually stop well before budget)."""
    planned = 0
    for name, n in sizes.items():
        if name in dense:
            planned += n
            continue
        if settings.krylov == "shared":
            planned += (
                min(n, settings.density_probes * settings.density_steps)
                + settings.trace_matvecs * settings.trace
            )
            continue
        search = min(n, settings.max_matvecs or 100)
        planned += search * (bool(settings.top_k) + bool(settings.min_eigenvalue))
        planned += settings.trace_matvecs * settings.trace
        planned += settings.density_probes * min(settings.density_steps, n) * settings.density
    return planned
