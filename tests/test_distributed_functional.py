"""The functional API under torch.distributed (gloo, 2 CPU processes): products of the union loss.

Dense paths included: every rank computes all columns on its own data and each chunk of columns is
all-reduced, so ``op.to_dense()`` and ``lh.hessian`` (whole or block-diagonal) are the Hessian of
the loss over the union of both ranks' batches.
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import lightning_hessian as lh
from tests.helpers import reference_hessian


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(24, 5), torch.randint(0, 3, (24,))
    halves = [[(x[:8], y[:8]), (x[8:10], y[8:10])], [(x[10:], y[10:])]]  # uneven on purpose
    return model, halves


def _loss(module, batch):
    return F.cross_entropy(module(batch[0]), batch[1])


def _summaries(model, data, **kwargs):
    op = lh.HessianOperator(model, _loss, data, dtype=torch.float64, **kwargs)
    top = lh.eigenvalues(op, k=3, seed=3)
    bottom = lh.eigenvalues(op, k=1, which="smallest", seed=3)
    tr = lh.trace(op, method="hutch++", num_matvecs=30, seed=5)
    density = lh.spectral_density(op, num_probes=2, num_steps=10, seed=7)
    chunked = lh.HessianOperator(model, _loss, data, dtype=torch.float64, chunk_size=7, **kwargs)
    blocks = lh.hessian(model, _loss, data, blocks="module", dtype=torch.float64)
    return {
        "dense": op.to_dense(),
        "dense_chunked": chunked.to_dense(),  # many all-reduced chunks per parameter tensor
        "hessian": lh.hessian(model, _loss, data, dtype=torch.float64),
        **{f"hessian_block_{name}": block for name, block in blocks.items()},
        "top": top.values,
        "min": bottom.values,
        "trace": torch.tensor(tr.value),
        "density_nodes": density.nodes,
        "loss": torch.tensor(op.loss()),
        "num_samples": torch.tensor(op.num_samples),
    }


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, halves = _problem()
        torch.save(_summaries(model, halves[rank]), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_compute_the_hessian_of_the_union_of_their_batches():
    model, halves = _problem()
    expected = _summaries(model, halves[0] + halves[1], process_group=None)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    for result in ranks:
        for key, value in expected.items():
            torch.testing.assert_close(result[key], value, rtol=1e-8, atol=1e-10, msg=key)
    assert int(ranks[0]["num_samples"]) == 24
    union = reference_hessian(model, _loss, halves[0] + halves[1])  # independent of the library
    torch.testing.assert_close(ranks[0]["hessian"], union, rtol=1e-7, atol=1e-9)
    assert {"hessian_block_0", "hessian_block_2"} <= set(ranks[0])
    torch.testing.assert_close(ranks[0]["hessian_block_0"], union[:48, :48], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(ranks[0]["hessian_block_2"], union[48:, 48:], rtol=1e-7, atol=1e-9)
    # every rank holds the same result, bit for bit
    for key in expected:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
