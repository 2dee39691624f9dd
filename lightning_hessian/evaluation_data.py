"""Where :class:`~lightning_hessian.HessianCallback`'s batches come from: a trainer's dataloaders.

Taking batches from a dataloader must not change the training run (its batch order and every random
generator are restored), and batches must reach the module's device exactly as training moves them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import CombinedLoader, rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from .batches import detached_copy, fingerprint, iter_tensors
from .lightning_internals import before_batch_transfer, validation_source_defined, validation_source_loader
from .state import preserved_rng_state
from .validation import check_choice

if TYPE_CHECKING:
    import lightning.pytorch as pl

DATA_SOURCES = ("train", "val")
NO_VALIDATION_DATA = (
    "HessianCallback(data='val') needs a validation dataloader, but this run has none. "
    "Define `val_dataloader()` (or pass `val_dataloaders=` to `fit`), or use data='train' or "
    "data=<a list of batches or a DataLoader>."
)
BATCH_SIZE_FIX = "Pass HessianCallback(batch_size_fn=lambda batch: <number of samples in batch>)."


def looks_like_one_batch(value: Any) -> bool:
    """Whether a ``data=`` tuple or list is almost surely one batch rather than a list of batches.

    A tuple of two or more tensors sharing their first dimension is read as one batch, e.g.
    ``(x, y)``; so is such a list when its tensors differ in dtype (inputs and integer labels), since
    the tensor batches of one list share their dtype.

    Example:
        >>> looks_like_one_batch((torch.zeros(8, 3), torch.zeros(8, dtype=torch.long)))
        True
        >>> looks_like_one_batch([torch.zeros(8, 3), torch.zeros(8, 3)])
        False
    """
    if not isinstance(value, tuple | list) or len(value) < 2:
        return False
    if not all(isinstance(item, Tensor) and item.ndim > 0 for item in value):
        return False
    if len({item.shape[0] for item in value}) != 1:
        return False
    return isinstance(value, tuple) or len({item.dtype for item in value}) > 1


def check_data_source(value: Any) -> str | Iterable[Any]:
    """Check a ``data=`` argument: ``"train"``, ``"val"`` or an iterable of batches.

    Raises:
        TypeError: For a tensor (a single batch) or a non-iterable.
        ValueError: For an unknown source name, or one batch passed as ``data=(x, y)`` (see
            :func:`looks_like_one_batch`).

    Example:
        >>> check_data_source("val")
        'val'
    """
    if isinstance(value, str):
        return check_choice(
            "data",
            value,
            DATA_SOURCES,
            "Use 'train' (the first training batches, cached as they pass), 'val' (the first validation "
            "batches) or an iterable of batches (a list of batches or a DataLoader).",
        )
    if isinstance(value, Tensor) or not isinstance(value, Iterable):
        raise TypeError(
            f"`data` must be 'train', 'val' or an iterable of batches (a list or a DataLoader), got "
            f"{type(value).__name__}; wrap a single batch in a list: data=[batch]."
        )
    if looks_like_one_batch(value):
        shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in value)
        raise ValueError(
            f"`data` is a {type(value).__name__} of {len(value)} tensors sharing their first dimension "
            f"({shapes}): that is one batch, which `data` would read as {len(value)} batches. Wrap it "
            "in a list: data=[(x, y)] (a list of batches). If these really are separate batches, pass "
            "them as a list of batches of the form the loss expects."
        )
    return value


def _generators(loader: Any) -> list[torch.Generator]:
    """The private generators a DataLoader (or its samplers) draws from while iterating."""
    found = []
    for owner in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        for candidate in (owner, getattr(owner, "sampler", None)):
            generator = getattr(candidate, "generator", None)
            if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
                found.append(generator)
    return found


@contextlib.contextmanager
def preserved_loader_state(loader: Any, devices: Sequence[torch.device] = ()) -> Iterator[None]:
    """Restore every global RNG and the loader's own generators on exit.

    Iterating a shuffled DataLoader draws a seed from torch's global generator (or from the loader's
    ``generator``); restoring both keeps the training run's batch order unchanged.
    """
    generators = _generators(loader)
    states = [g.get_state() for g in generators]
    with preserved_rng_state(devices):
        try:
            yield
        finally:
            for generator, state in zip(generators, states, strict=True):
                generator.set_state(state)


def first_loader(loaders: Any) -> Any:
    """The first dataloader of Lightning's possibly nested collection of dataloaders."""
    if isinstance(loaders, CombinedLoader):
        loaders = loaders.iterables
    if isinstance(loaders, Mapping):
        return first_loader(next(iter(loaders.values()))) if loaders else None
    if isinstance(loaders, list | tuple):
        return first_loader(loaders[0]) if loaders else None
    return loaders


def take_first(
    loader: Iterable[Any], num_batches: int | None, devices: Sequence[torch.device] = ()
) -> list[Any]:
    """The first ``num_batches`` batches of ``loader`` (all for ``None``), without a trace on any RNG.

    Args:
        loader: A DataLoader or any iterable of batches.
        num_batches: How many batches to take; ``None`` for all.
        devices: CUDA devices whose generators to preserve as well.

    Returns:
        The batches, as the loader yields them.
    """
    with preserved_loader_state(loader, devices):
        iterator = iter(loader)
        try:
            return list(islice(iterator, num_batches))
        finally:
            del iterator  # shuts down DataLoader workers


