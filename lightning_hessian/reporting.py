"""Logging a :class:`~lightning_hessian.results.HessianReport`: scalars to every Lightning logger
and to ``trainer.callback_metrics``; a spectrum histogram and a density figure per block to the
loggers that can hold them (TensorBoard, Weights & Biases, MLflow artifacts, files next to a
CSVLogger's ``metrics.csv``), all at one step.

Names (the design contract), for a block ``B``: ``hessian/B/trace``, ``hessian/B/trace_stderr``,
``hessian/B/eigenvalue_1`` ... ``hessian/B/eigenvalue_k``, ``hessian/B/eigenvalue_min``,
``hessian/B/eigenvalues_converged``, the training dynamics ``hessian/B/stability``,
``hessian/B/preconditioned_eigenvalue_1`` (adaptive optimizers), ``hessian/B/gradient_alignment``,
``hessian/B/gradient_curvature``, ``hessian/B/batch_sharpness`` and ``hessian/B/eigenvector_overlap``
(each when measured), the histogram ``hessian/B/spectrum`` and the figures ``hessian/B/density`` and
``hessian/B/landscape``; plus ``hessian/loss``, ``hessian/num_matvecs`` and ``hessian/seconds``, and
``epoch`` next to them in the loggers (as Lightning logs it with its own metrics).

About 600 lines, 210 of them docstrings: one job (putting a report where people look) spread over
four kinds of logger, two figures and the histogram data they share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from .lightning_internals import batches_that_stepped
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


def logging_step(trainer: pl.Trainer, reason: str) -> int:
    """The step an evaluation is logged at: the one Lightning logs the same moment's metrics at.

    Lightning logs a training batch's metrics at the number of batches that ran an optimizer step
    before it, and an epoch's metrics (its ``on_epoch=True`` values, and the validation run at its
    end) at the step of its last batch. An evaluation in ``on_train_batch_end`` (``reason="step"``)
    lands at the first, one in ``on_train_epoch_end`` or ``on_train_end`` (``"epoch"``, ``"end"``)
    at the second: in the same ``step`` of ``metrics.csv`` and TensorBoard as Lightning's own values
    of that moment. With one optimizer this is ``trainer.global_step - 1``.

    Args:
        trainer: The running trainer, inside the hook that evaluates.
        reason: ``"step"``, ``"epoch"`` or ``"end"``: the hook (see :class:`HessianCallback`).

    Returns:
        The step (at least 0).

    Example:
        >>> step = logging_step(trainer, "epoch")  # in on_train_epoch_end  # doctest: +SKIP
    """
    stepped = batches_that_stepped(trainer)
    return stepped if reason == "step" else max(stepped - 1, 0)


def block_density(block: BlockReport) -> SpectralDensity | None:
    """The block's eigenvalue density: the exact spectrum when known, else the SLQ estimate."""
    if block.spectrum is not None and block.spectrum.numel() > 0:
        spectrum = block.spectrum.detach().to(torch.float64).cpu()
        weights = torch.full_like(spectrum, 1.0 / spectrum.numel())
        return SpectralDensity(spectrum, weights, exact=True)
    if block.density is not None and block.density.nodes.numel() > 0:
        return block.density
    return None


#: The fields of :func:`raw_histogram`: the arguments of TensorBoard's ``add_histogram_raw``.
RAW_HISTOGRAM_KEYS = ("min", "max", "num", "sum", "sum_squares", "bucket_limits", "bucket_counts")


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


def histogram_data(block: BlockReport, bins: int = 64) -> dict[str, Any] | None:
    """A block's spectrum histogram as plain data (what the JSON files and MLflow artifacts hold).

    Args:
        block: A block of a report.
        bins: Number of equal-width bins.

    Returns:
        :func:`raw_histogram`'s fields plus ``block``, ``size`` and ``exact``, and for an exact
        spectrum its ``eigenvalues`` (ascending); ``None`` when the block has neither a spectrum nor a
        density.

    Example:
        >>> spectrum = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
        >>> histogram_data(BlockReport("fc", 3, "dense", spectrum=spectrum), bins=3)["bucket_counts"]
        [1.0, 1.0, 1.0]
    """
    density = block_density(block)
    if density is None:
        return None
    data: dict[str, Any] = {"block": block.name, "size": block.size, "exact": density.exact}
    data.update(raw_histogram(density, block.size, bins))
    if density.exact:
        data["eigenvalues"] = density.nodes.tolist()
    return data


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
    """Whether a logger's experiment takes raw histograms and images (TensorBoard's SummaryWriter).

    Loggers of other kinds get the media their own way (see :class:`ReportLogger`).
    """
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


