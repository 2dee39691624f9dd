"""Shared pieces of the HessianCallback tests: tiny LightningModules, loaders, trainers, event reading.

Holds no tests itself. Every callback test runs torch on one thread: the models are tiny, and on a
shared 2-core machine intra-op threads only contend.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing import event_accumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

FAST = {"hvp": "reverse-over-reverse"}  # skips the auto method choice: same numbers, less time


class TinyModule(L.LightningModule):
    """Linear(4, 6) -> BatchNorm -> ReLU -> Dropout -> Linear(6, 3): 81 parameters (+12 BN)."""

    def __init__(
        self, dropout: float = 0.25, lr: float = 0.1, momentum: float = 0.9, manual: bool = False
    ) -> None:
        super().__init__()
        self.automatic_optimization = not manual
        self.lr, self.momentum = lr, momentum
        self.net = nn.Sequential(
            nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(dropout), nn.Linear(6, 3)
        )
        self.seen: list[float] = []  # fingerprint of every training batch, in order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        if not self.automatic_optimization:
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            return None
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.seen.append(float(batch[0].sum()))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def cross_entropy(module: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(module(x), y)


def dataset(n: int = 48, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y)


def loader(n: int = 48, batch_size: int = 8, shuffle: bool = True, seed: int = 0) -> DataLoader:
    """A shuffled loader drawing its order from torch's global RNG (the case RNG leaks would break)."""
    return DataLoader(dataset(n, seed), batch_size=batch_size, shuffle=shuffle)


def trainer(root: Path, callbacks: list[Callback] | None = None, **kwargs: Any) -> L.Trainer:
    settings: dict[str, Any] = {
        "max_epochs": 2,
        "default_root_dir": root,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "log_every_n_steps": 1,
        "num_sanity_val_steps": 0,
        "accelerator": "cpu",
        "devices": 1,
    }
    settings.update(kwargs)
    return L.Trainer(callbacks=callbacks or [], **settings)


class Snapshot(Callback):
    """Placed after a HessianCallback: copies the module whenever that callback has just evaluated."""

    def __init__(self, hessian: Callback) -> None:
        self.hessian = hessian
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self._seen = 0

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if len(self.hessian.history) > self._seen:
            self._seen = len(self.hessian.history)
            self.states[trainer.global_step] = copy.deepcopy(pl_module.state_dict())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._check(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._check(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._check(trainer, pl_module)


def events(log_dir: str | Path) -> event_accumulator.EventAccumulator:
    """All events of a run folder (size_guidance 0: keep everything)."""
    guidance = {
        event_accumulator.SCALARS: 0,
        event_accumulator.HISTOGRAMS: 0,
        event_accumulator.IMAGES: 0,
        event_accumulator.TENSORS: 0,
        event_accumulator.COMPRESSED_HISTOGRAMS: 0,
    }
    accumulator = event_accumulator.EventAccumulator(str(log_dir), size_guidance=guidance)
    accumulator.Reload()
    return accumulator


def scalar_series(accumulator: event_accumulator.EventAccumulator, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in accumulator.Scalars(tag)}
