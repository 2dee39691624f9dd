"""HessianCallback on an FSDP2-sharded model under Lightning's ModelParallelStrategy (CPU, gloo, 2 processes).

Like ``tests/ddp_scenarios.py``: Lightning relaunches ``sys.argv`` for rank 1, so each scenario runs as
this standalone script, started by ``tests/test_sharded_callback.py``::

    python tests/sharded_scenarios.py <scenario> <outdir>

The module applies ``fully_shard`` to each linear layer and to the network in ``configure_model`` (the
parameters become DTensors, each rank holding half of their rows); every rank trains on its own half of
the data set of :mod:`tests.ddp_scenarios` (no DistributedSampler), in float64, and writes
``<outdir>/rank<R>.pt`` with its ``hessian/*`` callback metrics, the callback's history, how ``fit``
ended and, once it finished, the full, gathered state dict.

Scenarios:
    union: two epochs, an evaluation after each, blocks="module", tight tolerances and the exact trace;
        the test compares the last one with single-process ``analyze`` of the unsharded model on the
        union of both ranks' batches.
    plain: the same training without the callback (its weights must be bit-identical to union's).
    failures: three epochs with the callback's defaults; rank 1's loss is NaN at the first evaluation
        and raises in the middle of the sharded forward (after the first layer's all-gather) at the
        second; the third succeeds; ``on_error="warn"``. Also writes the full state dict and the last
        report's densities: the test compares the third evaluation (the default analysis: one shared
        block Krylov space, its Krylov-aware trace and block-quadrature density) with the unsharded
        model's, computed the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import ddp_scenarios  # noqa: E402

WORLD_SIZE = ddp_scenarios.WORLD_SIZE
BATCH_SIZE = ddp_scenarios.BATCH_SIZE
NUM_BATCHES = ddp_scenarios.NUM_BATCHES
TRAIN_STEPS_PER_EPOCH = ddp_scenarios.TRAIN_STEPS_PER_EPOCH


def make_network() -> nn.Sequential:
    """The float64 network, with the same initial weights whether or not it is sharded later."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def shard_linear_layers(net: nn.Sequential, mesh: Any) -> None:
    """FSDP2 on each ``Linear`` of ``net``, then on ``net`` itself (what ``configure_model`` does)."""
    from torch.distributed.fsdp import fully_shard

    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)


def make_module(shard: bool = True) -> Any:
    """A classifier whose ``configure_model`` shards it with FSDP2 (``shard=False``: the plain copy)."""
    import lightning.pytorch as pl

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_network()

        def configure_model(self) -> None:
            if shard:
                shard_linear_layers(self.net, self.device_mesh["data_parallel"])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = F.cross_entropy(self(batch[0]), batch[1])
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self) -> DataLoader:
            batches = ddp_scenarios.half(self.trainer.global_rank)
            x = torch.cat([b[0] for b in batches]).double()
            y = torch.cat([b[1] for b in batches])
            return DataLoader(TensorDataset(x, y), batch_size=BATCH_SIZE, shuffle=False)

    return Classifier()


def union() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every rank's batches in float64: the data of the full data-parallel loss."""
    return [(x.double(), y) for x, y in ddp_scenarios.union()]


def callback_kwargs() -> dict[str, Any]:
    """The ``union`` scenario's callback settings (shared with the test's single-process reference)."""
    return {
        "blocks": "module",
        "top_k": 2,
        "seed": 3,
        "analyze_kwargs": {
            "krylov": "separate",
            "tol": 1e-9,
            "trace_method": "exact",
            "density_steps": 8,
            "density_probes": 2,
        },
    }


def faulty_loss(module: Any, batch: Any) -> torch.Tensor:
    """Cross-entropy, except on rank 1: NaN in epoch 0, an error inside the sharded forward in epoch 1."""
    trainer = module.trainer
    if trainer.global_rank == 1 and trainer.current_epoch == 1:
        module.net[0](batch[0])  # the first layer all-gathers; rank 0 goes on to the next layer
        raise RuntimeError("simulated failure on rank 1")
    loss = F.cross_entropy(module(batch[0]), batch[1])
    if trainer.global_rank == 1 and trainer.current_epoch == 0:
        return loss * float("nan")
    return loss


def run(scenario: str, outdir: Path) -> None:
    """Train under ``ModelParallelStrategy`` with the scenario's callback; write this rank's results."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.tensor import DTensor

    import lightning_hessian as lh

    if scenario in ("union", "plain"):
        callback = lh.HessianCallback(every_n_epochs=1, num_batches=NUM_BATCHES, **callback_kwargs())
        epochs = 2
    elif scenario == "failures":
        callback = lh.HessianCallback(
            every_n_epochs=1, num_batches=NUM_BATCHES, loss_fn=faulty_loss, figures=False
        )
        epochs = 3
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    trainer = pl.Trainer(
        strategy=ModelParallelStrategy(data_parallel_size=WORLD_SIZE, tensor_parallel_size=1),
        accelerator="cpu",
        devices=WORLD_SIZE,
        max_epochs=epochs,
        use_distributed_sampler=False,
        logger=False,
        callbacks=[] if scenario == "plain" else [callback],
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
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("hessian/")},
            "history": callback.history,
            "sharded": all(isinstance(p, DTensor) for p in module.parameters()),
        }
        if outcome == "finished":
            result["state_dict"] = {  # full_tensor() gathers: every rank calls it
                k: v.full_tensor() if isinstance(v, DTensor) else v.detach().clone()
                for k, v in module.state_dict().items()
            }
        if callback.last_report is not None:
            result["densities"] = {
                name: (block.density.nodes, block.density.weights)
                for name, block in callback.last_report.blocks.items()
                if block.density is not None
            }
        torch.save(result, outdir / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(sys.argv[1], Path(sys.argv[2]))
