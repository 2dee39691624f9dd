"""The only module that touches Lightning's private APIs; each use has its reason.

Lightning offers no public way to do these few things. Keeping them here means a Lightning upgrade
that removes one breaks exactly one place, and :func:`check_private_apis` (run by the test suite and
by ``HessianCallback.setup``) names what is gone instead of failing deep inside an evaluation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.core import LightningModule

if TYPE_CHECKING:
    import lightning.pytorch as pl


class LightningAPIError(RuntimeError):
    """A private Lightning API this library relies on is missing from the installed Lightning."""


def validation_source_loader(trainer: pl.Trainer) -> Any:
    """The validation dataloader(s) the fit loop will load, before Lightning has loaded them.

    Reason: ``trainer.val_dataloaders`` stays ``None`` until the first validation run, and an
    evaluation may come first (``num_sanity_val_steps=0``, or ``every_n_steps``); the fit loop's
    ``_data_source`` is where Lightning itself resolves the dataloader from the module or datamodule.

    Returns:
        The dataloader(s), or ``None`` when the run defines none.
    """
    source = trainer.fit_loop.epoch_loop.val_loop._data_source
    return source.dataloader() if source.is_defined() else None


def validation_source_defined(trainer: pl.Trainer) -> bool:
    """Whether the fit run defines a validation dataloader, without calling the hook that makes it.

    Reason: as for :func:`validation_source_loader`; ``is_defined`` is how Lightning itself decides
    whether a run validates, and it does not run the user's ``val_dataloader()``.
    """
    return bool(trainer.fit_loop.epoch_loop.val_loop._data_source.is_defined())


def before_batch_transfer(module: LightningModule, batch: Any, dataloader_idx: int) -> Any:
    """Run the module's ``on_before_batch_transfer`` hook as Lightning's loops do.

    Reason: the public hook ``on_before_batch_transfer`` is called by the loops through this private
    wrapper, which also handles the hook's profiling and its ``dataloader_idx``; calling the wrapper
    keeps a batch the user passes with ``data=`` identical to what training sees.
    """
    return module._on_before_batch_transfer(batch, dataloader_idx=dataloader_idx)


def state_key(callback: Callback, **settings: Any) -> str:
    """The callback's key in a checkpoint, built from the settings that distinguish its instances.

    Reason: ``Callback._generate_state_key`` is the protected helper Lightning's own callbacks
    (``ModelCheckpoint``, ``EarlyStopping``) use, so keys stay in the format Lightning expects.
    """
    return callback._generate_state_key(**settings)


def batches_that_stepped(trainer: pl.Trainer) -> int:
    """The number of training batches that ran an optimizer step: the step Lightning logs metrics at.

    Reason: Lightning's logger connector logs its metrics at ``fit_loop.epoch_loop._batches_that_stepped``
    (one less for an epoch's metrics), not at ``global_step`` (which counts every optimizer's steps);
    values logged at the same step land in the same row of ``metrics.csv`` and step of TensorBoard.
    """
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def check_private_apis(trainer: pl.Trainer | None = None) -> None:
    """Check that every private API used above exists on the installed Lightning (and ``trainer``).

    Args:
        trainer: A trainer whose fit loop must offer the validation data source (any state: the loops
            exist from its construction), or ``None`` to check the classes only.

    Raises:
        LightningAPIError: Naming what is missing and the Lightning version.
    """
    import lightning

    missing = [
        name
        for name, present in (
            (
                "LightningModule._on_before_batch_transfer",
                hasattr(LightningModule, "_on_before_batch_transfer"),
            ),
            ("Callback._generate_state_key", hasattr(Callback, "_generate_state_key")),
            ("loops._TrainingEpochLoop._batches_that_stepped", _sets_batches_that_stepped()),
            (
                "trainer.fit_loop.epoch_loop.val_loop._data_source",
                trainer is None or _has_validation_source(trainer),
            ),
        )
        if not present
    ]
    if missing:
        raise LightningAPIError(
            f"lightning_hessian relies on private Lightning APIs that Lightning {lightning.__version__} "
            f"does not have: {', '.join(missing)}. Install a Lightning version this lightning_hessian "
            "release supports (see its requirements)."
        )


def _has_validation_source(trainer: pl.Trainer) -> bool:
    loop = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "val_loop", None)
    source = getattr(loop, "_data_source", None)
    return all(callable(getattr(source, name, None)) for name in ("is_defined", "dataloader"))


def _sets_batches_that_stepped() -> bool:
    # An instance attribute: check that the loop's constructor assigns it (it is in the code's names).
    try:
        from lightning.pytorch.loops import _TrainingEpochLoop
    except ImportError:
        return False
    code = getattr(_TrainingEpochLoop.__init__, "__code__", None)
    return code is not None and "_batches_that_stepped" in code.co_names
