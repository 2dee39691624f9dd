"""A failure on one rank must not leave the other rank waiting in a collective."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import lightning_hessian as lh


def _loss(module, batch):
    return F.cross_entropy(module(batch[0]), batch[1])


def _worker(rank: int, init_file: str, out_dir: str, where: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    outcome = "finished"
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
        if rank == 1 and where == "nan":
            x[0, 0] = float("nan")
        loss_fn = _loss
        if rank == 1 and where == "setup":

            def loss_fn(module, batch):
                raise MemoryError("simulated out of memory on rank 1")

        op = lh.HessianOperator(model, loss_fn, [(x, y)])
        lh.eigenvalues(op, k=2)
    except Exception as error:  # noqa: BLE001 - the outcome is what the test checks
        outcome = type(error).__name__
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(outcome)
        dist.destroy_process_group()


def _run(where: str) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.start_processes(
            _worker, args=(os.path.join(tmp, "init"), tmp, where), nprocs=2, join=False, start_method="spawn"
        )
        while not context.join(timeout=90):
            pass
        return [open(os.path.join(tmp, f"rank{r}.txt")).read() for r in range(2)]


def test_nan_on_one_rank_raises_on_both():
    assert _run("nan") == ["NonFiniteHessianError", "NonFiniteHessianError"]


def test_setup_failure_on_one_rank_stops_both():
    assert _run("setup") == ["RankFailedError", "MemoryError"]