def to_module_device(trainer: pl.Trainer, batch: Any, dataloader_idx: int = 0) -> Any:
    """Move a batch to the module's device exactly as Lightning's training loop does.

    The precision plugin's input conversion, the LightningModule's ``on_before_batch_transfer``,
    then the strategy's ``batch_to_device`` (``transfer_batch_to_device`` and
    ``on_after_batch_transfer``).

    Args:
        trainer: The running trainer.
        batch: A batch from a dataloader.
        dataloader_idx: Passed to the LightningModule's batch hooks.

    Returns:
        The batch on the device.
    """
    batch = trainer.precision_plugin.convert_input(batch)
    batch = before_batch_transfer(trainer.lightning_module, batch, dataloader_idx)
    return trainer.strategy.batch_to_device(batch, dataloader_idx=dataloader_idx)


def validation_loader(trainer: pl.Trainer) -> Any:
    """The (first) validation dataloader of a ``fit`` run, loading it if Lightning has not yet.

    Raises:
        ValueError: If the run has no validation dataloader.
    """
    loader = first_loader(trainer.val_dataloaders)
    if loader is None:
        loader = first_loader(validation_source_loader(trainer))
    if loader is None:
        raise ValueError(NO_VALIDATION_DATA)
    return loader


def check_validation_data(trainer: pl.Trainer) -> None:
    """Check, before training, that a ``fit`` run has a validation dataloader (without loading it).

    Raises:
        MisconfigurationException: If the run defines no validation dataloader.
    """
    if first_loader(trainer.val_dataloaders) is None and not validation_source_defined(trainer):
        raise MisconfigurationException(NO_VALIDATION_DATA)


class LightningBatchSize:
    """``batch -> number of samples`` by Lightning's own rule (``extract_batch_size``, as ``self.log``).

    HessianCallback's default ``batch_size_fn``. The size weights each batch in the mean loss. When a
    batch's tensors disagree on their first dimension (a time-major tensor, or a per-batch tensor),
    the first tensor's first dimension counts, as in Lightning, and one warning says how to choose.

    Example:
        >>> LightningBatchSize()((torch.zeros(8, 3), torch.zeros(8)))
        8
    """

    def __init__(self) -> None:
        self.warned = False

    def __call__(self, batch: Any) -> int:
        """The number of samples in ``batch``.

        Raises:
            ValueError: If Lightning's rule finds no tensor in the batch, naming ``batch_size_fn``.
        """
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Lightning's ambiguity warning advises `self.log`; see below
            try:
                size = int(extract_batch_size(batch))
            except (MisconfigurationException, RecursionError) as error:
                raise ValueError(
                    f"HessianCallback cannot tell the number of samples in a batch of type "
                    f"{type(batch).__name__}: Lightning's batch-size rule finds no tensor in it. "
                    f"{BATCH_SIZE_FIX}"
                ) from error
        firsts = sorted({int(t.shape[0]) for t in iter_tensors(batch) if t.ndim > 0})
        if firsts and firsts != [size] and not self.warned:
            self.warned = True
            rank_zero_warn(
                f"HessianCallback: the tensors of a batch disagree on their first dimension ({firsts}); "
                f"it counts {size} samples per batch (the first tensor's first dimension, as Lightning "
                "does), which weights the batches in the mean loss. If that is not the number of "
                f"samples (a time-major tensor, say): {BATCH_SIZE_FIX}",
                category=UserWarning,
            )
        return size


class EvaluationBatches:
    """The batches a callback evaluates on: chosen once, then fixed, with their fingerprint.

    Args:
        source: ``"train"`` (captured from training as they pass), ``"val"`` (the validation
            dataloader) or an iterable of batches.
        num_batches: How many batches to use (``None``: all of ``source``; not for ``"train"``).

    Example:
        >>> batches = EvaluationBatches("train", 2)
        >>> batches.capture(torch.zeros(4, 3)); batches.capture(torch.ones(4, 3))
        >>> batches.final, len(batches.batches)
        (True, 2)
    """

    def __init__(self, source: str | Iterable[Any], num_batches: int | None) -> None:
        self.source = source
        self.num_batches = num_batches
        self.batches: list[Any] = []
        self.final = False
        self.fingerprint: str | None = None
        #: The fingerprint of a checkpointed run's batches, to compare after a resume.
        self.expected_fingerprint: str | None = None

    def capture(self, batch: Any) -> None:
        """With ``source="train"``, copy a training batch (already on the device) until there are enough."""
        if self.source != "train" or self.final:
            return
        self.batches.append(detached_copy(batch))
        if len(self.batches) >= (self.num_batches or 0):
            self.finalize()

    def finalize(self) -> None:
        """Fix the batches; warn when they differ from the checkpointed run's."""
        if self.final or not self.batches:
            return
        self.final = True
        self.fingerprint = fingerprint(self.batches)
        if self.expected_fingerprint is not None and self.expected_fingerprint != self.fingerprint:
            rank_zero_warn(
                "HessianCallback: the batches captured after resuming differ from those of the "
                "checkpointed run, so curvature before and after the resume is measured on different "
                "samples. For identical samples across resumes pass fixed batches (data=[...]) or "
                "data='val' with an unshuffled validation dataloader.",
                category=UserWarning,
            )

    def get(self, trainer: pl.Trainer, device: torch.device) -> list[Any]:
        """The batches to evaluate on now, taking them from the dataloader the first time.

        Raises:
            RuntimeError: With ``"train"``, if no batch has been captured yet.
            ValueError: If the data source yields no batch.
        """
        if self.source == "train":
            if not self.batches:
                raise RuntimeError("no training batch has been captured yet")
            return self.batches
        if not self.final:
            loader = validation_loader(trainer) if self.source == "val" else self.source
            raw = take_first(loader, self.num_batches, [device])
            if not raw:
                raise ValueError(f"HessianCallback: data={self.source!r} yielded no batch.")
            with torch.no_grad():
                self.batches = [to_module_device(trainer, b) for b in raw]
            self.finalize()
        return self.batches
