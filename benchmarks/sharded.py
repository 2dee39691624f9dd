"""Sharded (FSDP2) Hessians on 2 gloo processes vs the unsharded model on 1 process, on the same data.

An MLP ``64-512-512-10`` (tanh, cross-entropy; 301,066 parameters, float64) on 512 random samples in
4 batches of 128. Configurations, each in fresh processes:

- 1 process, unsharded ``HessianOperator`` on the 4 batches (exact products, ``hvp="auto"``);
- 1 process, FSDP2 over a mesh of one rank (``ShardedHessianOperator``: gradient differences through
  the sharded module), on the 4 batches: the price of gradient differences alone;
- 2 processes (gloo), FSDP2 over a mesh of two ranks, 2 batches each: every vector is half per rank.

Per configuration:

- products per second of ``op @ v`` (after warm-up; with 2 processes the slowest rank counts);
- the share of FSDP's collectives in a product, estimated: one timed all-gather and one reduce-scatter
  of the parameters' size, times the 2 all-gathers and 1 reduce-scatter of each forward and backward
  pass of the product (two gradients, one pass per local batch each);
- one ``lh.analyze`` with the callback's monitoring settings (one shared block Krylov space: 4 probes,
  at most 32 block steps, 16 trace probes, ``tol=1e-3``): its Krylov vectors per rank (``rows x
  (basis capacity + probes + trace probes) x 8 bytes``, computed), the growth of the process's peak
  RSS during it (``/proc/self/status``; the peak is reset first), its top-3 eigenvalues and trace.

Agreement: the eigenvalues and the trace against the unsharded run. All three runs draw the same
Rademacher probes (the sharded ones per parameter: the same global vectors for any number of ranks,
and on CPU the same as the unsharded draw), so they build the same Krylov space and differ only by
the products' accuracy.

Run::

    python benchmarks/sharded.py                 # 8 timed products per configuration
    python benchmarks/sharded.py --products 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning_hessian as lh  # noqa: E402
from benchmarks.common import machine_line, markdown_table  # noqa: E402
from lightning_hessian.shared_space import basis_capacity  # noqa: E402

WARM_UP = 2
REPEATS = 10  # timed collectives
SAMPLES, BATCH = 512, 128
SETTINGS = {
    "krylov": "shared",
    "top_k": 3,
    "tol": 1e-3,
    "density_probes": 4,
    "density_steps": 32,
    "trace_matvecs": 16,
    "seed": 0,
}


def network() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 10)
    ).double()


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, 64, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (SAMPLES,), generator=g)
    return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, SAMPLES, BATCH)]


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _memory() -> dict[str, int]:
    with open("/proc/self/status") as f:
        lines = [line.split() for line in f if line.startswith(("VmRSS", "VmHWM"))]
    return {key.rstrip(":"): int(value) * 1024 for key, value, _ in lines}


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux)


def _measure(rank: int, world: int, sharded: bool, init_file: str, out_dir: str, products: int) -> None:
    torch.set_num_threads(1)
    if sharded:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        batches = data()
        model = network()
        if sharded:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            share = len(batches) // world
            batches = batches[rank * share : (rank + 1) * share]
            op = lh.ShardedHessianOperator(model, loss_fn, batches)
            rows = op.local_size
        else:
            op = lh.HessianOperator(model, loss_fn, batches, process_group=None)
            rows = op.shape[0]
        generator = torch.Generator().manual_seed(0)
        vectors = [
            torch.randn(rows, generator=generator, dtype=torch.float64) for _ in range(WARM_UP + products)
        ]
        for v in vectors[:WARM_UP]:
            op @ v
        if sharded:
            dist.barrier()
        start = time.perf_counter()
        for v in vectors[WARM_UP:]:
            op @ v
        per_product = (time.perf_counter() - start) / products
        del vectors
        communication = _collectives_per_product(op.shape[0], world, len(batches)) if world > 1 else 0.0
        _reset_peak()
        before = _memory()["VmRSS"]
        start = time.perf_counter()
        report = lh.analyze(model, loss_fn, batches, process_group=None, **SETTINGS)
        seconds = time.perf_counter() - start
        growth = _memory()["VmHWM"] - before
        block = report.blocks["model"]
        n = op.shape[0]
        columns = basis_capacity(n, 4, 32, torch.float64, 2**62, rows) + 4 + SETTINGS["trace_matvecs"]
        numbers = torch.tensor([per_product, growth, seconds], dtype=torch.float64)
        if sharded:  # the slowest rank's time, the largest rank's memory
            dist.all_reduce(numbers, op=dist.ReduceOp.MAX)
        if rank == 0:
            result = {
                "per_product": float(numbers[0]),
                "communication": communication,
                "growth": float(numbers[1]),
                "seconds": float(numbers[2]),
                "rows": rows,
                "n": n,
                "vector_bytes": rows * columns * 8,
                "eigenvalues": block.eigenvalues.values.tolist(),
                "converged": bool(block.eigenvalues.converged.all()),
                "trace": block.trace.value,
                "stderr": block.trace.stderr,
                "matvecs": report.num_matvecs,
                "machine": machine_line(),
            }
            torch.save(result, os.path.join(out_dir, "result.pt"))
    finally:
        if sharded:
            dist.destroy_process_group()
    # Skip the interpreter's teardown: after the process group is destroyed, gloo occasionally aborts
    # there (std::terminate, "terminate called without an active exception") on this machine.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _collectives_per_product(n: int, world: int, local_batches: int) -> float:
    """Seconds of FSDP's collectives in one product, from timed collectives of the parameters' size.

    A product is two gradient passes, each one forward and backward per local batch; each of those
    all-gathers the parameters twice (forward, and again in backward: FSDP reshards after forward) and
    reduce-scatters the gradient.
    """
    shard = -(-n // world)
    local = torch.zeros(shard, dtype=torch.float64)
    full = torch.zeros(shard * world, dtype=torch.float64)
    times = {"gather": [], "scatter": []}
    for _ in range(REPEATS):
        dist.barrier()
        begin = time.perf_counter()
        dist.all_gather_into_tensor(full, local)
        times["gather"].append(time.perf_counter() - begin)
        dist.barrier()
        begin = time.perf_counter()
        dist.reduce_scatter_tensor(local, full)
        times["scatter"].append(time.perf_counter() - begin)
    gather, scatter = (statistics.median(t) for t in times.values())
    return 2 * local_batches * (2 * gather + scatter)


def run(world: int, sharded: bool, products: int) -> dict:
    """One configuration in fresh processes; returns rank 0's measurements."""
    with tempfile.TemporaryDirectory() as tmp:
        args = (world, sharded, os.path.join(tmp, "init"), tmp, products)
        mp.spawn(_measure, args=args, nprocs=world, join=True)
        return torch.load(os.path.join(tmp, "result.pt"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--products", type=int, default=8, help="timed products per configuration")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    configurations = {
        "1 process, unsharded (exact products)": (1, False),
        "1 process, FSDP2 mesh of 1 (gradient differences)": (1, True),
        "2 processes, FSDP2 (gradient differences)": (2, True),
    }
    results = {name: run(*config, args.products) for name, config in configurations.items()}
    reference = results["1 process, unsharded (exact products)"]
    one_rank = results["1 process, FSDP2 mesh of 1 (gradient differences)"]
    rows = []
    for name, r in results.items():
        worst = max(
            abs(a - b) / abs(b) for a, b in zip(r["eigenvalues"], reference["eigenvalues"], strict=True)
        )
        rows.append(
            [
                name,
                f"{r['rows']:,}",
                f"{1.0 / r['per_product']:.1f}",
                f"{r['per_product'] * 1e3:.1f}",
                "-" if not r["communication"] else f"{100 * r['communication'] / r['per_product']:.0f}%",
                f"{r['vector_bytes'] / 2**20:.0f}",
                f"{r['growth'] / 2**20:.0f}",
                f"{r['matvecs']} / {r['seconds']:.1f}",
                ", ".join(f"{v:.6f}" for v in r["eigenvalues"])
                + ("" if r["converged"] else " (not converged)"),
                f"{worst:.1e}",
                f"{r['trace']:.4f} ± {r['stderr']:.4f}",
            ]
        )
    print(
        f"MLP 64-512-512-10 ({reference['n']:,} parameters, float64), {SAMPLES} samples in "
        f"{SAMPLES // BATCH} batches of {BATCH}; 1 thread per process; CPU, gloo; {args.products} timed "
        "products per configuration; no GPU lent to this task."
    )
    print(reference["machine"])
    print()
    print(
        markdown_table(
            [
                "configuration",
                "vector rows per rank",
                "products/s",
                "ms/product",
                "FSDP collectives share (est.)",
                "Krylov vectors MB per rank",
                "peak RSS growth MB per rank",
                "analyze: products / s",
                "top-3 eigenvalues",
                "max rel. diff vs unsharded",
                "trace ± stderr",
            ],
            rows,
        )
    )
    two = results["2 processes, FSDP2 (gradient differences)"]
    print()
    print(
        "Trace, relative difference: 2 ranks vs 1 rank of FSDP2 "
        f"{abs(two['trace'] - one_rank['trace']) / abs(one_rank['trace']):.1e}, 2 ranks vs unsharded "
        f"{abs(two['trace'] - reference['trace']) / abs(reference['trace']):.1e} (the same probes)."
    )


if __name__ == "__main__":
    main()
