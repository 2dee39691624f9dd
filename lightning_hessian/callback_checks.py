"""The checks :class:`~lightning_hessian.HessianCallback` runs before training, so that a setup mistake
stops ``fit`` with its fix instead of becoming one warning per epoch and nothing logged.

Each function checks one thing: at construction (the loss function's signature, a warm start's
settings), at ``on_fit_start`` once the module's parameters exist (the ``params=``/``blocks=``
patterns, a sharded module's dtype and settings, a warm start's iterative blocks, the schedule against
the trainer's limits, the compute dtype), or at the first captured batch (its size).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from .parameters import resolve_blocks, select_parameters
from .schedule import Schedule
from .settings import AnalysisSettings
from .sharded import SHARDED_HVP
from .shards import has_sharded_parameters

#: Parameter dtypes whose Hessian the callback computes in float32 unless a ``dtype`` is given.
HALF_PRECISION = (torch.float16, torch.bfloat16)


def check_loss_fn(loss_fn: Callable[..., Any]) -> None:
    """Check that ``loss_fn`` can be called as ``loss_fn(module, batch)``.

    Callables without an inspectable signature (some builtins) pass.

    Args:
        loss_fn: The callable given as ``loss_fn=``.

    Raises:
        TypeError: If its signature cannot bind two positional arguments.

    Example:
        >>> check_loss_fn(lambda module, batch: module(batch).sum())
    """
    try:
        signature = inspect.signature(loss_fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(None, None)
    except TypeError as error:
        name = getattr(loss_fn, "__qualname__", type(loss_fn).__name__)
        raise TypeError(
            f"`loss_fn` is called as loss_fn(module, batch), but {name}{signature} cannot be ({error}). "
            "Pass e.g. loss_fn=lambda module, batch: F.cross_entropy(module(batch[0]), batch[1])."
        ) from None


def check_parameter_selection(module: nn.Module, settings: AnalysisSettings) -> None:
    """Check that ``params=`` selects parameters of ``module`` and every ``blocks=`` group matches one.

    Args:
        module: The LightningModule, with its parameters created (``on_fit_start``).
        settings: The callback's analysis settings.

    Raises:
        MisconfigurationException: Naming the pattern, the module's parameters and the fix.
    """
    try:
        selected = select_parameters(module, settings.params)
        resolve_blocks(list(selected), settings.blocks)
    except ValueError as error:
        raise MisconfigurationException(f"HessianCallback: {error}") from error


def check_sharded_settings(module: nn.Module, settings: AnalysisSettings) -> None:
    """Check a sharded module's parameters and the settings against what its Hessian supports.

    A module whose parameters are ``DTensor``s (FSDP2's ``fully_shard`` under ``ModelParallelStrategy``)
    is analyzed by :class:`~lightning_hessian.sharded.ShardedHessianOperator`: its products are
    gradient differences (FSDP2 has no double backward) computed by the sharded module itself, in its
    parameters' dtype, and every block is estimated iteratively. Settings outside these rules would
    fail every evaluation, so they stop ``fit`` here instead. Half-precision parameters are refused:
    gradient differences carry a relative error of about ``10 u^(2/3)`` (``u`` the unit roundoff),
    measured 2.5-7.2% in bfloat16 and 0.6-1.7% in float16 against float64
    (``benchmarks/half_precision.py``), and a sharded module cannot be evaluated in float32 as a whole
    one is. A module with whole parameters passes unchecked.

    Args:
        module: The LightningModule, with its parameters created and sharded (``on_fit_start``).
        settings: The callback's analysis settings (its ``params=`` already checked).

    Raises:
        MisconfigurationException: For float16/bfloat16 sharded parameters (naming ``precision=``),
            ``method="dense"``, an ``hvp`` other than ``"auto"``/``"finite-difference"``, selected
            parameters of several dtypes, or a ``dtype=`` other than the parameters' own.

    Example:
        >>> check_sharded_settings(nn.Linear(2, 2), AnalysisSettings(method="dense"))  # whole: passes
    """
    if not has_sharded_parameters(module):
        return
    dtypes = sorted({p.dtype for p in select_parameters(module, settings.params).values()}, key=str)
    half = [dtype for dtype in dtypes if dtype in HALF_PRECISION]
    if half:
        raise MisconfigurationException(
            f"HessianCallback: the sharded (FSDP2) parameters are {half[0]} (Trainer(precision="
            "'bf16-true') or '16-true'). A sharded model's Hessian comes from gradient differences in "
            "its parameters' dtype, which in half precision were 2.5-7.2% (bfloat16) or 0.6-1.7% (float16) "
            "off. Keep float32 parameters: Trainer(precision='bf16-mixed') (ModelParallelStrategy "
            "supports it; training still computes in bfloat16) or precision='32-true'."
        )
    if settings.method == "dense":
        raise MisconfigurationException(
            "HessianCallback: method='dense' cannot be used with a sharded (FSDP2) model: a dense Hessian "
            "is an N x N matrix on every rank. Pass method='auto' or method='iterative' (every block of "
            "a sharded model is estimated iteratively; a small block's estimates are exact to the "
            "products' accuracy)."
        )
    if settings.hvp not in SHARDED_HVP:
        raise MisconfigurationException(
            f"HessianCallback: analyze_kwargs={{'hvp': {settings.hvp!r}}} cannot be used with a sharded "
            "(FSDP2) model: FSDP2 has no double backward, so its products are gradient differences. Use "
            f"one of {SHARDED_HVP}, or leave 'hvp' out of analyze_kwargs."
        )
    if len(dtypes) > 1:
        raise MisconfigurationException(
            "HessianCallback: the selected sharded parameters have several dtypes "
            f"{[str(d) for d in dtypes]}; a sharded model is analyzed in its parameters' one dtype. Select "
            "parameters of one dtype with params=, or create them all in one dtype."
        )
    if settings.dtype is not None and settings.dtype != dtypes[0]:
        raise MisconfigurationException(
            f"HessianCallback: dtype={settings.dtype} cannot be used with a sharded (FSDP2) model, whose "
            f"products run through the sharded module in its parameters' dtype ({dtypes[0]}). Pass "
            "dtype=None (or that dtype), or create the parameters in the dtype to differentiate in."
        )


def check_warm_start(settings: AnalysisSettings) -> None:
    """Refuse ``warm_start=True`` where no Ritz vector would be kept or used (at construction).

    Args:
        settings: The callback's analysis settings, built with ``keep_vectors=top_k``.

    Raises:
        ValueError: For ``top_k=0`` or ``keep_vectors=0`` (nothing kept), ``krylov="separate"`` or
            ``method="dense"`` (no shared Krylov space to start), naming the argument and the fix.
    """
    if settings.top_k == 0:
        raise ValueError(
            "`warm_start=True` starts each evaluation from the previous top-k Ritz vectors, but top_k=0 "
            "keeps none. Pass top_k >= 1 (e.g. top_k=3), or warm_start=False."
        )
    if settings.keep_vectors == 0:
        raise ValueError(
            "`warm_start=True` needs kept Ritz vectors, but analyze_kwargs={'keep_vectors': 0} keeps none. "
            "Leave 'keep_vectors' out of analyze_kwargs (warm_start keeps top_k of them), or pass "
            "warm_start=False."
        )
    if settings.krylov != "shared":
        raise ValueError(
            f"`warm_start=True` starts the shared Krylov space, but analyze_kwargs={{'krylov': "
            f"{settings.krylov!r}}} uses separate estimators, which ignore the kept vectors. Leave 'krylov' "
            "out of analyze_kwargs (the monitoring default is 'shared'), or pass warm_start=False."
        )
    if settings.method == "dense":
        raise ValueError(
            "`warm_start=True` starts the Krylov space of iterative blocks, but method='dense' computes "
            "every block exactly, without one. Pass method='auto' or 'iterative', or warm_start=False."
        )


def check_warm_start_blocks(module: nn.Module, settings: AnalysisSettings) -> None:
    """Check that ``warm_start=True`` has an iterative block to start (construction checked the rest).

    Under ``method="auto"`` blocks of at most ``dense_limit`` parameters are computed exactly, without
    a Krylov space; when every block is, the kept vectors would never be used. A sharded model's blocks
    are all iterative.

    Args:
        module: The LightningModule, with its parameters created (``on_fit_start``).
        settings: The callback's analysis settings (its ``params=``/``blocks=`` already checked).

    Raises:
        MisconfigurationException: If every block is computed exactly, naming the sizes and the fix.
    """
    if settings.method != "auto" or has_sharded_parameters(module):
        return
    selected = select_parameters(module, settings.params)
    groups = resolve_blocks(list(selected), settings.blocks)
    sizes = {name: sum(selected[p].numel() for p in names) for name, names in groups.items()}
    if all(size <= settings.dense_limit for size in sizes.values()):
        largest = max(sizes.values())
        raise MisconfigurationException(
            f"HessianCallback(warm_start=True) would do nothing: every block has at most dense_limit="
            f"{settings.dense_limit} parameters (the largest {largest}), so each is computed exactly, "
            f"without a Krylov space to start. Pass dense_limit < {largest} or method='iterative' to "
            "estimate blocks iteratively, or warm_start=False."
        )


def warn_unreachable_schedule(schedule: Schedule, max_epochs: int | None, max_steps: int) -> None:
    """Warn when listed epochs lie beyond the trainer's limits, or when nothing can ever be evaluated.

    Args:
        schedule: The callback's schedule.
        max_epochs: ``trainer.max_epochs`` (``None`` or ``-1``: unlimited).
        max_steps: ``trainer.max_steps`` (``-1``: unlimited).
    """
    epoch_limit = None if max_epochs is None or max_epochs < 0 else max_epochs
    step_limit = None if max_steps < 0 else max_steps
    limits = f"max_epochs={max_epochs}, max_steps={max_steps}"
    if epoch_limit is not None:
        beyond = sorted(e for e in schedule.epochs if e >= epoch_limit)
        if beyond:
            rank_zero_warn(
                f"HessianCallback: epochs={beyond} are never reached: training stops after at most "
                f"{epoch_limit} epoch(s) (0-based indices 0 to {epoch_limit - 1}; {limits}). Epochs "
                "are 0-based; lower them or raise max_epochs.",
                category=UserWarning,
            )
    if schedule.at_end:
        return
    fires = (
        any(_within(e + 1, epoch_limit) for e in schedule.epochs)
        or _within(schedule.every_n_epochs, epoch_limit)
        or _within(schedule.every_n_steps, step_limit)
    )
    if not fires:
        rank_zero_warn(
            f"HessianCallback will evaluate nothing: its schedule ({schedule.describe()}) never fires "
            f"within {limits}, and evaluate_at_end=False. Shorten the period, or pass evaluate_at_end=True.",
            category=UserWarning,
        )


def _within(count: int | None, limit: int | None) -> bool:
    """Whether ``count`` epochs (or steps) are reached under ``limit`` (``None``: no limit)."""
    return count is not None and (limit is None or count <= limit)


def compute_dtype(module: nn.Module, dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype to compute the Hessian in: ``dtype``, else float32 for half-precision parameters.

    Half-precision products lose most digits (``benchmarks/half_precision.py``, against float64 at the
    same weights: exact products 0.55-8.7% off in bfloat16, 0.07-2.1% in float16, the most on ReLU
    networks; gradient differences 2.5-7.2% and 0.6-1.7%), and the eigenvalue
    solvers' factorizations have no bfloat16/float16 kernels on every device. In float32 the Hessian
    is that of the float32 evaluation of the network at its half-precision weights, with float32
    accuracy (exact products about 1e-7 relative, gradient differences about 1e-4).

    Args:
        module: The module.
        dtype: The ``dtype=`` the user chose, or ``None`` for the parameters' own.

    Returns:
        ``dtype`` when given; ``torch.float32`` when a trainable parameter is float16 or bfloat16;
        else ``None`` (the parameters' dtype).

    Example:
        >>> compute_dtype(nn.Linear(2, 2).bfloat16(), None)
        torch.float32
    """
    if dtype is not None:
        return dtype
    if any(p.dtype in HALF_PRECISION for p in module.parameters() if p.requires_grad):
        return torch.float32
    return None


def check_batch_size(batch: Any, batch_size_fn: Callable[[Any], int]) -> None:
    """Check that the number of samples of a batch the callback will evaluate on can be told.

    Args:
        batch: A batch as the evaluations will see it (on the module's device).
        batch_size_fn: The callback's ``batch -> number of samples``.

    Raises:
        MisconfigurationException: If ``batch_size_fn`` fails or returns no positive integer.
    """
    try:
        size = int(batch_size_fn(batch))
    except Exception as error:  # noqa: BLE001 - any failure is the same mistake: say how to fix it
        raise MisconfigurationException(
            f"HessianCallback cannot tell the number of samples in a training batch ({error}). Pass "
            "HessianCallback(batch_size_fn=lambda batch: <number of samples in batch>)."
        ) from error
    if size <= 0:
        raise MisconfigurationException(
            f"HessianCallback's batch_size_fn returned {size} for a training batch; it must return the "
            "number of samples, a positive integer."
        )
