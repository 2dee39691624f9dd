"""HessianCallback under Lightning DDP (CPU, gloo, 2 processes): one scenario per launch.

Lightning's ``strategy="ddp"`` relaunches ``sys.argv`` for the other ranks, so each scenario runs as
this standalone script, started by ``tests/test_ddp_callback.py``::

    python tests/ddp_scenarios.py <scenario> <outdir>

Every rank trains on its own half of a fixed data set (no DistributedSampler) and writes
``<outdir>/rank<R>.pt`` with its ``hessian/*`` callback metrics, the callback's history, its process
id and how ``fit`` ended; the TensorBoard logger writes under ``<outdir>/tb``.

Scenarios:
    union: one evaluation after the only epoch, blocks="module" with one dense and one iterative
        block, float64; the test compares the values with single-process ``analyze`` on the union.
    failures: three epochs; rank 1's loss is NaN at the first evaluation and raises an out-of-memory
        error at the second, the third succeeds; ``on_error="warn"``.
    raise: rank 1 runs out of memory (simulated) at the first evaluation, ``on_error="raise"``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

WORLD_SIZE = 2
HALF = 8  # samples per rank
BATCH_SIZE = 4  # so each rank's half is exactly NUM_BATCHES batches
NUM_BATCHES = 2
DENSE_LIMIT = 60  # "net.2" (51 parameters) is dense, "net.0" (96) iterative
TRAIN_STEPS_PER_EPOCH = HALF // BATCH_SIZE


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed data set of ``WORLD_SIZE * HALF`` samples; rank ``r`` trains on half ``r``."""
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(WORLD_SIZE * HALF, 5, generator=generator)
    y = torch.randint(0, 3, (WORLD_SIZE * HALF,), generator=generator)
    return x, y


def half(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank ``rank``'s batches, in the order its dataloader yields them."""
    x, y = dataset()
    x, y = x[rank * HALF : (rank + 1) * HALF], y[rank * HALF : (rank + 1) * HALF]
    return [(x[i : i + BATCH_SIZE], y[i : i + BATCH_SIZE]) for i in range(0, HALF, BATCH_SIZE)]


def union() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of every rank: the data of the full data-parallel loss."""
    return [batch for rank in range(WORLD_SIZE) for batch in half(rank)]


def make_module() -> Any:
    """A small classifier whose ``training_step`` logs with ``sync_dist=True`` (a collective that
    the callback's silenced logging must skip)."""
    import lightning.pytorch as pl

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = F.cross_entropy(self(batch[0]), batch[1])
            self.log("train_loss", loss, sync_dist=True)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self) -> DataLoader:
            x = torch.cat([b[0] for b in half(self.trainer.global_rank)])
            y = torch.cat([b[1] for b in half(self.trainer.global_rank)])
            return DataLoader(TensorDataset(x, y), batch_size=BATCH_SIZE, shuffle=False)

    return Classifier()


def callback_kwargs() -> dict[str, Any]:
    """The ``union`` scenario's callback settings (shared with the test's single-process reference)."""
    return {
        "blocks": "module",
        "top_k": 2,
        "dtype": torch.float64,
        "dense_limit": DENSE_LIMIT,
        "seed": 3,
        "analyze_kwargs": {"trace_method": "exact", "density_steps": 8, "density_probes": 2},
    }


def faulty_loss(module: Any, batch: Any) -> torch.Tensor:
    """Cross-entropy, except on rank 1: NaN in epoch 0, an out-of-memory error in epoch 1."""
    loss = F.cross_entropy(module(batch[0]), batch[1])
    trainer = module.trainer
    if trainer.global_rank == 1 and trainer.current_epoch == 0:
        return loss * float("nan")
    if trainer.global_rank == 1 and trainer.current_epoch == 1:
        raise torch.OutOfMemoryError("simulated out of memory on rank 1")
    return loss


def oom_loss(module: Any, batch: Any) -> torch.Tensor:
    """Cross-entropy, except that rank 1 runs out of memory (simulated) at every evaluation."""
    if module.trainer.global_rank == 1:
        raise torch.OutOfMemoryError("simulated out of memory on rank 1")
    return F.cross_entropy(module(batch[0]), batch[1])


def run(scenario: str, outdir: Path) -> None:
    """Train under ``strategy="ddp"`` with the scenario's callback; write this rank's results."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    import lightning_hessian as lh

    if scenario == "union":
        callback = lh.HessianCallback(every_n_epochs=1, num_batches=NUM_BATCHES, **callback_kwargs())
        epochs = 1
    elif scenario == "failures":
        callback = lh.HessianCallback(
            every_n_epochs=1, num_batches=NUM_BATCHES, loss_fn=faulty_loss, top_k=1, figures=False
        )
        epochs = 3
    elif scenario == "raise":
        callback = lh.HessianCallback(
            every_n_epochs=1, num_batches=NUM_BATCHES, loss_fn=oom_loss, on_error="raise"
        )
        epochs = 1
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=WORLD_SIZE,
        max_epochs=epochs,
        use_distributed_sampler=False,
        logger=TensorBoardLogger(str(outdir), name="tb", version=0),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = make_module()
    outcome = "finished"
    try:
        trainer.fit(module)
    except BaseException as error:
        outcome = type(error).__name__
        raise
    finally:
        result = {
            "outcome": outcome,
            "pid": os.getpid(),
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("hessian/")},
            "history": callback.history,
            "state_dict": {k: v.detach().clone() for k, v in module.state_dict().items()},
        }
        torch.save(result, outdir / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    run(sys.argv[1], Path(sys.argv[2]))
