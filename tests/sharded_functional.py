"""The sharded Hessian's functional API on 2 gloo processes with FSDP2, without Lightning.

Started by ``tests/test_sharded_callback.py`` as ``python tests/sharded_functional.py <outdir>``; spawns
two ranks, each of which shards a small float64 regression network (the last layer has one output row,
so rank 1's shard of it is empty) and holds its own, uneven batches (rank 0 three, rank 1 two, of
different sizes). Each rank computes every quantity twice, through the sharded operator on its shards
and through an unsharded ``HessianOperator`` on the union of both ranks' batches, and writes both to
``<outdir>/rank<R>.pt`` (global vectors as this rank's rows), with the outcome of the failures it
provokes; the test compares them.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORLD_SIZE = 2
SIZES = [[4, 4, 2], [3, 5]]  # samples per batch, per rank
FAIL = {"nan": False, "raise": False}


def network() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1)).double()


def rank_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    total = sum(map(sum, SIZES))
    x = torch.randn(total, 5, generator=g, dtype=torch.float64)
    y = torch.randn(total, 1, generator=g, dtype=torch.float64)
    start = sum(map(sum, SIZES[:rank]))
    out = []
    for size in SIZES[rank]:
        out.append((x[start : start + size], y[start : start + size]))
        start += size
    return out


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    rank = dist.get_rank()
    if FAIL["raise"] and rank == 1:
        model[0](batch[0])  # inside the sharded forward: the first layer has all-gathered
        raise RuntimeError("simulated failure on rank 1")
    loss = F.mse_loss(model(batch[0]), batch[1])
    return loss * float("nan") if FAIL["nan"] and rank == 1 else loss


def summary(block: Any) -> dict[str, Any]:
    """What a shared-space block reports: top-k, smallest, trace, density, products and convergence."""
    return {
        "top": block.eigenvalues.values,
        "smallest": block.min_eigenvalue.values,
        "converged": torch.cat([block.eigenvalues.converged, block.min_eigenvalue.converged]),
        "trace": (block.trace.value, block.trace.stderr, block.trace.num_matvecs),
        "nodes": block.density.nodes,
        "weights": block.density.weights,
        "num_matvecs": block.num_matvecs,
    }


def _outcome(call: Any) -> str:
    try:
        call()
    except Exception as error:  # noqa: BLE001 - recorded for the test
        return f"{type(error).__name__}: {error}"
    return "ok"


def checks(rank: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import lightning_hessian as lh
    from lightning_hessian.callback import MONITORING_DEFAULTS
    from lightning_hessian.probes import make_generator
    from lightning_hessian.sharded import ShardedHessianOperator
    from lightning_hessian.shards import ShardLayout

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    model = network()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    union = [b for r in range(WORLD_SIZE) for b in rank_batches(r)]
    reference = lh.HessianOperator(network(), loss_fn, union, process_group=None)
    out: dict[str, Any] = {"rank": rank}

    # A failure inside the sharded forward on rank 1 (after a first operator, as after training: FSDP
    # is initialized), then the same module works again.
    ShardedHessianOperator(model, loss_fn, rank_batches(rank))
    FAIL["raise"] = True
    out["raise"] = _outcome(lambda: ShardedHessianOperator(model, loss_fn, rank_batches(rank)))
    FAIL["raise"] = False
    op = ShardedHessianOperator(model, loss_fn, rank_batches(rank))
    index = op.layout.global_indices()
    out["local_size"], out["index"] = op.local_size, index
    out["n"] = op.shape[0]

    g = torch.Generator().manual_seed(5)
    v = torch.randn(op.shape[0], 3, generator=g, dtype=torch.float64)
    out["product"], out["product_ref"] = op @ v[index], (reference @ v)[index]
    out["loss"], out["loss_ref"] = op.loss(), reference.loss()
    out["gradient"], out["gradient_ref"] = op.gradient(), reference.gradient()[index]
    step = 0.1 * v[:, 0]
    out["shifted_loss"], out["shifted_loss_ref"] = op.loss(step[index]), reference.loss(step)

    y = torch.randn(op.shape[0], 4, generator=g, dtype=torch.float64)
    out["y"], (out["q"], out["r"]) = y[index], op.shards.qr(y[index])

    shapes = dict(zip(op.space.names, op.space.shapes, strict=True))
    probes = ShardLayout(shapes, 0, 1).random("rademacher", 6, make_generator("cpu", 1), torch.float64, "cpu")
    out["hutchinson"] = lh.trace(op, "hutchinson", 6, seed=1).value
    out["hutchinson_ref"] = float((probes * (reference @ probes)).sum(0).mean())
    for method in ("hutch++", "xtrace"):
        result = lh.trace(op, method, 12, seed=1)
        out[method], out[f"{method}_stderr"] = result.value, result.stderr
    out["trace"], out["trace_ref"] = lh.trace(op, "exact").value, lh.trace(reference, "exact").value

    top = lh.eigenvalues(op, 2, tol=1e-10, return_vectors=True)
    out["top"], out["top_ref"] = top.values, lh.eigenvalues(reference, 2, tol=1e-10).values
    out["smallest"] = lh.eigenvalues(op, 1, "smallest", tol=1e-10).values
    out["smallest_ref"] = lh.eigenvalues(reference, 1, "smallest", tol=1e-10).values
    density = lh.spectral_density(op, num_probes=2, num_steps=8)
    out["density_mass"], out["density_nodes"] = float(density.weights.sum()), density.nodes
    shared = lh.analyze(
        model, loss_fn, rank_batches(rank), krylov="shared", top_k=2, tol=1e-10, trace=False, density=False
    )  # the shared space's trace and density: below
    out["shared_top"] = shared.blocks["model"].eigenvalues.values

    # Against the unsharded model with the same products (gradient differences) and the same global
    # probes, so that only the sharding differs: the shared block Krylov space with the callback's
    # defaults (top-3, smallest, Krylov-aware trace, block-quadrature density), Hutch++ and XTrace.
    started = time.perf_counter(), time.process_time()
    fd = lh.HessianOperator(network(), loss_fn, union, process_group=None, hvp="finite-difference")
    out["product_fd"] = (fd @ v)[index]
    defaults = {**MONITORING_DEFAULTS, "method": "iterative", "hvp": "finite-difference"}
    out["defaults"] = summary(lh.analyze(model, loss_fn, rank_batches(rank), **defaults).blocks["model"])
    reference_report = lh.analyze(network(), loss_fn, union, process_group=None, **defaults)
    out["defaults_ref"] = summary(reference_report.blocks["model"])
    for method in ("hutch++", "xtrace"):  # as above, on the sharded operator
        result = lh.trace(fd, method, 12, seed=1)
        out[f"{method}_plain"] = (result.value, result.stderr)
    out["seconds_defaults"] = (time.perf_counter() - started[0], time.process_time() - started[1])

    vectors = top.vectors
    full_vectors = torch.zeros(op.shape[0], 2, dtype=torch.float64)
    full_vectors[index] = vectors
    full_vectors = op.shards.reduce_sum(full_vectors)  # test only: a tiny model's vectors, whole
    geometry = lh.gradient_geometry(op, vectors)
    geometry_ref = lh.gradient_geometry(reference, full_vectors)
    out["geometry"] = (geometry.alignment, geometry.curvature, geometry.batch_sharpness, geometry.num_batches)
    out["geometry_ref"] = (
        geometry_ref.alignment,
        geometry_ref.curvature,
        geometry_ref.batch_sharpness,
        geometry_ref.num_batches,
    )
    out["overlap"] = lh.eigenspace_overlap(vectors[:, :1], vectors, op=op)
    out["overlap_ref"] = lh.eigenspace_overlap(full_vectors[:, :1], full_vectors)
    landscape = lh.loss_landscape(op, {"v1": vectors[:, 0]}, num_points=5)
    landscape_ref = lh.loss_landscape(reference, {"v1": full_vectors[:, 0]}, num_points=5)
    out["landscape"], out["landscape_ref"] = landscape.losses["v1"], landscape_ref.losses["v1"]

    # Adam's step sizes come from its sharded second moments (DTensor states).
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    for batch in rank_batches(rank)[:2]:  # as many steps on every rank: FSDP trains in lockstep
        adam.zero_grad()
        F.mse_loss(model(batch[0]), batch[1]).backward()
        adam.step()
    adam.zero_grad(set_to_none=True)
    op = ShardedHessianOperator(model, loss_fn, rank_batches(rank))
    plain = network()
    with torch.no_grad():
        for p, q in zip(model.parameters(), plain.parameters(), strict=True):
            q.copy_(p.full_tensor())
    plain_adam = torch.optim.Adam(plain.parameters(), lr=0.01)
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        state = adam.state[p]
        plain_adam.state[q] = {
            "step": state["step"].clone(),
            "exp_avg": state["exp_avg"].full_tensor(),
            "exp_avg_sq": state["exp_avg_sq"].full_tensor(),
        }
    after = lh.HessianOperator(plain, loss_fn, union, process_group=None)
    out["stability"] = lh.stability(op, adam, tol=1e-10).eigenvalue
    out["stability_ref"] = lh.stability(after, plain_adam, tol=1e-10).eigenvalue

    # A NaN on rank 1 in the middle of a product: every rank raises at the same point.
    FAIL["nan"] = True
    out["nan"] = _outcome(lambda: op @ v[index, 0])
    FAIL["nan"] = False
    out["after_nan"] = float(lh.eigenvalues(op, 1, tol=1e-6).values[0])
    return out


def worker(rank: int, port: int, outdir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        result = checks(rank)
    except BaseException:
        result = {"rank": rank, "crash": traceback.format_exc()}
        raise
    finally:
        torch.save(result, Path(outdir) / f"rank{rank}.pt")
        dist.destroy_process_group()
    # Skip the interpreter's teardown, where gloo occasionally aborts after the group is destroyed
    # (std::terminate; seen with benchmarks/sharded.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(free_port(), sys.argv[1]), nprocs=WORLD_SIZE)
