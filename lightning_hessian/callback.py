"""``HessianCallback``: curvature of the training loss, logged while a LightningModule trains.

The callback is thin: it decides *when* (:mod:`.schedule`), *on which batches* (captured here, or
from :mod:`.evaluation_data`), calls :func:`lightning_hessian.analysis.analyze_with` with its
:class:`~lightning_hessian.settings.AnalysisSettings` for the numbers, and hands the report to
:mod:`.reporting`. It never changes the training run: the analysis leaves the module, its buffers,
gradients and every random generator as it found them, and the callback draws no random numbers.

A quarter of this module is the documentation of the Trainer-facing class (its arguments, what it
logs, when and at what cost it evaluates); the hooks and the evaluation flow are the rest.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from .analysis import analyze_with
from .budget import OverheadBudget
from .callback_checks import (
    check_batch_size,
    check_loss_fn,
    check_parameter_selection,
    check_sharded_settings,
    check_warm_start,
    check_warm_start_blocks,
    compute_dtype,
    warn_unreachable_schedule,
)
from .distributed import agree_on_failure, trainer_process_group
from .evaluation_data import EvaluationBatches, LightningBatchSize, check_data_source, check_validation_data
from .lightning_internals import check_private_apis, state_key
from .reporting import DEFAULT_PREFIX, ProgressBar, ReportLogger, logging_step, save_report
from .results import HessianReport
from .schedule import Schedule
from .settings import AnalysisSettings
from .stability import unsupported_reason
from .state import preserved_python_state
from .validation import check_bool, check_callable, check_choice, check_int
from .warm_start import RitzVectorStore

if TYPE_CHECKING:
    import lightning.pytorch as pl

ON_ERROR = ("warn", "raise")
#: The analysis settings a monitor can afford (see the class docstring); ``analyze_kwargs`` overrides them.
MONITORING_DEFAULTS = {"krylov": "shared", "tol": 1e-3, "trace_matvecs": 16}
# Strategies that shard parameters across ranks and are refused: FSDP (1) and DeepSpeed need a GPU in
# Lightning, so their sharded path could not be tested here; ModelParallelStrategy with FSDP2 is
# supported (lightning_hessian.sharded). By class name, so that no optional dependency is imported.
SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy")
MODEL_PARALLEL_STRATEGY = "ModelParallelStrategy"


# Callback arguments that `analyze_kwargs` may still carry (they were settings before they were arguments).
ALSO_IN_ANALYZE_KWARGS = frozenset({"batch_size_fn"})


def _check_analyze_kwargs(kwargs: Any) -> dict[str, Any]:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"`analyze_kwargs` must be a dict of analyze() settings, got {kwargs!r}.")
    arguments = set(inspect.signature(HessianCallback.__init__).parameters) - ALSO_IN_ANALYZE_KWARGS
    own = sorted(set(kwargs) & arguments)
    if own:
        raise ValueError(
            f"`analyze_kwargs` sets {own}, which are HessianCallback arguments; pass them directly, "
            f"e.g. HessianCallback({own[0]}=...)."
        )
    return dict(kwargs)


class _AgreedFailure(Exception):
    """A phase of an evaluation failed on some rank; every rank raises it at the same point."""

    def __init__(self, error: BaseException, message: str) -> None:
        super().__init__(message)
        self.error, self.message = error, message


def _sharded_strategy(strategy: Any) -> str | None:
    """The name of the refused parameter-sharding strategy class ``strategy`` is (or derives from)."""
    names = {cls.__name__ for cls in type(strategy).__mro__}
    return next((name for name in SHARDED_STRATEGIES if name in names), None)


def _tensor_parallel_size(strategy: Any) -> int:
    """The tensor-parallel size of a ``ModelParallelStrategy`` (1 when it is not one, or not set up yet)."""
    if MODEL_PARALLEL_STRATEGY not in {cls.__name__ for cls in type(strategy).__mro__}:
        return 1
    try:
        mesh = strategy.device_mesh  # set up in setup_environment, before the callbacks' setup
    except Exception:  # noqa: BLE001 - not set up yet: the operator checks the parameters' mesh
        return 1
    names = mesh.mesh_dim_names or ()
    return int(mesh["tensor_parallel"].size()) if "tensor_parallel" in names else 1


def _setting(name: str) -> property:
    return property(
        lambda self: getattr(self.settings, name), doc=f"The ``{name}`` setting (see :attr:`settings`)."
    )


def _name_of(value: Any) -> str:
    if value is None:
        return "None"
    return getattr(value, "__qualname__", type(value).__name__)


class HessianCallback(Callback):
    """Log the curvature of the training loss (Hessian eigenvalues, trace, spectral density) while training.

    At scheduled points the callback runs :func:`lightning_hessian.analyze` on the LightningModule
    and a fixed set of batches, then logs, at the step of Lightning's own metrics of that batch or
    epoch, for every block ``B``: ``hessian/B/trace``, ``trace_stderr``, ``hessian/B/eigenvalue_1``
    ... ``eigenvalue_k``, ``eigenvalue_min``, ``eigenvalues_converged``, ``hessian/loss``,
    ``hessian/num_matvecs``, ``hessian/seconds`` and ``hessian/overhead`` (curvature seconds per
    training second since ``fit`` started, see ``max_overhead``) to every logger and
    ``trainer.callback_metrics``, with the training dynamics ``hessian/B/stability``,
    ``preconditioned_eigenvalue_1``, ``gradient_alignment``, ``gradient_curvature``,
    ``batch_sharpness`` and ``eigenvector_overlap`` (see their arguments); to TensorBoard, W&B,
    MLflow and CSV loggers also the histogram ``hessian/B/spectrum`` and the figures
    ``hessian/B/density`` and (``landscape=True``) ``hessian/B/landscape``.

    Evaluations happen in ``on_train_epoch_end`` (after that epoch's validation), so a
    ``ModelCheckpoint``/``EarlyStopping`` that monitors a ``hessian/...`` value needs
    ``save_on_train_epoch_end=True`` / ``check_on_train_epoch_end=True`` when the run validates.

    Each ``trainer.fit`` starts a new schedule and captures new batches (the :attr:`history` goes on),
    except the resume of a checkpoint (``fit(..., ckpt_path=...)``), which continues the checkpointed
    run's schedule. Setup mistakes stop ``fit`` before training with a
    ``MisconfigurationException`` naming the fix: ``params=``/``blocks=`` patterns that match no
    parameter, ``data="val"`` without a validation dataloader, manual optimization without
    ``loss_fn``, ``FSDPStrategy``/``DeepSpeedStrategy`` or tensor parallelism (FSDP2 under
    ``ModelParallelStrategy`` is supported: README, "Sharded models"), what an FSDP2 model cannot use
    (half-precision parameters, ``precision="bf16-true"``/``"16-true"``: use ``"bf16-mixed"``;
    ``method="dense"``; an ``hvp`` other than ``"auto"``/``"finite-difference"``; another ``dtype``),
    a training batch whose size cannot be told. A schedule that cannot fire within
    ``max_epochs``/``max_steps`` is a warning.

    With the default loss (the module's ``training_step``) the evaluations run ``training_step``
    again, many times. The callback undoes what that does to the module: ``self.log`` is silenced, and
    afterwards every torchmetrics ``Metric`` of the module holds its states, update count and cached
    result as before, and every submodule's Python number attributes (counters, flags) their values.
    It cannot undo other effects: containers changed in place (a list ``training_step`` appends to),
    tensor attributes that are not parameters, buffers or metric states, ``print``, files, or anything
    outside the module. For a ``training_step`` with such effects pass ``loss_fn=`` computing only the
    loss.

    Monitoring defaults (:data:`MONITORING_DEFAULTS`, each overridable through ``analyze_kwargs``):
    blocks up to ``dense_limit`` parameters are exact (``trace_stderr`` 0). Every larger block is
    estimated from one block Krylov space (``krylov="shared"``) grown from ``density_probes=4``
    Rademacher probes, up to 4 products a block step, for 8 to ``density_steps=32`` steps (from the
    8th on it stops as soon as the wanted eigenvalues have converged). From that space:

    - the top-k and smallest eigenvalues are Ritz values converged to a residual ``||H y - θ y||`` of
      at most ``tol=1e-3`` times the spectral scale ``max |θ|``, so each lies within that distance of
      an eigenvalue (within residual² / gap for an isolated one); ``eigenvalues_converged`` logs the
      share that converged;
    - the density is the space's block Gauss quadrature: its Ritz values as nodes (up to 4 a step),
      weighted by their squared components along the 4 probes, averaged over the probes;
    - the trace is ``tr(QᵀHQ)`` on the space (no sampling error) plus a Hutchinson estimate of the
      rest from ``trace_matvecs=16`` Rademacher probes projected off the space (16 more products);
      ``trace_stderr`` is the standard error of that estimate, the sample standard deviation of its 16
      samples over √16 (0 when the space spans the block).

    For tighter numbers pass e.g.
    ``analyze_kwargs={"tol": 1e-6, "trace_matvecs": 64, "density_steps": 64}``; for the separate
    estimators of :func:`lightning_hessian.analyze`, ``{"krylov": "separate"}``. README, "What it
    costs", has the measured cost and accuracy of these defaults.

    Args:
        every_n_epochs: Evaluate after epochs ``n, 2n, ...`` (counted from 1, like
            ``check_val_every_n_epoch``). When none of ``every_n_epochs``, ``epochs`` and
            ``every_n_steps`` is given, every epoch is evaluated.
        epochs: Explicit 0-based epoch indices to evaluate after.
        every_n_steps: Evaluate every ``n`` optimizer steps (``trainer.global_step``).
        evaluate_at_end: Evaluate once when training ends, unless that model state (global step)
            was just evaluated or ``max_overhead`` has no room for it (see there).
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
            (with ``self.log`` silenced, its metrics and number attributes restored; see above).
            Required with manual optimization, and advisable when ``training_step`` has other side
            effects.
        mode: ``"eval"`` (dropout off, BatchNorm running statistics) or ``"train"``.
        dtype: Compute dtype (``torch.float64`` or ``"float64"``); default the parameters' dtype, except
            for float16/bfloat16 parameters (``precision="bf16-true"``, ``"16-true"``), whose Hessian
            is computed in float32 (said once at the start of ``fit``). A sharded (FSDP2) model is
            computed in its parameters' dtype: ``dtype`` must be ``None`` or that dtype, and
            half-precision sharded parameters stop ``fit`` (``precision="bf16-mixed"`` keeps float32
            parameters).
        seed: Seed of every random probe (the training RNG is never touched).
        method: ``"auto"``, ``"dense"`` or ``"iterative"`` (passed to ``analyze``; ``"dense"`` stops
            ``fit`` for a sharded model).
        dense_limit: Blocks up to this size are computed exactly with ``method="auto"``.
        analyze_kwargs: More settings of :func:`lightning_hessian.analyze` (the
            :class:`~lightning_hessian.settings.AnalysisSettings` this callback has no argument for),
            e.g. ``{"trace_matvecs": 30, "density_steps": 64}``.
        on_error: ``"warn"``: a failed evaluation (NaN loss, non-finite products, out of memory,
            any exception) becomes one warning and a skipped evaluation; ``"raise"``: it stops training.
        histograms: Log ``hessian/B/spectrum`` histograms to loggers that take them.
        figures: Log ``hessian/B/density`` figures to loggers that take them.
        histogram_bins: Bins of a spectral density's histogram.
        save_reports: Save each evaluation's :class:`~lightning_hessian.HessianReport` to
            ``<log_dir>/hessian_reports/epoch=E-step=S.pt`` (read with ``HessianReport.load(path)``).
        progress_bar: Show a progress bar of Hessian-vector products during long evaluations (only
            while the trainer's own progress bar is enabled).
        batch_size_fn: ``batch -> number of samples``, which weights each batch in the mean loss;
            default Lightning's own rule (``extract_batch_size``: the first tensor's first
            dimension), with a warning when a batch's tensors disagree. Pass it for time-major
            tensors or batches without a tensor holding the samples.
        max_overhead: The share of wall time since ``fit`` started that curvature may take (e.g.
            ``0.1``): an evaluation that would push it above, if it took as long as the last one, is
            postponed to the next scheduled point that fits (never made less accurate), with one info
            line the first time; the share can exceed the budget by one evaluation. Every second of
            an evaluation counts: its logging, and a failed evaluation's. The end-of-training
            evaluation (``evaluate_at_end``) obeys the budget too: it is the last scheduled point, so
            when it does not fit it is skipped, with an info line of its own, and the final model is
            not evaluated (pass a larger budget, or ``None``, to have it). ``None`` (default): every
            scheduled evaluation runs. ``hessian/overhead`` (curvature seconds per training second,
            before this evaluation's logging) is logged either way.
        stability: Log ``hessian/B/stability`` (1.0 is the edge of stability: the optimizer, frozen
            at its state, diverges on the local quadratic model above it) and, for adaptive
            optimizers, ``hessian/B/preconditioned_eigenvalue_1`` (:func:`lightning_hessian.stability`).
            Free under SGD with one learning rate per block (read from the top eigenvalue); one
            Lanczos search of ``D^½ H D^½`` under Adam, RMSprop, Adagrad. Needs a single optimizer;
            other optimizers get one warning and no value.
        gradient_geometry: Log ``hessian/B/gradient_alignment`` (the share of the gradient in the
            top-k eigenspace), ``hessian/B/gradient_curvature`` (``gᵀHg / gᵀg``) and
            ``hessian/B/batch_sharpness`` (the mean over the evaluation batches of
            ``g_bᵀH_bg_b / ||g_b||²``): about two products and one gradient per batch.
        eigenvector_overlap: Log ``hessian/B/eigenvector_overlap``, ``||V_prevᵀ V_now||_F² / k`` of
            consecutive evaluations' top-k eigenvectors (kept like the warm-start vectors; skipped at
            the first evaluation of a fit and when they were dropped for memory).
        landscape: Log the figure ``hessian/B/landscape``: the loss along the top two eigenvectors
            and the gradient with the quadratic model ``½ λ t²`` overlaid (forward passes only; 21
            points per direction, ``analyze_kwargs={"landscape_points": n}`` to change). Off by
            default: about 60 loss evaluations per block.
        warm_start: Start each evaluation's Krylov space from the previous evaluation's top Ritz
            vectors of the same block (plus the fresh random probes), kept on the device, else on
            the CPU, else dropped with one info message. A new or resumed ``fit`` starts cold. Off by
            default: with a density the kept vectors widen every block step, which pays only where
            the top eigenvectors turn little between evaluations; without one (``density=False``) a
            warm start is one chain from the kept vectors and a probe (NOTE [Warm start without
            density] in :mod:`~lightning_hessian.shared_space`). README, "What it costs", has the numbers.
            It needs vectors to keep and a Krylov space to start: ``top_k=0``, ``krylov="separate"``
            and ``method="dense"`` are refused at construction, and a run whose blocks are all computed
            exactly (each at most ``dense_limit`` parameters) stops ``fit`` before training.

    Raises:
        TypeError: For an argument of the wrong type (a ``loss_fn`` that cannot be called as
            ``loss_fn(module, batch)`` included), naming it and the fix.
        ValueError: For an argument of the right type but an unsupported value (one batch passed as
            ``data=(x, y)``, ``batch_size_fn`` given both directly and in ``analyze_kwargs``, or
            ``warm_start=True`` with settings under which no vector would be kept or used included),
            naming it and the fix.

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
        batch_size_fn: Callable[[Any], int] | None = None,
        max_overhead: float | None = None,
        warm_start: bool = False,
        stability: bool = True,
        gradient_geometry: bool = True,
        eigenvector_overlap: bool = True,
        landscape: bool = False,
    ) -> None:
        super().__init__()
        self.schedule = Schedule.create(every_n_epochs, epochs, every_n_steps, evaluate_at_end)
        self.data = check_data_source(data)
        if num_batches is None and self.data == "train":
            raise ValueError(
                "`num_batches=None` (all batches) is not supported with data='train'; pass a number "
                "such as num_batches=4."
            )
        self.num_batches = (
            None if num_batches is None else check_int("num_batches", num_batches, 1, "Pass e.g. 4.")
        )
        self.analyze_kwargs = _check_analyze_kwargs(analyze_kwargs)
        self.warm_start = check_bool("warm_start", warm_start)
        keep = top_k if warm_start and isinstance(top_k, int) and not isinstance(top_k, bool) else 0
        more = {**MONITORING_DEFAULTS, "keep_vectors": max(0, keep), **self.analyze_kwargs}
        if batch_size_fn is not None:
            if "batch_size_fn" in more:
                raise ValueError(
                    "`batch_size_fn` is given twice, as an argument and in `analyze_kwargs`; pass it "
                    "once: HessianCallback(batch_size_fn=...)."
                )
            more["batch_size_fn"] = batch_size_fn
        self.settings = AnalysisSettings.create(
            "analyze_kwargs",
            params=params,
            blocks=blocks,
            top_k=top_k,
            min_eigenvalue=min_eigenvalue,
            trace=trace,
            density=density,
            mode=mode,
            dtype=dtype,
            seed=seed,
            method=method,
            dense_limit=dense_limit,
            gradient_geometry=gradient_geometry,
            landscape=landscape,
            **more,
        )
        if self.warm_start:
            check_warm_start(self.settings)
        self.stability = check_bool("stability", stability)
        self.eigenvector_overlap = check_bool("eigenvector_overlap", eigenvector_overlap)
        if loss_fn is not None:
            check_callable("loss_fn", loss_fn, "loss_fn(module, batch) (or None to use training_step)")
            check_loss_fn(loss_fn)
        self.loss_fn = loss_fn
        self.on_error = check_choice(
            "on_error",
            on_error,
            ON_ERROR,
            "Use 'warn' (skip a failed evaluation with a warning) or 'raise' (stop training).",
        )
        self.save_reports = check_bool("save_reports", save_reports)
        self.progress_bar = check_bool("progress_bar", progress_bar)
        self.reporter = ReportLogger(
            DEFAULT_PREFIX,
            histograms=check_bool("histograms", histograms),
            figures=check_bool("figures", figures),
            histogram_bins=check_int("histogram_bins", histogram_bins, 1, "Pass e.g. histogram_bins=64."),
        )
        self.history: list[dict[str, Any]] = []
        self.last_report: HessianReport | None = None
        self._batches = EvaluationBatches(self.data, self.num_batches)
        self._last_step: int | None = None
        self._epoch: int | None = None  # the epoch in progress (the last one trained, at the end)
        self._report_dir: Path | None = None
        self._warned: set[str] = set()
        self._lightning_batch_size = LightningBatchSize()
        self._resuming = False  # load_state_dict ran since the last fit started: continue its run
        self.budget = OverheadBudget(max_overhead)
        self._ritz = RitzVectorStore(rank_zero_info, "Ritz vectors (warm_start=True)")
        self._eigenvectors = RitzVectorStore(  # the previous top-k, for the overlap
            rank_zero_info,
            "top eigenvectors (eigenvector_overlap=True)",
            f"the evaluation after a drop does not log {DEFAULT_PREFIX}/{{block}}/eigenvector_overlap",
        )

    params = _setting("params")
    blocks = _setting("blocks")
    top_k = _setting("top_k")
    min_eigenvalue = _setting("min_eigenvalue")
    trace = _setting("trace")
    density = _setting("density")
    mode = _setting("mode")
    dtype = _setting("dtype")
    seed = _setting("seed")
    method = _setting("method")
    dense_limit = _setting("dense_limit")
    gradient_geometry = _setting("gradient_geometry")
    landscape = _setting("landscape")

    # ------------------------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        """Identifies this callback's state in a checkpoint; differs between different settings."""
        data = self.data if isinstance(self.data, str) else type(self.data).__name__
        return state_key(
            self,
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
            "fingerprint": self._batches.fingerprint,
            "num_batches": len(self._batches.batches),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history and schedule position of a checkpointed run.

        The next ``fit`` continues that run instead of starting a new one. The batches themselves are
        not checkpointed: they are captured again after the resume, and a warning says so if they
        differ from the checkpointed run's (by fingerprint).
        """
        self.history = [dict(entry) for entry in state_dict.get("history", [])]
        self._last_step = state_dict.get("last_step")
        self._batches = EvaluationBatches(self.data, self.num_batches)
        self._batches.expected_fingerprint = state_dict.get("fingerprint")
        self._resuming = True

    @property
    def batches(self) -> list[Any]:
        """The batches evaluations run on (on the module's device); empty until captured."""
        return list(self._batches.batches)

    @property
    def batches_fingerprint(self) -> str | None:
        """SHA-256 fingerprint of :attr:`batches` once they are final, else ``None``."""
        return self._batches.fingerprint

    # ------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Reject unsupported sharded strategies and a manual-optimization module without ``loss_fn``;
        resolve the report folder.

        ``ModelParallelStrategy`` with FSDP2's ``fully_shard`` (data parallel, ``tensor_parallel_size=1``)
        is supported: the Hessian is then computed on each rank's shards (README, "Sharded models").

        Raises:
            MisconfigurationException: For ``FSDPStrategy`` or ``DeepSpeedStrategy``, tensor
                parallelism, or manual optimization without ``loss_fn``.
        """
        if stage != "fit":
            return
        check_private_apis(trainer if self.data == "val" else None)
        sharded = _sharded_strategy(trainer.strategy)
        if sharded is not None:
            raise MisconfigurationException(
                f"HessianCallback does not support {sharded}: it shards the parameters across ranks, "
                "and its sharded path needs a GPU in Lightning, where it is untested. Shard with FSDP2 "
                "under strategy=ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) and "
                "fully_shard in configure_model (runs on CPU too), or use a data-parallel strategy "
                "(strategy='ddp' or 'ddp_spawn')."
            )
        if _tensor_parallel_size(trainer.strategy) > 1:
            raise MisconfigurationException(
                "HessianCallback supports ModelParallelStrategy for FSDP2 data parallelism only, not "
                "tensor parallelism: pass ModelParallelStrategy(data_parallel_size=N, "
                "tensor_parallel_size=1) and fully_shard the model in configure_model."
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

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the setup against the module (its parameters exist now) and the trainer; start a new
        schedule and a new capture of batches, unless this fit resumes a checkpointed run.

        Raises:
            MisconfigurationException: For ``params=``/``blocks=`` patterns that match no parameter,
                ``data="val"`` in a run without a validation dataloader, or, for a sharded (FSDP2)
                model, half-precision parameters, ``method="dense"``, an exact ``hvp`` or another
                ``dtype`` (:func:`~lightning_hessian.callback_checks.check_sharded_settings`), or
                ``warm_start=True`` when every block is computed exactly.
        """
        module = trainer.lightning_module or pl_module
        check_parameter_selection(module, self.settings)
        check_sharded_settings(module, self.settings)
        if self.warm_start:
            check_warm_start_blocks(module, self.settings)
        if self.data == "val":
            check_validation_data(trainer)
        warn_unreachable_schedule(self.schedule, trainer.max_epochs, trainer.max_steps)
        if not self._resuming:
            self._last_step, self._epoch = None, None
            self._batches = EvaluationBatches(self.data, self.num_batches)
            self._warned.clear()
        self._resuming = False
        self.budget.start()
        self._ritz.clear()  # a new or resumed run starts cold
        self._eigenvectors.clear()  # and its first evaluation has no overlap to report
        dtype = compute_dtype(module, self.settings.dtype)
        if dtype != self.settings.dtype and "dtype" not in self._warned:
            self._warned.add("dtype")
            rank_zero_info(
                f"HessianCallback: the parameters are in half precision; the Hessian is computed in "
                f"{dtype} (pass dtype= to choose)."
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Forget a loaded checkpoint that no ``fit`` resumed (``validate(ckpt_path=...)`` loads one too)."""
        self._resuming = False

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remember the epoch in progress (``current_epoch`` moves on before ``on_train_end``)."""
        self._epoch = trainer.current_epoch

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """With ``data="train"``, copy the first ``num_batches`` batches (already on the device).

        Raises:
            MisconfigurationException: If the number of samples in the first batch cannot be told.
        """
        first = not self._batches.batches
        self._batches.capture(batch)
        if first and self._batches.batches:
            check_batch_size(self._batches.batches[0], self._batch_size_fn)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Evaluate every ``every_n_steps`` optimizer steps."""
        if self.schedule.step_due(trainer.global_step) and trainer.global_step != self._last_step:
            self._evaluate(trainer, pl_module, "step")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Freeze the captured training batches; evaluate when the epoch is scheduled."""
        if self.data == "train":
            self._batches.finalize()
        if not self.schedule.epoch_due(trainer.current_epoch):
            return
        if trainer.global_step == self._last_step:
            return  # this model state was just evaluated (by every_n_steps, or before a checkpoint)
        self._evaluate(trainer, pl_module, "epoch")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate the final model unless its state (global step) was just evaluated."""
        if self.schedule.at_end and trainer.global_step != self._last_step:
            self._evaluate(trainer, pl_module, "end")

    # ------------------------------------------------------------------------------------ work
    @property
    def _batch_size_fn(self) -> Callable[[Any], int]:
        return self.settings.batch_size_fn or self._lightning_batch_size

    def _analysis_settings(self, module: pl.LightningModule) -> AnalysisSettings:
        """The settings of an evaluation: the user's, with the batch-size rule and compute dtype filled in."""
        return dataclasses.replace(
            self.settings,
            batch_size_fn=self._batch_size_fn,
            dtype=compute_dtype(module, self.settings.dtype),
        )

    def _evaluation_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
        batches = self._batches.get(trainer, pl_module.device)
        if not self._batches.final:
            self._warn_once(
                "partial",
                f"HessianCallback: evaluating at step {trainer.global_step} on the {len(batches)} "
                f"training batch(es) captured so far; later evaluations use all {self.num_batches}.",
            )
        return batches

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reason: str) -> None:
        """Run one evaluation on every rank; the ranks agree on each phase's outcome.

        Under a data-parallel strategy every rank analyzes its own batches and the operator sums the
        products over ranks, so each phase (batches, analysis, logging) ends with one small agreement:
        a failure on one rank (NaN, out of memory, no batch) makes every rank skip
        (``on_error="warn"``) or raise (``on_error="raise"``) at the same point.
        """
        step = trainer.global_step
        epoch = trainer.current_epoch if self._epoch is None else self._epoch
        module = trainer.lightning_module or pl_module  # never the DDP wrapper
        if not self._budget_allows(trainer, epoch, step, reason):
            return
        self._last_step = step
        entry: dict[str, Any] = {"epoch": epoch, "step": step, "reason": reason}
        start, recorded = self.budget.clock(), None
        try:
            batches = self._agreed(trainer, lambda: self._evaluation_batches(trainer, module))
            entry["num_batches"] = len(batches)
            report = self._agreed(trainer, lambda: self._analyze(trainer, module, batches, epoch))
            self._keep_vectors(report)
            recorded = self.budget.clock()
            self.budget.record(recorded - start)
            # Each rank measures its own clock; the mean over ranks is logged, identical everywhere.
            overhead = (
                agree_on_failure(
                    None,
                    trainer_process_group(trainer),
                    device=trainer.strategy.root_device,
                    values=[self.budget.overhead],
                ).values[0]
                / trainer.world_size
            )
            extra = {"overhead": overhead}
            metrics = self._agreed(trainer, lambda: self._log(trainer, report, epoch, step, reason, extra))
        except _AgreedFailure as failure:
            self._count_seconds(start, recorded)
            self._skip(entry, failure.error, failure.message)
            return
        self._count_seconds(start, recorded)
        entry.update(ok=True, wall_seconds=self.budget.clock() - start, **metrics)
        entry["hvp"] = {name: block.hvp for name, block in report.blocks.items()}  # the product method
        self.history.append(entry)
        self.last_report = report

    def _keep_vectors(self, report: HessianReport) -> None:
        """Keep what the next evaluation needs (warm-start and top-k vectors), then take the vectors
        out of the report: they are not logged or saved unless ``eigenvectors`` was asked for.
        """
        if self.warm_start:
            self._ritz.keep({name: block.ritz_vectors for name, block in report.blocks.items()})
        if self.eigenvector_overlap:
            self._eigenvectors.keep(
                {name: b.eigenvalues.vectors if b.eigenvalues else None for name, b in report.blocks.items()}
            )
        for block in report.blocks.values():
            block.ritz_vectors = None
            if block.eigenvalues is not None and not self.settings.eigenvectors:
                block.eigenvalues.vectors = None

    def _count_seconds(self, start: float, recorded: float | None) -> None:
        """Count an evaluation's seconds after the analysis (its logging), or all of a failed one's."""
        now = self.budget.clock()
        if recorded is None:
            self.budget.record_failure(now - start)
        else:
            self.budget.extend(now - recorded)

    def _budget_allows(self, trainer: pl.Trainer, epoch: int, step: int, reason: str) -> bool:
        """Whether the overhead budget lets this evaluation run (agreed by every rank)."""
        postpone = agree_on_failure(
            None,
            trainer_process_group(trainer),
            device=trainer.strategy.root_device,
            values=[float(not self.budget.allows())],
            op="max",
        ).values[0]
        if not postpone:
            return True
        budget = f"max_overhead={self.budget.max_share:g} of the wall time"
        if reason == "end":
            self._inform_once(
                "budget-end",
                f"HessianCallback: the evaluation at the end of training (epoch {epoch}, step {step}) is "
                f"skipped: it would push curvature above {budget}, and no scheduled point is left to "
                f"postpone it to (the last evaluation was at step {self._last_step}). Pass a larger "
                "max_overhead (or None) to evaluate the final model, or call lightning_hessian.analyze "
                "on it after fit.",
            )
        else:
            self._inform_once(
                "budget",
                f"HessianCallback: the evaluation at epoch {epoch}, step {step} is postponed to the next "
                f"scheduled point that fits the budget, to keep curvature within {budget} (it would take "
                "about as long as the last one). Later postponements are not reported.",
            )
        return False

    def _agreed(self, trainer: pl.Trainer, phase: Callable[[], Any]) -> Any:
        """Run one phase on every rank and agree on its outcome (one small all-reduce).

        A report's ``seconds`` becomes the mean over ranks, so that every logged value (and
        ``callback_metrics``) is identical on all ranks.

        Raises:
            _AgreedFailure: On every rank when the phase failed on any rank, with this rank's error (or
                the agreed :class:`RankFailedError`) and every rank's failure as one line.
        """
        result, error = None, None
        try:
            result = phase()
        except Exception as caught:  # noqa: BLE001 - agreed with the other ranks below
            error = caught
        report = result if isinstance(result, HessianReport) else None
        agreement = agree_on_failure(
            error,
            trainer_process_group(trainer),
            device=trainer.strategy.root_device,
            values=[0.0 if report is None else float(report.seconds)],
            what="the Hessian evaluation",
        )
        if agreement.error is not None:
            raise _AgreedFailure(agreement.error, agreement.message)
        if report is not None:
            report.seconds = agreement.values[0] / trainer.world_size
        return result

    def _analyze(
        self, trainer: pl.Trainer, module: pl.LightningModule, batches: list[Any], epoch: int
    ) -> HessianReport:
        show = self.progress_bar and trainer.progress_bar_callback is not None and trainer.is_global_zero
        description = f"Hessian (epoch {epoch}, step {trainer.global_step})"
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            preserved_python_state(module),
            ProgressBar.shown(show, description) as bar,
        ):
            report = analyze_with(
                module,
                self.loss_fn,
                batches,
                self._analysis_settings(module),
                process_group=trainer_process_group(trainer),
                progress=bar,
                start_vectors=self._ritz.vectors if self.warm_start else None,
                optimizer=self._optimizer(trainer) if self.stability else None,
                previous_vectors=self._eigenvectors.vectors if self.eigenvector_overlap else None,
            )
        bad = report.non_finite()
        if bad:
            raise FloatingPointError(
                f"non-finite curvature ({', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}); the loss "
                f"at the evaluated batches is {report.loss}"
            )
        return report

    def _optimizer(self, trainer: pl.Trainer) -> torch.optim.Optimizer | None:
        """The optimizer whose stability is logged, or ``None`` (saying why, once)."""
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            self._warn_once(
                "stability-optimizers",
                f"HessianCallback: stability needs the one optimizer that trains the model, found "
                f"{len(optimizers)}; hessian/*/stability is not logged (pass stability=False to "
                "silence this).",
            )
            return None
        reason = unsupported_reason(optimizers[0])
        if reason is None:
            return optimizers[0]
        if "has not taken a step yet" in reason:
            return None  # the next evaluation has its moment estimates
        self._warn_once(
            "stability-unsupported",
            f"HessianCallback: no stability value: {reason}. hessian/*/stability is not logged (pass "
            "stability=False to silence this).",
        )
        return None

    def _log(
        self,
        trainer: pl.Trainer,
        report: HessianReport,
        epoch: int,
        step: int,
        reason: str,
        extra: dict[str, float],
    ) -> dict[str, float]:
        metrics = self.reporter.log(trainer, report, logging_step(trainer, reason), epoch, extra)
        if self._report_dir is not None:
            save_report(report, self._report_dir / f"epoch={epoch}-step={step}.pt")
        return metrics

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

    def _inform_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_info(message)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=UserWarning)
