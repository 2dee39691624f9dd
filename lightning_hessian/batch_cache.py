"""The batches :class:`~lightning_hessian.HessianCallback` evaluates on: captured from training as
they pass, taken from the validation dataloader, or given by the user, always on the module's device.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import CombinedLoader
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from .closure import preserved_rng_state

if TYPE_CHECKING:
    import lightning.pytorch as pl

DATA_SOURCES = ("train", "val")


def detached_copy(batch: Any) -> Any:
    """Copy every tensor of a (nested) batch, detached from any graph, on the same device.

    Args:
        batch: A tensor or a nested list/tuple/dict/dataclass of tensors.

    Returns:
        The same structure holding fresh copies (non-tensor leaves are shared).

    Example:
        >>> x = torch.ones(2, requires_grad=True)
        >>> detached_copy({"x": x})["x"].requires_grad
        False
    """
    return apply_to_collection(batch, Tensor, lambda t: t.detach().clone())


def _tensors(batch: Any) -> list[Tensor]:
    found: list[Tensor] = []
    apply_to_collection(batch, Tensor, found.append)
    return found


def fingerprint(batches: Sequence[Any]) -> str:
    """A SHA-256 digest of the batches' tensors (dtype, shape and values) in order.

    Two lists of batches with equal tensors have equal fingerprints on any device, so a resumed
    run can tell whether it evaluates on the same samples as the checkpointed one.

    Args:
        batches: Batches (tensors or nested containers of tensors).

    Returns:
        A hex digest.

    Example:
        >>> fingerprint([torch.zeros(2)]) == fingerprint([torch.zeros(2)])
        True
    """
    digest = hashlib.sha256()
    for index, batch in enumerate(batches):
        digest.update(f"batch{index}".encode())
        for tensor in _tensors(batch):
            flat = tensor.detach().reshape(-1).contiguous().cpu()
            digest.update(f"{flat.dtype}{tuple(tensor.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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
    module = trainer.lightning_module
    batch = trainer.precision_plugin.convert_input(batch)
    batch = module._on_before_batch_transfer(batch, dataloader_idx=dataloader_idx)
    return trainer.strategy.batch_to_device(batch, dataloader_idx=dataloader_idx)


def validation_loader(trainer: pl.Trainer) -> Any:
    """The (first) validation dataloader of a ``fit`` run, loading it if Lightning has not yet.

    Raises:
        ValueError: If the run has no validation dataloader.
    """
    loader = first_loader(trainer.val_dataloaders)
    if loader is None:
        source = trainer.fit_loop.epoch_loop.val_loop._data_source
        if source.is_defined():
            loader = first_loader(source.dataloader())
    if loader is None:
        raise ValueError(
            "HessianCallback(data='val') needs a validation dataloader, but this run has none. "
            "Define `val_dataloader()` (or pass `val_dataloaders=` to `fit`), or use data='train' or "
            "data=<a list of batches or a DataLoader>."
        )
    return loader
