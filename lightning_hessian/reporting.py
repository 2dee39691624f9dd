"""Logging a :class:`~lightning_hessian.results.HessianReport`: scalars to every Lightning logger
and to ``trainer.callback_metrics``, and on TensorBoard a spectrum histogram and a density figure
per block, all at one step.

Names (the design contract), for a block ``B``: ``hessian/B/trace``, ``hessian/B/eigenvalue_1`` ...
``hessian/B/eigenvalue_k``, ``hessian/B/eigenvalue_min``, the histogram ``hessian/B/spectrum`` and the
figure ``hessian/B/density``; plus ``hessian/loss``, ``hessian/num_matvecs`` and ``hessian/seconds``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor

from .results import BlockReport, HessianReport, SpectralDensity, default_broadening

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import Logger

DEFAULT_PREFIX = "hessian"


def scalar_metrics(report: HessianReport, prefix: str = DEFAULT_PREFIX) -> dict[str, float]:
    """All logged scalars of a report.

    Args:
        report: The result of :func:`lightning_hessian.analyze`.
        prefix: Leading name component.

    Returns:
        ``report.scalars(prefix)`` plus ``{prefix}/loss`` (the loss at which the Hessian was taken),
        ``{prefix}/num_matvecs`` and ``{prefix}/seconds``.

    Example:
        >>> from lightning_hessian.results import HessianReport
        >>> sorted(scalar_metrics(HessianReport(loss=0.5)))
        ['hessian/loss', 'hessian/num_matvecs', 'hessian/seconds']
    """
    metrics = report.scalars(prefix)
    metrics[f"{prefix}/loss"] = float(report.loss)
    metrics[f"{prefix}/num_matvecs"] = float(report.num_matvecs)
    metrics[f"{prefix}/seconds"] = float(report.seconds)
    return metrics


def block_density(block: BlockReport) -> SpectralDensity | None:
    """The block's eigenvalue density: the exact spectrum when known, else the SLQ estimate."""
    if block.spectrum is not None and block.spectrum.numel() > 0:
        spectrum = block.spectrum.detach().to(torch.float64).cpu()
        weights = torch.full_like(spectrum, 1.0 / spectrum.numel())
        return SpectralDensity(spectrum, weights, exact=True)
    if block.density is not None and block.density.nodes.numel() > 0:
        return block.density
    return None


def raw_histogram(density: SpectralDensity, size: int, bins: int = 64) -> dict[str, Any]:
    """A density as the arguments of TensorBoard's ``add_histogram_raw`` (counts of eigenvalues).

    Bin masses are scaled by the block size ``N``, so the counts estimate how many of the ``N``
    eigenvalues fall in each bin (exact for an exact spectrum).

    Args:
        density: Nodes and weights (mass 1).
        size: Number of eigenvalues ``N`` the density stands for.
        bins: Number of equal-width bins.

    Returns:
        Keyword arguments ``min, max, num, sum, sum_squares, bucket_limits, bucket_counts``.
    """
    edges, mass = density.histogram(bins)
    nodes = density.nodes.detach().to(torch.float64).cpu()
    weights = density.weights.detach().to(torch.float64).cpu()
    return {
        "min": float(edges[0]),
        "max": float(edges[-1]),
        "num": float(size),
        "sum": float(size * (weights * nodes).sum()),
        "sum_squares": float(size * (weights * nodes**2).sum()),
        "bucket_limits": edges[1:].tolist(),
        "bucket_counts": (mass * size).tolist(),
    }


