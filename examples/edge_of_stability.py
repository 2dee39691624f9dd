"""Gradient descent at the edge of stability (Cohen et al. 2021; Adam: Cohen et al. 2022), in Lightning.

Full-batch training of a tanh MLP with the MSE loss on 1,000 of scikit-learn's bundled 8x8 digits (no
download), as in the paper's experiments. ``HessianCallback`` measures the sharpness (the top Hessian
eigenvalue) and ``hessian/model/stability`` every 25 steps: for gradient descent ``lr * sharpness /
2``, for Adam the top eigenvalue of the preconditioned Hessian divided by its edge ``38 / lr``
(``beta1 = 0.9``). The paper's phenomenon shows in TensorBoard:

- *progressive sharpening*: the sharpness rises while training is stable (``stability < 1``);
- *edge of stability*: it stops at ``2 / lr`` and hovers there (``stability`` near 1), for each
  learning rate at its own ``2 / lr``, while the loss keeps falling, non-monotonically;
- full-batch Adam does the same with its preconditioned sharpness at ``38 / lr``.

Run it and open TensorBoard::

    python examples/edge_of_stability.py      # about a minute on 2 CPU cores (three runs)
    tensorboard --logdir lightning_logs/edge_of_stability

Each run prints its last evaluations; the script exits non-zero if a run does not end at its edge.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_hessian as lh

#: (run name, optimizer, learning rate): two gradient-descent learning rates and full-batch Adam.
RUNS = (("gd_lr0.2", "sgd", 0.2), ("gd_lr0.4", "sgd", 0.4), ("adam_lr0.001", "adam", 0.001))


def digits_subset(samples: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``samples`` digits: standardized pixels and one-hot targets (for the MSE loss)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data[:samples], dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    y = nn.functional.one_hot(torch.tensor(digits.target[:samples]), 10).float()
    return x, y


class FullBatch(Dataset):
    """The whole training set as one batch, ``steps`` times per epoch (full-batch gradient descent)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
        self.batch, self.steps = (x, y), steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch


class TanhMLP(L.LightningModule):
    """64 -> 100 -> 100 -> 10 with tanh, trained on ``½ ||f(x) - y||²`` averaged over samples.

    Args:
        optimizer: ``"sgd"`` (plain gradient descent) or ``"adam"``.
        lr: Learning rate.
    """

    def __init__(self, optimizer: str = "sgd", lr: float = 0.2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, 100), nn.Tanh(), nn.Linear(100, 100), nn.Tanh(), nn.Linear(100, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = 0.5 * (self(x) - y).square().sum(1).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, betas=(0.9, 0.999))
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def train(name: str, optimizer: str, lr: float, steps: int, every: int, root: str) -> list[dict]:
    """One full-batch run with the curvature every ``every`` steps; returns the callback's history."""
    L.seed_everything(0, verbose=False)
    x, y = digits_subset()
    hessian = lh.HessianCallback(
        every_n_steps=every,
        data=[(x, y)],  # the full batch: the Hessian of the loss gradient descent minimizes
        num_batches=None,
        top_k=1,
        min_eigenvalue=False,
        trace=False,
        density=False,
        gradient_geometry=False,
        histograms=False,
        figures=False,
    )
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=[hessian],
        logger=TensorBoardLogger(root, name="edge_of_stability", version=name),
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    loader = DataLoader(FullBatch(x, y, steps), batch_size=None)
    trainer.fit(TanhMLP(optimizer, lr), loader)
    return hessian.history


def summarize(name: str, optimizer: str, lr: float, history: list[dict]) -> bool:
    """Print the run's curvature and say whether it ended at its edge of stability."""
    sharpness = "preconditioned_eigenvalue_1" if optimizer == "adam" else "eigenvalue_1"
    edge = (38.0 if optimizer == "adam" else 2.0) / lr
    rows = [entry for entry in history if entry.get("ok")]
    for entry in rows[:: max(1, len(rows) // 8)]:
        value = entry[f"hessian/model/{sharpness}"] / (lr if optimizer == "adam" else 1.0)
        print(
            f"  step {entry['step']:5d}  loss {entry['hessian/loss']:.4f}  sharpness {value:9.2f}"
            f"  edge {edge:9.2f}  stability {entry['hessian/model/stability']:.3f}"
        )
    late = [entry["hessian/model/stability"] for entry in rows[len(rows) * 2 // 3 :]]
    settled = abs(statistics.median(late) - 1.0) < 0.1
    early = rows[0]["hessian/model/stability"]
    print(
        f"  {name}: stability {early:.2f} at the first evaluation, median {statistics.median(late):.3f} "
        f"over the last third ({'at the edge' if settled else 'NOT at the edge'})"
    )
    return settled and early < 0.9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="full-batch steps per run")
    parser.add_argument("--every", type=int, default=25, help="steps between curvature evaluations")
    parser.add_argument("--root", default="lightning_logs", help="TensorBoard folder")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started, ok = time.perf_counter(), True
    for name, optimizer, lr in RUNS:
        print(f"{name}: {optimizer} lr={lr}")
        ok &= summarize(name, optimizer, lr, train(name, optimizer, lr, args.steps, args.every, args.root))
    print(
        f"done in {time.perf_counter() - started:.0f} s; tensorboard --logdir {args.root}/edge_of_stability"
    )
    if not ok:
        raise SystemExit("a run did not show progressive sharpening up to its edge of stability")


if __name__ == "__main__":
    main()
