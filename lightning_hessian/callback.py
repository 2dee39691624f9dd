"""``HessianCallback``: curvature of the training loss, logged while a LightningModule trains.

The callback is thin: it decides *when* (:mod:`.schedule`), *on which batches*
(:mod:`.batch_cache`), calls :func:`lightning_hessian.analyze` for the numbers, and hands the report
to :mod:`.reporting`. It never changes the training run: ``analyze`` leaves the module, its buffers,
gradients and every random generator as it found them, and the callback draws no random numbers.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from . import analysis
from .batch_cache import (
    DATA_SOURCES,
    detached_copy,
    fingerprint,
    take_first,
    to_module_device,
    validation_loader,
)
from .closure import validate_mode
from .errors import RankFailedError
from .reporting import DEFAULT_PREFIX, ReportLogger, save_report
from .results import HessianReport
from .schedule import Schedule

if TYPE_CHECKING:
    import lightning.pytorch as pl

ON_ERROR = ("warn", "raise")
# Strategies that shard parameters across ranks: each rank holds a slice, so the operator's
# "same parameters on every rank, products summed over ranks" model does not apply. By class name,
# so that no optional dependency (deepspeed) is imported.
SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")
METHODS = ("auto", "dense", "iterative")
# analyze() arguments the callback sets itself; everything else may go through `analyze_kwargs`.
_OWN_ANALYZE_ARGS = frozenset(
    {
        "model", "loss_fn", "data", "params", "blocks", "top_k", "min_eigenvalue", "trace", "density",
        "method", "dense_limit", "mode", "dtype", "seed", "progress",
    }
)  # fmt: skip


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")
    return value


def _check_int(name: str, value: Any, least: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"`{name}` must be an integer >= {least}, got {value!r}. {fix}")
    return int(value)


def _check_patterns(name: str, value: Any) -> None:
    if value is None or isinstance(value, str):
        return
    if isinstance(value, Iterable) and not isinstance(value, Mapping):
        items = list(value)
        if items and all(isinstance(v, str) for v in items):
            return
    raise ValueError(
        f"`{name}` must be None, a glob pattern or a non-empty list of glob patterns on parameter "
        f"names (e.g. {name}=['conv1.*', 'fc.weight']), got {value!r}."
    )


def _check_blocks(value: Any) -> None:
    if value is None or value in ("model", "module", "parameter"):
        return
    if isinstance(value, Mapping) and value:
        for key, patterns in value.items():
            if not isinstance(key, str):
                raise ValueError(f"`blocks` keys must be block names (strings), got {key!r}.")
            _check_patterns(f"blocks[{key!r}]", patterns)
        return
    raise ValueError(
        f"`blocks` must be None or 'model' (whole selection), 'module', 'parameter', or a non-empty "
        f"mapping {{block name: glob pattern(s)}}, got {value!r}."
    )


def _check_dtype(value: Any) -> torch.dtype | None:
    if value is None:
        return None
    dtype = value
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"`dtype` must be None (the parameters' dtype) or a floating dtype such as torch.float64 "
            f"or 'float64', got {value!r}."
        )
    return dtype


def _check_data(value: Any) -> str | Iterable[Any]:
    if isinstance(value, str):
        if value not in DATA_SOURCES:
            raise ValueError(
                f"`data={value!r}` is not supported. Use 'train' (the first training batches, cached "
                "as they pass), 'val' (the first validation batches) or an iterable of batches "
                "(a list of batches or a DataLoader)."
            )
        return value
    if isinstance(value, Tensor) or not isinstance(value, Iterable):
        raise ValueError(
            f"`data` must be 'train', 'val' or an iterable of batches (a list or a DataLoader), got "
            f"{type(value).__name__}; wrap a single batch in a list: data=[batch]."
        )
    return value


class _ProgressBar:
    """A tqdm bar of Hessian-vector products, fed by ``analyze(progress=...)``."""

    def __init__(self, description: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(desc=description, unit="HVP", leave=False, dynamic_ncols=True, file=sys.stdout)

    def __call__(self, done: int, planned: int) -> None:
        if planned != self.bar.total:
            self.bar.total = planned
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _check_finite(report: HessianReport) -> None:
    values = {"loss": report.loss, **report.scalars()}
    bad = sorted(name for name, value in values.items() if not math.isfinite(value))
    if bad:
        raise FloatingPointError(
            f"non-finite curvature ({', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}); the loss "
            f"at the evaluated batches is {report.loss}"
        )


def _sharded_strategy(strategy: Any) -> str | None:
    """The name of the parameter-sharding strategy class ``strategy`` is (or derives from), else None."""
    names = {cls.__name__ for cls in type(strategy).__mro__}
    return next((name for name in SHARDED_STRATEGIES if name in names), None)


def _process_group(trainer: pl.Trainer) -> Any:
    """The process group the Hessian products are summed over: the strategy's, else WORLD, else None.

    A data-parallel strategy (``ddp``, ``ddp_spawn``, multi-node) keeps a full copy of the parameters
    on every rank, so summing every rank's products (weighted by sample counts) gives the Hessian of
    the loss over the union of all ranks' batches.
    """
    if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return None
    group = getattr(trainer.strategy, "process_group", None)
    return dist.group.WORLD if group is None else group


def _name_of(value: Any) -> str:
    if value is None:
        return "None"
    return getattr(value, "__qualname__", type(value).__name__)


class HessianCallback(Callback):
    """Log the curvature of the training loss (Hessian eigenvalues, trace, spectral density) while training.

    At scheduled points the callback runs :func:`lightning_hessian.analyze` on the LightningModule
    and a fixed set of batches, then logs, at ``trainer.global_step``, for every block ``B``:
    ``hessian/B/trace``, ``hessian/B/eigenvalue_1`` ... ``hessian/B/eigenvalue_k``,
    ``hessian/B/eigenvalue_min``, ``hessian/loss``, ``hessian/num_matvecs`` and ``hessian/seconds`` to
    every logger and to ``trainer.callback_metrics``; on TensorBoard also the histogram
    ``hessian/B/spectrum`` and the figure ``hessian/B/density``.

    Evaluations happen in ``on_train_epoch_end`` (after that epoch's validation), so a
    ``ModelCheckpoint``/``EarlyStopping`` that monitors a ``hessian/...`` value needs
    ``save_on_train_epoch_end=True`` / ``check_on_train_epoch_end=True`` when the run validates.

    Args:
        every_n_epochs: Evaluate after epochs ``n, 2n, ...`` (counted from 1, like
            ``check_val_every_n_epoch``). When none of ``every_n_epochs``, ``epochs`` and
            ``every_n_steps`` is given, every epoch is evaluated.
        epochs: Explicit 0-based epoch indices to evaluate after.
        every_n_steps: Evaluate every ``n`` optimizer steps (``trainer.global_step``).
        evaluate_at_end: Evaluate once when training ends, unless that model state (global step)
            was just evaluated.
        data: ``"train"``: the first ``num_batches`` training batches, copied (on the device) as
            they pass, reused at every evaluation; ``"val"``: the first ``num_batches`` batches of
            the validation dataloader; or an iterable of batches (list or DataLoader), moved to the
            module's device with the LightningModule's batch-transfer hooks.
        num_batches: Number of batches to evaluate on (``None``: all of ``data``; not for ``"train"``).
        params: Glob pattern(s) on parameter names; default all trainable parameters.
        blocks: ``None``/``"model"``, ``"module"``, ``"parameter"`` or ``{block name: patterns}``.
        top_k: Number of largest eigenvalues per block (0 for none).
        min_eigenvalue: Also estimate the smallest eigenvalue.
        trace: Estimate the trace.
        density: Estimate the spectral density (SLQ), for histograms and figures of iterative blocks.
        loss_fn: ``loss_fn(module, batch) -> scalar``; default the module's own ``training_step``
            (with ``self.log`` silenced). Required with manual optimization, and advisable when
            ``training_step`` has side effects such as updating torchmetrics.
        mode: ``"eval"`` (dropout off, BatchNorm running statistics) or ``"train"``.
        dtype: Compute dtype (``torch.float64`` or ``"float64"``); default the parameters' dtype.
        seed: Seed of every random probe (the training RNG is never touched).
        method: ``"auto"``, ``"dense"`` or ``"iterative"`` (passed to ``analyze``).
        dense_limit: Blocks up to this size are computed exactly with ``method="auto"``.
        analyze_kwargs: More keyword arguments for :func:`lightning_hessian.analyze`
            (e.g. ``{"trace_matvecs": 30, "density_steps": 64, "batch_size_fn": ...}``).
        on_error: ``"warn"``: a failed evaluation (NaN loss, non-finite products, out of memory,
            any exception) becomes one warning and a skipped evaluation; ``"raise"``: it stops training.
        histograms: Log ``hessian/B/spectrum`` histograms to loggers that take them.
        figures: Log ``hessian/B/density`` figures to loggers that take them.
        histogram_bins: Bins of a spectral density's histogram.
        save_reports: Save each evaluation's :class:`~lightning_hessian.HessianReport` to
            ``<log_dir>/hessian_reports/epoch=E-step=S.pt`` (load with ``weights_only=False``).
        progress_bar: Show a progress bar of Hessian-vector products during long evaluations (only
            while the trainer's own progress bar is enabled).

    Raises:
        ValueError: For any invalid argument, naming it and the fix.

    Example:
        >>> import lightning as L
        >>> import lightning_hessian as lh
        >>> hessian = lh.HessianCallback(every_n_epochs=1, top_k=3, blocks="module")
        >>> trainer = L.Trainer(max_epochs=5, callbacks=[hessian])  # doctest: +SKIP
        >>> trainer.fit(model, train_loader)  # doctest: +SKIP
        >>> hessian.history[-1]["hessian/model/eigenvalue_1"]  # doctest: +SKIP
    """

    def __init__(
        self,
        every_n_epochs: int | None = None,
        epochs: Sequence[int] | None = None,
        every_n_steps: int | None = None,
        evaluate_at_end: bool = True,
        data: str | Iterable[Any] = "train",
        num_batches: int | None = 4,
        params: str | Sequence[str] | None = None,
        blocks: str | Mapping[str, str | Sequence[str]] | None = None,
        top_k: int = 3,
        min_eigenvalue: bool = True,
        trace: bool = True,
        density: bool = True,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        mode: str = "eval",
        dtype: torch.dtype | str | None = None,
        seed: int = 0,
        method: str = "auto",
        dense_limit: int = 1024,
        analyze_kwargs: dict[str, Any] | None = None,
        on_error: str = "warn",
        histograms: bool = True,
        figures: bool = True,
        histogram_bins: int = 64,
        save_reports: bool = False,
        progress_bar: bool = True,
    ) -> None:
        super().__init__()
        self.schedule = Schedule.create(every_n_epochs, epochs, every_n_steps, evaluate_at_end)
        self.data = _check_data(data)
        if num_batches is None:
            if self.data == "train":
                raise ValueError(
                    "`num_batches=None` (all batches) is not supported with data='train'; pass a number "
                    "such as num_batches=4."
                )
            self.num_batches = None
        else:
            self.num_batches = _check_int("num_batches", num_batches, 1, "Pass e.g. num_batches=4.")
        _check_patterns("params", params)
        _check_blocks(blocks)
        self.params = params
        self.blocks = blocks
        self.top_k = _check_int("top_k", top_k, 0, "Pass e.g. top_k=3 (0 for no top eigenvalues).")
        self.min_eigenvalue = _check_bool("min_eigenvalue", min_eigenvalue)
        self.trace = _check_bool("trace", trace)
        self.density = _check_bool("density", density)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(
                f"`loss_fn` must be None (use training_step) or callable as loss_fn(module, batch), got "
                f"{loss_fn!r}."
            )
        self.loss_fn = loss_fn
        try:
            self.mode = validate_mode(mode)
        except ValueError as error:
            raise ValueError(str(error)) from None
        self.dtype = _check_dtype(dtype)
        self.seed = _check_int("seed", seed, 0, "Pass a non-negative integer such as seed=0.")
        if method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
        self.method = method
        self.dense_limit = _check_int(
            "dense_limit", dense_limit, 0, "Pass the largest block size to compute exactly, e.g. 1024."
        )
        self.analyze_kwargs = self._check_analyze_kwargs(analyze_kwargs)
        if on_error not in ON_ERROR:
            raise ValueError(
                f"`on_error` must be 'warn' (skip a failed evaluation with a warning) or 'raise' (stop "
                f"training), got {on_error!r}."
            )
        self.on_error = on_error
        self.histogram_bins = _check_int("histogram_bins", histogram_bins, 1, "Pass e.g. histogram_bins=64.")
        self.save_reports = _check_bool("save_reports", save_reports)
        self.progress_bar = _check_bool("progress_bar", progress_bar)
        self.reporter = ReportLogger(
            DEFAULT_PREFIX,
            histograms=_check_bool("histograms", histograms),
            figures=_check_bool("figures", figures),
            histogram_bins=self.histogram_bins,
        )
        self.history: list[dict[str, Any]] = []
        self.last_report: HessianReport | None = None
        self._batches: list[Any] = []
        self._batches_final = False
        self._fingerprint: str | None = None
        self._loaded_fingerprint: str | None = None
        self._last_step: int | None = None
        self._epoch: int | None = None  # the epoch in progress (the last one trained, at the end)
        self._report_dir: Path | None = None
        self._warned: set[str] = set()

    @staticmethod
    def _check_analyze_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
        if kwargs is None:
            return {}
        if not isinstance(kwargs, Mapping):
            raise ValueError(f"`analyze_kwargs` must be a dict of analyze() arguments, got {kwargs!r}.")
        accepted = set(inspect.signature(analysis.analyze).parameters) - _OWN_ANALYZE_ARGS
        own = sorted(set(kwargs) & _OWN_ANALYZE_ARGS)
        if own:
            raise ValueError(
                f"`analyze_kwargs` sets {own}, which are HessianCallback arguments; pass them directly, "
                f"e.g. HessianCallback({own[0]}=...)."
            )
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise ValueError(
                f"`analyze_kwargs` has unknown keys {unknown}; lightning_hessian.analyze accepts "
                f"{sorted(accepted)}."
            )
        return dict(kwargs)

    # ------------------------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        """Identifies this callback's state in a checkpoint; differs between different settings."""
        data = self.data if isinstance(self.data, str) else type(self.data).__name__
        return self._generate_state_key(
            **self.schedule.describe(),
            data=data,
            num_batches=self.num_batches,
            params=self.params,
            blocks=self.blocks,
            top_k=self.top_k,
            loss_fn=_name_of(self.loss_fn),
            mode=self.mode,
            dtype=str(self.dtype),
            seed=self.seed,
        )

    def state_dict(self) -> dict[str, Any]:
        """The evaluation history, the last evaluated step and the fingerprint of the batches."""
        return {
            "history": [dict(entry) for entry in self.history],
            "last_step": self._last_step,
            "fingerprint": self._fingerprint,
            "num_batches": len(self._batches),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history and schedule position of a checkpointed run.

        The batches themselves are not checkpointed: they are captured again after the resume, and
        a warning says so if they differ from the checkpointed run's (by fingerprint).
        """
        self.history = [dict(entry) for entry in state_dict.get("history", [])]
        self._last_step = state_dict.get("last_step")
        self._loaded_fingerprint = state_dict.get("fingerprint")

    @property
    def batches(self) -> list[Any]:
        """The batches evaluations run on (on the module's device); empty until captured."""
        return list(self._batches)

    @property
    def batches_fingerprint(self) -> str | None:
        """SHA-256 fingerprint of :attr:`batches` once they are final, else ``None``."""
        return self._fingerprint

    # ------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Reject sharded strategies and a manual-optimization module without ``loss_fn``; resolve
        the report folder.

        Raises:
            MisconfigurationException: For a strategy that shards parameters (FSDP, DeepSpeed,
                ModelParallel), or manual optimization without ``loss_fn``.
        """
        if stage != "fit":
            return
        sharded = _sharded_strategy(trainer.strategy)
        if sharded is not None:
            raise MisconfigurationException(
                f"HessianCallback does not support {sharded}: it shards the parameters across ranks, "
                "while the Hessian operator needs every parameter on every rank (it sums each rank's "
                "Hessian-vector products over the ranks' batches). Use a data-parallel strategy "
                "(strategy='ddp' or 'ddp_spawn'), or compute the Hessian of a parameter subset "
                "outside training on a single process with lightning_hessian.analyze."
            )
        if self.loss_fn is None and not pl_module.automatic_optimization:
            raise MisconfigurationException(
                f"HessianCallback: {type(pl_module).__name__} uses manual optimization, so its "
                "training_step does not return the loss. Pass the loss explicitly: "
                "HessianCallback(loss_fn=lambda module, batch: F.cross_entropy(module(batch[0]), batch[1]))."
            )
        if self.save_reports:
            # `log_dir` broadcasts from rank 0, so every rank must ask.
            self._report_dir = Path(trainer.log_dir or trainer.default_root_dir) / "hessian_reports"

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remember the epoch in progress (``current_epoch`` moves on before ``on_train_end``)."""
        self._epoch = trainer.current_epoch

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """With ``data="train"``, copy the first ``num_batches`` batches (already on the device)."""
        if self.data != "train" or self._batches_final:
            return
        self._batches.append(detached_copy(batch))
        if len(self._batches) >= (self.num_batches or 0):
            self._finalize_batches()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Evaluate every ``every_n_steps`` optimizer steps."""
        if self.schedule.step_due(trainer.global_step) and trainer.global_step != self._last_step:
            self._evaluate(trainer, pl_module, "step")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Freeze the captured training batches; evaluate when the epoch is scheduled."""
        if self.data == "train" and self._batches and not self._batches_final:
            self._finalize_batches()
        epoch = trainer.current_epoch
        if not self.schedule.epoch_due(epoch):
            return
        if any(entry["epoch"] == epoch and entry["reason"] == "epoch" for entry in self.history):
            return  # evaluated before the checkpoint this run resumed from
        if trainer.global_step == self._last_step:
            return  # this model state was just evaluated (by every_n_steps)
        self._evaluate(trainer, pl_module, "epoch")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate the final model unless its state (global step) was just evaluated."""
        if self.schedule.at_end and trainer.global_step != self._last_step:
            self._evaluate(trainer, pl_module, "end")

    # ------------------------------------------------------------------------------------ work
    def _finalize_batches(self) -> None:
        self._batches_final = True
        self._fingerprint = fingerprint(self._batches)
        if self._loaded_fingerprint is not None and self._loaded_fingerprint != self._fingerprint:
            rank_zero_warn(
                "HessianCallback: the batches captured after resuming differ from those of the "
                "checkpointed run, so curvature before and after the resume is measured on different "
                "samples. For identical samples across resumes pass fixed batches (data=[...]) or "
                "data='val' with an unshuffled validation dataloader.",
                category=UserWarning,
            )

    def _evaluation_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
        if self.data == "train":
            if not self._batches:
                raise RuntimeError("no training batch has been captured yet")
            if not self._batches_final:
                self._warn_once(
                    "partial",
                    f"HessianCallback: evaluating at step {trainer.global_step} on the {len(self._batches)} "
                    f"training batch(es) captured so far; later evaluations use all {self.num_batches}.",
                )
            return self._batches
        if not self._batches_final:
            devices = [pl_module.device]
            loader = validation_loader(trainer) if self.data == "val" else self.data
            raw = take_first(loader, self.num_batches, devices)
            if not raw:
                raise ValueError(f"HessianCallback: data={self.data!r} yielded no batch.")
            with torch.no_grad():
                self._batches = [to_module_device(trainer, b) for b in raw]
            self._finalize_batches()
        return self._batches

    @contextlib.contextmanager
    def _progress(self, trainer: pl.Trainer, epoch: int) -> Iterator[_ProgressBar | None]:
        enabled = self.progress_bar and trainer.progress_bar_callback is not None and trainer.is_global_zero
        if not enabled:
            yield None
            return
        bar = _ProgressBar(f"Hessian (epoch {epoch}, step {trainer.global_step})")
        try:
            yield bar
        finally:
            bar.close()

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str) -> None:
        """Run one evaluation on every rank; the ranks agree on its outcome before anything is logged.

        Under a data-parallel strategy every rank analyzes its own batches and the operator sums the
        products over ranks, so each phase ends with a tiny all-reduce of a failure flag: a failure
        on one rank (NaN, out of memory, no batch) makes every rank skip (``on_error="warn"``) or
        raise (``on_error="raise"``) at the same point, and no rank is left waiting in a collective.
        """
        step = trainer.global_step
        epoch = trainer.current_epoch if self._epoch is None else self._epoch
        module = trainer.lightning_module or pl_module  # never the DDP wrapper
        self._last_step = step
        entry: dict[str, Any] = {"epoch": epoch, "step": step, "reason": reason}
        start = time.perf_counter()
        report: HessianReport | None = None
        metrics: dict[str, float] = {}
        error: BaseException | None = None
        try:
            batches = self._evaluation_batches(trainer, module)
            entry["num_batches"] = len(batches)
        except Exception as caught:  # noqa: BLE001 - agreed with the other ranks below
            error = caught
        error, message = self._agree(trainer, error)
        if error is None:
            try:
                report = self._analyze(trainer, module, batches, epoch)
            except Exception as caught:  # noqa: BLE001
                error = caught
            error, message = self._agree(trainer, error, report)
        if error is None:
            try:
                metrics = self.reporter.log(trainer, report, step)
                if self._report_dir is not None:
                    save_report(report, self._report_dir / f"epoch={epoch}-step={step}.pt")
            except Exception as caught:  # noqa: BLE001
                error = caught
            error, message = self._agree(trainer, error)
        if error is not None:
            self._skip(entry, error, message)
            return
        entry.update(ok=True, wall_seconds=time.perf_counter() - start, **metrics)
        self.history.append(entry)
        self.last_report = report

    def _analyze(
        self, trainer: pl.Trainer, module: pl.LightningModule, batches: list[Any], epoch: int
    ) -> HessianReport:
        with torch.inference_mode(False), torch.enable_grad(), self._progress(trainer, epoch) as progress:
            report = analysis.analyze(
                module,
                self.loss_fn,
                batches,
                params=self.params,
                blocks=self.blocks,
                top_k=self.top_k,
                min_eigenvalue=self.min_eigenvalue,
                trace=self.trace,
                density=self.density,
                method=self.method,
                dense_limit=self.dense_limit,
                mode=self.mode,
                dtype=self.dtype,
                seed=self.seed,
                process_group=_process_group(trainer),
                progress=progress,
                **self.analyze_kwargs,
            )
        _check_finite(report)
        return report

    def _agree(
        self, trainer: pl.Trainer, error: BaseException | None, report: HessianReport | None = None
    ) -> tuple[BaseException | None, str]:
        """Agree across ranks on whether a phase failed anywhere (one tiny all-reduce on every rank).

        Args:
            trainer: The running trainer (its strategy reduces the flag).
            error: This rank's error in the phase, or ``None``.
            report: This rank's report, if any: its ``seconds`` become the mean over ranks, so that
                every logged value (and ``callback_metrics``) is identical on all ranks.

        Returns:
            ``(error, message)``: this rank's error, a :class:`RankFailedError` when only other ranks
            failed, or ``None``; and the failures of every rank as one line, identical on all ranks.
        """
        local = "" if error is None else f"{type(error).__name__}: {error}"
        if trainer.world_size <= 1:
            return error, local
        seconds = 0.0 if report is None else float(report.seconds)
        flags = torch.tensor(
            [0.0 if error is None else 1.0, seconds], dtype=torch.float32, device=trainer.strategy.root_device
        )
        flags = trainer.strategy.reduce(flags, reduce_op="sum")
        failed = int(flags[0].item())
        if failed == 0:
            if report is not None:
                report.seconds = float(flags[1]) / trainer.world_size
            return None, ""
        messages: list[str] = [local] * trainer.world_size
        if dist.is_available() and dist.is_initialized():
            messages = [""] * dist.get_world_size()
            dist.all_gather_object(messages, local)
        ranks_by_text: dict[str, list[str]] = {}
        for rank, text in enumerate(messages):
            if text:
                ranks_by_text.setdefault(text, []).append(str(rank))
        message = "; ".join(
            f"rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)}: {text}"
            for text, ranks in ranks_by_text.items()
        )
        if error is None:
            error = RankFailedError(f"the Hessian evaluation failed on {failed} other rank(s) ({message})")
        return error, message

    def _skip(self, entry: dict[str, Any], error: BaseException, message: str) -> None:
        """Record a failed evaluation and warn (``on_error="warn"``), or raise it (``"raise"``)."""
        if self.on_error == "raise":
            raise error
        if isinstance(error, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()
        entry.update(ok=False, error=message or f"{type(error).__name__}: {error}")
        self.history.append(entry)
        rank_zero_warn(
            f"HessianCallback: the Hessian evaluation at epoch {entry['epoch']}, step {entry['step']} "
            f"failed ({entry['error']}); it is skipped and training continues. Pass on_error='raise' "
            "to stop training on such errors.",
            category=UserWarning,
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=UserWarning)