def density_image(block: BlockReport, step: int | None = None, points: int = 512) -> np.ndarray | None:
    """Render a block's eigenvalue density on a log scale, with its top eigenvalues marked.

    Drawn with matplotlib's Agg canvas directly (no pyplot, no global figure state).

    Args:
        block: A block of a report.
        step: Global step shown in the title.
        points: Grid points of the curve.

    Returns:
        An ``[H, W, 3]`` uint8 RGB image, or ``None`` when the block has no density or spectrum.
    """
    density = block_density(block)
    if density is None:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nodes = density.nodes.detach().to(torch.float64).cpu()
    marks = [] if block.eigenvalues is None else [float(v) for v in block.eigenvalues.values.cpu()]
    lo = min([float(nodes.min()), *marks])
    hi = max([float(nodes.max()), *marks])
    sigma = default_broadening(nodes)
    pad = 0.05 * (hi - lo) + 4 * sigma
    grid = torch.linspace(lo - pad, hi + pad, points, dtype=torch.float64)
    pdf = density.pdf(grid, sigma).cpu()
    peak = float(pdf.max()) if math.isfinite(float(pdf.max())) and float(pdf.max()) > 0 else 1.0
    pdf = pdf.clamp_min(peak * 1e-7)

    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    kind = "exact spectrum" if density.exact else f"SLQ, {density.num_probes} probes"
    axes.semilogy(grid.numpy(), pdf.numpy(), color="C0", lw=1.5, label=f"density ({kind})")
    for i, value in enumerate(marks, start=1):
        axes.axvline(
            value, color="C3", ls="--", lw=1, alpha=0.8, label=f"λ{i} = {value:.4g}" if i <= 5 else None
        )
    axes.set_xlabel("eigenvalue")
    axes.set_ylabel("density (log scale)")
    title = f"Hessian spectrum of {block.name!r} ({block.size} parameters)"
    axes.set_title(title if step is None else f"{title}, step {step}", fontsize=10)
    axes.legend(fontsize=8, loc="upper right")
    axes.grid(True, which="major", alpha=0.3)
    axes.minorticks_off()
    figure.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.92)  # fixed: tight_layout is slow
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def supports_media(logger: Logger) -> bool:
    """Whether a logger's experiment takes raw histograms and images (TensorBoard's SummaryWriter)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    if isinstance(logger, TensorBoardLogger):
        return True
    try:
        writer = logger.experiment
    except Exception:  # noqa: BLE001 - a logger that cannot create its experiment takes no media
        return False
    return all(
        callable(getattr(writer, name, None)) for name in ("add_histogram_raw", "add_histogram", "add_image")
    )


def report_to_cpu(value: Any) -> Any:
    """A copy of a report (or any nested dataclass/dict/list of tensors) with every tensor on the CPU."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: report_to_cpu(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return dataclasses.replace(value, **changes)
    if isinstance(value, dict):
        return {k: report_to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(report_to_cpu(v) for v in value)
    return value


class ProgressBar:
    """A tqdm bar of Hessian-vector products, fed as ``progress(done, planned)`` by the analysis.

    Args:
        description: The bar's label.
    """

    def __init__(self, description: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(desc=description, unit="HVP", leave=False, dynamic_ncols=True, file=sys.stdout)

    @classmethod
    @contextlib.contextmanager
    def shown(cls, show: bool, description: str) -> Iterator[ProgressBar | None]:
        """A bar while the block runs when ``show`` is true (closed afterwards), else ``None``."""
        if not show:
            yield None
            return
        bar = cls(description)
        try:
            yield bar
        finally:
            bar.close()

    def __call__(self, done: int, planned: int) -> None:
        """Move the bar to ``done`` of ``planned`` products."""
        if planned != self.bar.total:
            self.bar.total = planned
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        """Close the bar."""
        self.bar.close()


class ReportLogger:
    """Writes reports to a trainer's loggers and ``callback_metrics``; warns once about what it skips.

    Args:
        prefix: Leading name component of every tag.
        histograms: Log the ``{prefix}/B/spectrum`` histograms.
        figures: Log the ``{prefix}/B/density`` figures.
        histogram_bins: Bins of a density's histogram (an exact spectrum is binned by TensorBoard).

    Example:
        >>> writer = ReportLogger()
        >>> metrics = writer.log(trainer, report, step=trainer.global_step)  # doctest: +SKIP
    """

    def __init__(
        self,
        prefix: str = DEFAULT_PREFIX,
        histograms: bool = True,
        figures: bool = True,
        histogram_bins: int = 64,
    ) -> None:
        self.prefix = prefix
        self.histograms = histograms
        self.figures = figures
        self.histogram_bins = histogram_bins
        self._warned: set[str] = set()

    def log(self, trainer: pl.Trainer, report: HessianReport, step: int) -> dict[str, float]:
        """Log one evaluation: scalars everywhere, media to loggers that take them, all at ``step``.

        Args:
            trainer: The running trainer.
            report: The evaluation's report.
            step: The step every value is logged at (``trainer.global_step``).

        Returns:
            The logged scalars.
        """
        metrics = scalar_metrics(report, self.prefix)
        # On every rank, so that EarlyStopping/ModelCheckpoint decide alike everywhere.
        trainer.callback_metrics.update({k: torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()})
        self._write(trainer, report, metrics, step)
        return metrics

    @rank_zero_only
    def _write(
        self, trainer: pl.Trainer, report: HessianReport, metrics: dict[str, float], step: int
    ) -> None:
        loggers = list(trainer.loggers)
        if not loggers:
            self._warn_once(
                "no-logger",
                "HessianCallback: the Trainer has no logger (logger=False), so the Hessian scalars only "
                "reach `trainer.callback_metrics` (and saved reports with save_reports=True); the "
                f"{self.prefix}/*/spectrum histograms and {self.prefix}/*/density figures are skipped. "
                "Pass a TensorBoardLogger to see them.",
            )
        wants_media = self.histograms or self.figures
        for logger in loggers:
            logger.log_metrics(metrics, step=step)
            if not wants_media:
                logger.save()
                continue
            if supports_media(logger):
                self._write_media(logger.experiment, report, step)
            else:
                self._warn_once(
                    f"no-media-{type(logger).__name__}",
                    f"HessianCallback: {type(logger).__name__} cannot store histograms or figures; "
                    f"skipped {self.prefix}/*/spectrum and {self.prefix}/*/density for it (its scalars "
                    "are logged). Add a TensorBoardLogger to get them.",
                )
            logger.save()

    def _write_media(self, writer: Any, report: HessianReport, step: int) -> None:
        for name, block in report.blocks.items():
            if self.histograms:
                self._histogram(writer, name, block, step)
            if self.figures:
                image = density_image(block, step)
                if image is not None:
                    writer.add_image(
                        f"{self.prefix}/{name}/density", image, global_step=step, dataformats="HWC"
                    )

    def _histogram(self, writer: Any, name: str, block: BlockReport, step: int) -> None:
        tag = f"{self.prefix}/{name}/spectrum"
        if block.spectrum is not None and block.spectrum.numel() > 0:
            writer.add_histogram(
                tag, block.spectrum.detach().to(torch.float64).cpu().numpy(), global_step=step
            )
            return
        if block.density is not None and block.density.nodes.numel() > 0:
            writer.add_histogram_raw(
                tag, **raw_histogram(block.density, block.size, self.histogram_bins), global_step=step
            )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=UserWarning)


@rank_zero_only
def save_report(report: HessianReport, path: str | Path) -> Path:
    """Save a report with ``torch.save`` (tensors moved to the CPU), creating parent folders.

    Load it with ``torch.load(path, weights_only=False)``.

    Args:
        report: The report.
        path: Target file.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(report_to_cpu(report), path)
    return path
