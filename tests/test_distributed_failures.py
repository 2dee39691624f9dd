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


def _scenario(rank: int, where: str) -> str:
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

        if where == "memory":  # rank 1 has no memory for the dense matrix; rank 0 has plenty
            import lightning_hessian.dense as dense

            dense.available_memory = (lambda device: 0) if rank == 1 else (lambda device: 1 << 40)
            lh.hessian(model, loss_fn, [(x, y)])
        op = lh.HessianOperator(model, loss_fn, [(x, y)])
        lh.eigenvalues(op, k=2)
    except Exception as error:  # noqa: BLE001 - the outcome is what the test checks
        return type(error).__name__
    return "finished"


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        outcomes = {where: _scenario(rank, where) for where in ("nan", "setup", "memory", "none")}
        torch.save(outcomes, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_a_failure_on_one_rank_stops_both_ranks_at_the_same_point():
    """Both processes return (no deadlock); the ranks agree; the group still works afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        outcomes = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    assert [o["nan"] for o in outcomes] == ["NonFiniteHessianError", "NonFiniteHessianError"]
    assert [o["setup"] for o in outcomes] == ["RankFailedError", "MemoryError"]
    assert [o["memory"] for o in outcomes] == ["HessianTooLargeError", "HessianTooLargeError"]
    assert [o["none"] for o in outcomes] == ["finished", "finished"]
