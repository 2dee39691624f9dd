"""Plain-data results of the estimators and of :func:`lightning_hessian.analyze`.

Every result holds tensors and numbers only, so it can be compared in tests and logged without
touching the model again. A :class:`HessianReport` is saved as plain data (:meth:`HessianReport.save`:
nested dicts of tensors, numbers and strings) that ``torch.load(path, weights_only=True)`` reads
without unpickling any class, and :meth:`HessianReport.load` rebuilds the dataclasses from it.

About 600 lines, 260 of them docstrings: every result dataclass of the library and the one
plain-data save/load format that rebuilds all of them, which must stay together to check each field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import pickle
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

#: The ``"format"`` entry of a saved report, and the version of its layout.
REPORT_FORMAT = "lightning_hessian.HessianReport"
REPORT_VERSION = 2  # 2: training-dynamics fields of BlockReport (files of version 1 still load)


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
class StabilityResult:
    """How far the optimizer, frozen at its state, is from diverging on the local quadratic model.

    See :func:`lightning_hessian.stability` for the derivation of each optimizer's threshold.

    Attributes:
        value: ``eigenvalue / threshold``: above 1 the frozen optimizer diverges.
        eigenvalue: The largest eigenvalue of ``D^½ (H + W) D^½`` (``D`` the step sizes, ``W`` the
            coupled weight decay): the "preconditioned sharpness" in units of steps.
        threshold: That eigenvalue at the edge (2 for plain SGD, ``2 + 2β`` with momentum ``β``,
            ``(2 + 2β1) / (1 - β1)`` for Adam).
        optimizer: The optimizer's class name.
        adaptive: Whether ``D`` comes from the optimizer's second-moment state.
        converged: Whether the eigenvalue met its tolerance.
        num_matvecs: Hessian-vector products used (0 when read from the block's top eigenvalue).
    """

    value: float
    eigenvalue: float
    threshold: float
    optimizer: str
    adaptive: bool
    converged: bool
    num_matvecs: int


@dataclass
class GradientGeometry:
    """Where the gradient points relative to the curvature.

    Attributes:
        gradient_norm: ``||g||`` of the loss over all batches.
        alignment: ``||V_kᵀ g||² / ||g||²``, the share of the gradient in the top-``k`` eigenspace
            (``None`` without eigenvectors).
        curvature: ``gᵀ H g / gᵀ g``, the curvature along the gradient.
        batch_sharpness: The mean over batches ``b`` of ``g_bᵀ H_b g_b / ||g_b||²``.
        num_batches: Batches the batch sharpness averages over (all ranks).
        num_matvecs: Products used, counting a product over one batch as ``1 / batches``.
    """

    gradient_norm: float
    alignment: float | None
    curvature: float
    batch_sharpness: float
    num_batches: int
    num_matvecs: float


@dataclass
class Landscape:
    """The loss along a few unit directions through the current parameters.

    Attributes:
        offsets: ``[P]`` step lengths ``t``, symmetric around 0, per direction (rows of ``losses``).
        losses: ``{direction: [P] losses at θ + t·d}``.
        curvatures: ``{direction: dᵀ H d}``, the quadratic model ``L(θ) + ½ curvature t²`` (plus
            ``t·gᵀd`` for directions not orthogonal to the gradient, see ``slopes``).
        slopes: ``{direction: gᵀ d}``.
        loss: The loss at the current parameters.
        num_forward: Loss evaluations used (each over all batches).
    """

    offsets: dict[str, Tensor]
    losses: dict[str, Tensor]
    curvatures: dict[str, float]
    slopes: dict[str, float]
    loss: float
    num_forward: int

    def quadratic_model(self, direction: str) -> Tensor:
        """``L(θ) + slope·t + ½ curvature·t²`` at this direction's offsets."""
        t = self.offsets[direction].to(torch.float64)
        return self.loss + self.slopes[direction] * t + 0.5 * self.curvatures[direction] * t**2


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
        stability: The optimizer's distance from its edge of stability on this block, or ``None``.
        gradient_geometry: Gradient alignment, curvature along the gradient and batch sharpness, or
            ``None``.
        eigenvector_overlap: ``||V_prevᵀ V_now||_F² / k`` against the previous evaluation's top-``k``
            eigenvectors, in ``[0, 1]``, or ``None`` (first evaluation, or the vectors were dropped).
        landscape: The loss along the top eigenvectors and the gradient, or ``None``.
        hvp: The Hessian-vector product method the block's products used: ``"reverse-over-reverse"``
            or ``"forward-over-reverse"`` (exact), ``"finite-difference"`` or
            ``"finite-difference-richardson"`` (gradient differences, a few digits less); ``None``
            for a ``"zero"`` block (no products).
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
    stability: StabilityResult | None = None
    gradient_geometry: GradientGeometry | None = None
    eigenvector_overlap: float | None = None
    landscape: Landscape | None = None
    hvp: str | None = None


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
        """Sorted names of the loss and logged scalars that are NaN or infinite (empty: all finite).

        A ``trace_stderr`` is not checked: it is NaN when the estimator had a single sample, which
        leaves the uncertainty unknown but the curvature itself valid.
        """
        values = {"loss": self.loss, **self.scalars()}
        return sorted(
            name
            for name, value in values.items()
            if not math.isfinite(value) and not name.endswith("/trace_stderr")
        )

    def scalars(self, prefix: str = "hessian") -> dict[str, float]:
        """Flatten the report into the logged scalar names of the design contract.

        Args:
            prefix: Leading name component.

        Returns:
            For every block ``B``, in this order and only for the metrics it has:
            ``{prefix}/B/trace`` and ``{prefix}/B/trace_stderr`` (its standard error, ``0.0`` when
            exact), ``{prefix}/B/eigenvalue_1`` ... ``eigenvalue_k``, ``{prefix}/B/eigenvalue_min``,
            and ``{prefix}/B/eigenvalues_converged``: the fraction of those eigenvalues (top-k and the
            smallest) whose residual met the tolerance, ``1.0`` for a dense (exact) block; then the
            training dynamics: ``{prefix}/B/stability``, ``{prefix}/B/preconditioned_eigenvalue_1``
            (adaptive optimizers), ``{prefix}/B/gradient_alignment`` (with eigenvectors),
            ``{prefix}/B/gradient_curvature``, ``{prefix}/B/batch_sharpness`` and
            ``{prefix}/B/eigenvector_overlap``.

        Example:
            >>> import torch
            >>> flags = torch.tensor([True, False])
            >>> top = EigenResult(torch.tensor([3.0, 2.0]), None, flags, torch.zeros(2), 9)
            >>> block = BlockReport("fc", 10, "iterative", eigenvalues=top)
            >>> scalars = HessianReport(blocks={"fc": block}).scalars()
            >>> list(scalars), scalars["hessian/fc/eigenvalues_converged"]
            (['hessian/fc/eigenvalue_1', 'hessian/fc/eigenvalue_2', 'hessian/fc/eigenvalues_converged'], 0.5)
        """
        out: dict[str, float] = {}
        for name, block in self.blocks.items():
            if block.trace is not None:
                out[f"{prefix}/{name}/trace"] = float(block.trace.value)
                out[f"{prefix}/{name}/trace_stderr"] = float(block.trace.stderr)
            flags: list[bool] = []
            if block.eigenvalues is not None:
                for i, value in enumerate(block.eigenvalues.values.tolist(), start=1):
                    out[f"{prefix}/{name}/eigenvalue_{i}"] = float(value)
                flags += [bool(f) for f in block.eigenvalues.converged.reshape(-1).tolist()]
            if block.min_eigenvalue is not None:
                out[f"{prefix}/{name}/eigenvalue_min"] = float(block.min_eigenvalue.values[0])
                flags += [bool(f) for f in block.min_eigenvalue.converged.reshape(-1)[:1].tolist()]
            if flags:
                converged = 1.0 if block.method == "dense" else sum(flags) / len(flags)
                out[f"{prefix}/{name}/eigenvalues_converged"] = float(converged)
            out.update(_dynamics_scalars(f"{prefix}/{name}", block))
        return out

    # ------------------------------------------------------------------------------ saved form
    def to_dict(self) -> dict[str, Any]:
        """The report as plain data: nested dicts of CPU tensors, numbers, strings and ``None``.

        ``torch.save`` writes it in a form that ``torch.load(path, weights_only=True)`` reads back
        without unpickling any class; :meth:`from_dict` rebuilds the report.

        Returns:
            ``{"format": "lightning_hessian.HessianReport", "version": 1, "blocks": {name: {...}},
            "loss": ..., ...}``: every dataclass as a dict of its fields.

        Example:
            >>> report = HessianReport(loss=0.5)
            >>> data = report.to_dict()
            >>> data["format"], data["loss"], HessianReport.from_dict(data) == report
            ('lightning_hessian.HessianReport', 0.5, True)
        """
        return {"format": REPORT_FORMAT, "version": REPORT_VERSION, **_plain(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HessianReport:
        """Rebuild a report from :meth:`to_dict`'s plain data, checking every field's type.

        Args:
            data: The output of :meth:`to_dict` (for example as loaded from a saved report).

        Returns:
            The report, with its :class:`BlockReport`, :class:`EigenResult`, :class:`TraceResult`
            and :class:`SpectralDensity` parts.

        Raises:
            ValueError: If ``data`` is not a saved report of a layout this version reads, or a field
                is missing, unknown or of the wrong type (named with its path).

        Example:
            >>> HessianReport.from_dict(HessianReport(loss=0.5).to_dict()).loss
            0.5
        """
        if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
            found = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(
                f"Not a saved HessianReport: expected a dict with format={REPORT_FORMAT!r}, got {found}. "
                "Save reports with HessianReport.save or HessianReport.to_dict."
            )
        version = data.get("version")
        if not isinstance(version, int) or not 1 <= version <= REPORT_VERSION:
            raise ValueError(
                f"Saved HessianReport layout version {version!r} is not one this lightning_hessian reads "
                f"(1 to {REPORT_VERSION}); read it with the release that wrote it."
            )
        fields = {k: v for k, v in data.items() if k not in ("format", "version")}
        return _build(cls, fields, "report")

    def save(self, path: str | Path) -> Path:
        """Save the report as plain data (:meth:`to_dict`) with ``torch.save``, creating parent folders.

        Args:
            path: Target file.

        Returns:
            The path written.

        Example:
            >>> report.save("report.pt")  # doctest: +SKIP
            >>> HessianReport.load("report.pt").scalars() == report.scalars()  # doctest: +SKIP
            True
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.to_dict(), path)
        return path

    @classmethod
    def load(cls, path: str | Path, *, trusted: bool = False, map_location: Any = "cpu") -> HessianReport:
        """Read a saved report without running code from the file.

        The file is read with ``torch.load(..., weights_only=True)``, PyTorch's restricted unpickler,
        which builds tensors and plain data only. Reports saved before the plain-data format are
        pickled report dataclasses: the restricted unpickler also builds those five classes (from their
        fields alone, running none of their code), so they load too. A file that needs any other class
        is refused unless ``trusted=True``: then it is fully unpickled, with a warning, because
        unpickling can run arbitrary code from the file. That choice has to be made before loading (a
        warning afterwards would come after the code ran), hence the argument.

        Args:
            path: A file written by :meth:`save` (or by ``save_reports=True`` of the callback).
            trusted: Fully unpickle a file the restricted loader refuses. Only for files from a
                source you trust as you would trust running its code.
            map_location: Where tensors are loaded (``torch.load``'s argument).

        Returns:
            The report.

        Raises:
            pickle.UnpicklingError: If the file holds classes other than the report's and ``trusted``
                is false; the message names the class and the risk.
            ValueError: If the file holds something other than a saved report.

        Example:
            >>> path = "lightning_logs/version_0/hessian_reports/epoch=0-step=4.pt"
            >>> report = HessianReport.load(path)  # doctest: +SKIP
        """
        try:
            with _report_classes_allowed():
                data = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:
            if "weights only load failed" not in str(error).lower():
                raise  # a damaged file, not one that needs classes
            needed = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
            detail = f"it needs {needed.group(1)}" if needed else "it holds classes"
            if not trusted:
                raise pickle.UnpicklingError(
                    f"{path} is not a plain-data HessianReport: loading it needs classes that "
                    f"PyTorch's restricted loader refuses ({detail}). Fully "
                    "unpickling it can run arbitrary code from the file. If you trust its source as you "
                    "would trust running its code, pass HessianReport.load(path, trusted=True), then "
                    "re-save it with report.save(path)."
                ) from error
            warnings.warn(
                f"HessianReport.load({str(path)!r}, trusted=True): fully unpickling a file that the "
                f"restricted loader refused ({detail}); this runs any code the file "
                "contains. Re-save it with report.save(path) to get a plain-data file.",
                UserWarning,
                stacklevel=2,
            )
            data = torch.load(path, map_location=map_location, weights_only=False)
        if isinstance(data, HessianReport):  # an old file: the pickled dataclasses
            data = {"format": REPORT_FORMAT, "version": REPORT_VERSION, **_plain(data)}
        return cls.from_dict(data)


def _dynamics_scalars(prefix: str, block: BlockReport) -> dict[str, float]:
    """The training-dynamics scalars of one block, for the quantities it has."""
    out: dict[str, float] = {}
    if block.stability is not None:
        out[f"{prefix}/stability"] = float(block.stability.value)
        if block.stability.adaptive:
            out[f"{prefix}/preconditioned_eigenvalue_1"] = float(block.stability.eigenvalue)
    geometry = block.gradient_geometry
    if geometry is not None:
        if geometry.alignment is not None:
            out[f"{prefix}/gradient_alignment"] = float(geometry.alignment)
        out[f"{prefix}/gradient_curvature"] = float(geometry.curvature)
        out[f"{prefix}/batch_sharpness"] = float(geometry.batch_sharpness)
    if block.eigenvector_overlap is not None:
        out[f"{prefix}/eigenvector_overlap"] = float(block.eigenvector_overlap)
    return out


RESULT_CLASSES = (
    EigenResult,
    TraceResult,
    SpectralDensity,
    StabilityResult,
    GradientGeometry,
    Landscape,
    BlockReport,
    HessianReport,
)


def _report_classes_allowed() -> contextlib.AbstractContextManager[Any]:
    """Let ``weights_only=True`` build the report dataclasses of an old (pickled) report file.

    The restricted unpickler makes an allowed class with ``cls.__new__`` and sets its ``__dict__``
    from the file: none of the class's code runs. ``torch.serialization.safe_globals`` is new in
    torch 2.5; before it, old files need ``trusted=True``.
    """
    allow = getattr(torch.serialization, "safe_globals", None)
    return contextlib.nullcontext() if allow is None else allow(list(RESULT_CLASSES))


def _plain(value: Any) -> Any:
    """Dataclasses as dicts of their fields, tensors detached on the CPU, containers walked."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name, None)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    """Construct dataclass ``cls`` from its fields' plain data, checking names and types."""
    if not isinstance(data, dict):
        raise ValueError(
            f"Saved HessianReport: {where} must be a dict of {cls.__name__} fields, got {data!r}."
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    missing = sorted(
        name
        for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    if unknown or missing:
        raise ValueError(
            f"Saved HessianReport: {where} ({cls.__name__}) has unknown fields {unknown} and lacks {missing}."
        )
    hints = typing.get_type_hints(cls)
    values = {name: _value(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    return cls(**values)


def _value(hint: Any, value: Any, where: str) -> Any:
    """One field's value, checked against (and converted to) its annotation."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = typing.get_args(hint) if union else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        origin = typing.get_origin(option)
        if option in RESULT_CLASSES and isinstance(value, dict):
            return _build(option, value, where)
        if origin is dict and isinstance(value, dict):
            item = typing.get_args(option)[1]
            return {str(k): _value(item, v, f"{where}[{k!r}]") for k, v in value.items()}
        if option is Tensor and isinstance(value, Tensor):
            return value
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if option is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
    expected = " or ".join("None" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)
    raise ValueError(
        f"Saved HessianReport: {where} must be {expected}, got {type(value).__name__} {value!r}."
    )