def landscape_image(block: BlockReport, step: int | None = None) -> np.ndarray | None:
    """Render a block's loss landscape: the loss along each direction with its quadratic model.

    Args:
        block: A block of a report.
        step: Global step shown in the title.

    Returns:
        An ``[H, W, 3]`` uint8 RGB image, or ``None`` when the block has no landscape.
    """
    landscape = block.landscape
    if landscape is None:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for i, (name, losses) in enumerate(landscape.losses.items()):
        offsets = landscape.offsets[name].numpy()
        curvature = landscape.curvatures[name]
        axes.plot(offsets, losses.numpy(), color=f"C{i}", lw=1.5, marker=".", label=f"loss along {name}")
        axes.plot(
            offsets,
            landscape.quadratic_model(name).numpy(),
            color=f"C{i}",
            ls="--",
            lw=1,
            label=f"quadratic model (curvature {curvature:.4g})",
        )
    axes.set_xlabel("step length t along the unit direction")
    axes.set_ylabel("loss")
    title = f"Loss landscape of {block.name!r}"
    axes.set_title(title if step is None else f"{title}, step {step}", fontsize=10)
    axes.legend(fontsize=8, loc="upper center")
    axes.grid(True, alpha=0.3)
    figure.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.92)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


@dataclasses.dataclass
class BlockMedia:
    """One block's media of one evaluation, rendered once for every logger.

    Attributes:
        name: Block name.
        block: The block's report.
        histogram: :func:`histogram_data` (``None`` without histograms or without a spectrum).
        image: :func:`density_image` (``None`` without figures or without a spectrum).
        landscape: :func:`landscape_image` (``None`` without figures or without a landscape).
    """

    name: str
    block: BlockReport
    histogram: dict[str, Any] | None
    image: np.ndarray | None
    landscape: np.ndarray | None = None


def media_kind(logger: Logger) -> str | None:
    """How a logger takes histograms and figures.

    Args:
        logger: A Lightning logger.

    Returns:
        ``"tensorboard"`` (a SummaryWriter: ``add_histogram``/``add_image``), ``"wandb"``
        (``wandb.Histogram``/``wandb.Image`` through ``log_metrics``), ``"mlflow"`` (run artifacts),
        ``"files"`` (PNG and JSON files under a CSVLogger's ``log_dir``), or ``None``: it takes none.

    Example:
        >>> from lightning.pytorch.loggers import CSVLogger
        >>> media_kind(CSVLogger("logs"))
        'files'
    """
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

    if isinstance(logger, TensorBoardLogger):
        return "tensorboard"
    if isinstance(logger, WandbLogger):
        return "wandb"
    if isinstance(logger, MLFlowLogger):
        return "mlflow"
    if isinstance(logger, CSVLogger):
        return "files"
    return "tensorboard" if supports_media(logger) else None


def media_path(prefix: str, kind: str, block: str, step: int) -> str:
    """Relative path of a block's figure (``kind="figures"`` or ``"landscapes"``, PNG) or histogram
    (``"spectra"``, JSON).

    Args:
        prefix: Leading name component of the tags (``"hessian"``).
        kind: ``"figures"``, ``"landscapes"`` or ``"spectra"``.
        block: Block name; characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_``.
        step: The logged step.

    Returns:
        ``"{prefix}_{kind}/{block}/step={step}.png"`` (``.json`` for spectra), with ``/`` separators.

    Example:
        >>> media_path("hessian", "figures", "net.0", 7)
        'hessian_figures/net.0/step=7.png'
    """
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", block)
    if not name.strip("."):
        name = name.replace(".", "_") or "_"
    suffix = "json" if kind == "spectra" else "png"
    return f"{prefix}_{kind}/{name}/step={step}.{suffix}"


