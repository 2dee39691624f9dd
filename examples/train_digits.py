"""Train a small CNN on scikit-learn's bundled 8x8 digits and log its per-layer curvature.

No download: the 1,797 digit images ship with scikit-learn. Every epoch, ``HessianCallback`` takes the
Hessian of the training loss on the same two cached training batches (128 images) and logs, per layer
(``blocks="module"``), the top eigenvalues, the smallest eigenvalue, the trace, the eigenvalue
spectrum (histogram) and a density plot to TensorBoard under ``lightning_logs/``.

Run it and open TensorBoard::

    python examples/train_digits.py            # about 10 s on 2 CPU cores
    tensorboard --logdir lightning_logs

The layers ``conv1`` (80 parameters) and ``fc`` (650) are small enough for exact spectra;
``conv2`` (1,168) is estimated from one shared block Krylov space: its top and smallest eigenvalues,
a Krylov-aware trace with its standard error, and a block-quadrature density.
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_hessian as lh


class DigitsCNN(L.LightningModule):
    """Conv(1->8) -> pool -> Conv(8->16) -> pool -> Linear(64->10), about 1,900 parameters.

    Args:
        lr: SGD learning rate.
        momentum: SGD momentum.
        dropout: Dropout before the classifier.
    """

    def __init__(self, lr: float = 0.05, momentum: float = 0.9, dropout: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(self.dropout(x.flatten(1)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/accuracy", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


class DigitsDataModule(L.LightningDataModule):
    """scikit-learn's 8x8 digits (bundled, no download), scaled to [0, 1], split train/val.

    Args:
        batch_size: Batch size of both loaders.
        num_samples: Use only the first ``num_samples`` images (for quick tests); ``None`` for all 1,797.
        val_fraction: Share of the images held out for validation.
        seed: Seed of the split and of the training shuffle.
    """

    def __init__(
        self, batch_size: int = 64, num_samples: int | None = None, val_fraction: float = 0.2, seed: int = 0
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.val_fraction = val_fraction
        self.seed = seed

    def setup(self, stage: str) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        if self.num_samples is not None:
            order = order[: self.num_samples]
        n_val = int(len(order) * self.val_fraction)
        self.val_set = TensorDataset(x[order[:n_val]], y[order[:n_val]])
        self.train_set = TensorDataset(x[order[n_val:]], y[order[n_val:]])

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--logdir", default=".", help="folder that gets lightning_logs/")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads; a model this small is fastest on one (more only contend)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    L.seed_everything(0)
    hessian = lh.HessianCallback(every_n_epochs=1, blocks="module", top_k=3, num_batches=2)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        callbacks=[hessian],
        default_root_dir=args.logdir,
        log_every_n_steps=5,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(DigitsCNN(), DigitsDataModule())
    wall = time.perf_counter() - start

    print(
        f"\n{'epoch':>5} {'step':>5} {'loss':>8} "
        + " ".join(f"{b + ' λ1':>10}" for b in ("conv1", "conv2", "fc"))
    )
    for entry in hessian.history:
        if entry.get("ok"):
            tops = " ".join(f"{entry[f'hessian/{b}/eigenvalue_1']:>10.4f}" for b in ("conv1", "conv2", "fc"))
            print(f"{entry['epoch']:>5} {entry['step']:>5} {entry['hessian/loss']:>8.4f} {tops}")
    spent = sum(e.get("wall_seconds", 0.0) for e in hessian.history)
    print(f"\nwall time {wall:.1f} s, of which Hessian evaluations {spent:.1f} s")
    print(f"TensorBoard: tensorboard --logdir {trainer.logger.log_dir}")


if __name__ == "__main__":
    main()