class ReportLogger:
    """Writes reports to a trainer's loggers and ``callback_metrics``; warns once about what it skips.

    Scalars (and ``epoch``) go to every logger through ``log_metrics``. Histograms and figures go to
    TensorBoard (and any logger whose experiment is a SummaryWriter), to ``WandbLogger``
    (``wandb.Histogram``/``wandb.Image`` in the same row as the scalars), to ``MLFlowLogger`` (run
    artifacts) and next to a ``CSVLogger``'s ``metrics.csv`` (files); see :func:`media_path` for the
    artifact and file names. Other loggers get the scalars only, with one warning.

    Args:
        prefix: Leading name component of every tag.
        histograms: Log the ``{prefix}/B/spectrum`` histograms.
        figures: Log the ``{prefix}/B/density`` figures.
        histogram_bins: Bins of a histogram (TensorBoard bins an exact spectrum itself).

    Example:
        >>> writer = ReportLogger()
        >>> metrics = writer.log(trainer, report, step=7, epoch=1)  # doctest: +SKIP
    """

    #: Most bins a ``wandb.Histogram`` takes.
    WANDB_MAX_BINS = 512

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

    def log(
        self,
        trainer: pl.Trainer,
        report: HessianReport,
        step: int,
        epoch: int | None = None,
        extra: Mapping[str, float] | None = None,
    ) -> dict[str, float]:
        """Log one evaluation: scalars everywhere, media to loggers that take them, all at ``step``.

        Args:
            trainer: The running trainer.
            report: The evaluation's report.
            step: The step every value is logged at (:func:`logging_step` in the callback).
            epoch: Logged as ``epoch`` next to the scalars (not in ``callback_metrics``); ``None``: not
                logged.
            extra: More scalars of the evaluation by short name (logged as ``{prefix}/{name}``), e.g.
                the callback's ``overhead``.

        Returns:
            The logged scalars (without ``epoch``).
        """
        metrics = scalar_metrics(report, self.prefix)
        metrics.update({f"{self.prefix}/{name}": float(value) for name, value in (extra or {}).items()})
        # On every rank, so that EarlyStopping/ModelCheckpoint decide alike everywhere.
        trainer.callback_metrics.update({k: torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()})
        self._write(trainer, report, metrics, step, epoch)
        return metrics

    def media(self, report: HessianReport, step: int) -> list[BlockMedia]:
        """Render every block's histogram data and figure once (as this logger's settings ask).

        Args:
            report: The evaluation's report.
            step: The logged step (shown in the figures' titles).

        Returns:
            One :class:`BlockMedia` per block that has a spectrum or a density.
        """
        out = []
        for name, block in report.blocks.items():
            histogram = histogram_data(block, self.histogram_bins) if self.histograms else None
            image = density_image(block, step) if self.figures else None
            landscape = landscape_image(block, step) if self.figures else None
            if histogram is not None or image is not None or landscape is not None:
                out.append(BlockMedia(name, block, histogram, image, landscape))
        return out

    @rank_zero_only
    def _write(
        self,
        trainer: pl.Trainer,
        report: HessianReport,
        metrics: dict[str, float],
        step: int,
        epoch: int | None,
    ) -> None:
        loggers = list(trainer.loggers)
        if not loggers:
            self._warn_once(
                "no-logger",
                "HessianCallback: the Trainer has no logger (logger=False), so the Hessian scalars only "
                "reach `trainer.callback_metrics` (and saved reports with save_reports=True); the "
                f"{self.prefix}/*/spectrum histograms and {self.prefix}/*/density figures are skipped. "
                "Pass a logger (TensorBoard, W&B, MLflow or CSV) to see them.",
            )
        scalars: dict[str, Any] = dict(metrics) if epoch is None else {**metrics, "epoch": epoch}
        wants_media = self.histograms or self.figures
        rendered: list[BlockMedia] | None = None
        for logger in loggers:
            kind = media_kind(logger) if wants_media else None
            if wants_media and kind is None:
                self._warn_once(
                    f"no-media-{type(logger).__name__}",
                    f"HessianCallback: {type(logger).__name__} cannot store histograms or figures; "
                    f"skipped {self.prefix}/*/spectrum and {self.prefix}/*/density for it (its scalars "
                    "are logged). TensorBoardLogger, WandbLogger, MLFlowLogger and CSVLogger take them.",
                )
            if kind is None:
                logger.log_metrics(scalars, step=step)
                logger.save()
                continue
            if rendered is None:
                rendered = self.media(report, step)
            if kind == "wandb":  # one row: the scalars with their histograms and figures
                logger.log_metrics({**scalars, **self._wandb_media(rendered, step)}, step=step)
            else:
                logger.log_metrics(scalars, step=step)
                if kind == "tensorboard":
                    self._tensorboard_media(logger.experiment, rendered, step)
                elif kind == "mlflow":
                    self._mlflow_media(logger, rendered, step)
                else:
                    self._file_media(Path(logger.log_dir), rendered, step)
            logger.save()

    def _tensorboard_media(self, writer: Any, media: list[BlockMedia], step: int) -> None:
        for item in media:
            tag = f"{self.prefix}/{item.name}"
            spectrum = item.block.spectrum
            if item.histogram is not None and spectrum is not None and spectrum.numel() > 0:
                values = spectrum.detach().to(torch.float64).cpu().numpy()
                writer.add_histogram(f"{tag}/spectrum", values, global_step=step)
            elif item.histogram is not None:
                raw = {k: item.histogram[k] for k in RAW_HISTOGRAM_KEYS}
                writer.add_histogram_raw(f"{tag}/spectrum", **raw, global_step=step)
            if item.image is not None:
                writer.add_image(f"{tag}/density", item.image, global_step=step, dataformats="HWC")
            if item.landscape is not None:
                writer.add_image(f"{tag}/landscape", item.landscape, global_step=step, dataformats="HWC")

    def _wandb_media(self, media: list[BlockMedia], step: int) -> dict[str, Any]:
        import wandb

        payload: dict[str, Any] = {}
        for item in media:
            tag = f"{self.prefix}/{item.name}"
            histogram = item.histogram
            if histogram is not None and len(histogram["bucket_counts"]) > self.WANDB_MAX_BINS:
                histogram = histogram_data(item.block, self.WANDB_MAX_BINS)
            if histogram is not None:
                edges = [histogram["min"], *histogram["bucket_limits"]]
                payload[f"{tag}/spectrum"] = wandb.Histogram(np_histogram=(histogram["bucket_counts"], edges))
            if item.image is not None:
                payload[f"{tag}/density"] = wandb.Image(item.image, caption=f"{tag}/density, step {step}")
            if item.landscape is not None:
                caption = f"{tag}/landscape, step {step}"
                payload[f"{tag}/landscape"] = wandb.Image(item.landscape, caption=caption)
        return payload

    def _mlflow_media(self, logger: Any, media: list[BlockMedia], step: int) -> None:
        client, run_id = logger.experiment, logger.run_id
        for item in media:
            if item.histogram is not None:
                path = media_path(self.prefix, "spectra", item.name, step)
                client.log_dict(run_id, {**item.histogram, "step": step}, path)
            for kind, image in (("figures", item.image), ("landscapes", item.landscape)):
                if image is not None:
                    client.log_image(
                        run_id, image, artifact_file=media_path(self.prefix, kind, item.name, step)
                    )

    def _file_media(self, folder: Path, media: list[BlockMedia], step: int) -> None:
        from matplotlib.image import imsave

        for item in media:
            if item.histogram is not None:
                path = folder / media_path(self.prefix, "spectra", item.name, step)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({**item.histogram, "step": step}))
            for kind, image in (("figures", item.image), ("landscapes", item.landscape)):
                if image is not None:
                    path = folder / media_path(self.prefix, kind, item.name, step)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    imsave(path, image)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=UserWarning)


@rank_zero_only
def save_report(report: HessianReport, path: str | Path) -> Path:
    """Save a report as plain data (:meth:`HessianReport.save`) on rank 0, creating parent folders.

    The file holds tensors, numbers and strings only: ``HessianReport.load(path)`` rebuilds the
    report, and ``torch.load(path, weights_only=True)`` reads its :meth:`HessianReport.to_dict`
    form, neither unpickling any class.

    Args:
        report: The report.
        path: Target file.

    Returns:
        The path written.

    Example:
        >>> save_report(report, "reports/epoch=0-step=3.pt")  # doctest: +SKIP
        >>> HessianReport.load("reports/epoch=0-step=3.pt")  # doctest: +SKIP
    """
    return report.save(path)
