"""Hessian-vector products per second on 1 vs 2 processes (CPU, gloo), and their communication share.

The mid-size CNN of ``benchmarks/common.py`` (five conv-BN-ReLU blocks 32/32/64/64/128, 141,034
parameters) on one batch of ``--batch-size`` 3x32x32 images (10 classes). Strong scaling: the
Hessian is always that of the same batch; with 2 processes each rank holds half of it and the
operator all-reduces every product, exactly as under Lightning DDP.

Configurations, each in a fresh process (own thread setting):

- 1 process, 1 thread;
- 1 process, 2 threads;
- 2 processes (gloo), 1 thread each: the fair comparison with the first on a 2-core machine.

Per configuration: products per second of ``op @ v`` (after warm-up, ``hvp`` chosen by ``"auto"``
before timing; with 2 processes the slowest rank counts), and the communication share of a product:
the time of one ``all_reduce`` of an ``N``-element tensor of the product's dtype, timed separately
with the same size, divided by the time per product.

Run::

    python benchmarks/ddp.py                      # batch 64, 8 timed products per configuration
    python benchmarks/ddp.py --products 16 --batch-size 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning_hessian as lh  # noqa: E402
from benchmarks.common import machine_line, markdown_table, mid_cnn_problem  # noqa: E402

WARM_UP = 2  # untimed products (the first includes the "auto" method choice)
ALL_REDUCE_REPEATS = 20


def _measure(
    rank: int, world: int, threads: int, init_file: str, out_dir: str, args: argparse.Namespace
) -> None:
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, loss_fn, batches = mid_cnn_problem(batch_size=args.batch_size)
        x, y = batches[0]
        share = x.shape[0] // world
        local = [(x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share])]
        op = lh.HessianOperator(model, loss_fn, local)
        generator = torch.Generator().manual_seed(0)
        vectors = [torch.randn(op.shape[0], generator=generator) for _ in range(WARM_UP + args.products)]
        for v in vectors[:WARM_UP]:
            op @ v
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        for v in vectors[WARM_UP:]:
            op @ v
        per_product = (time.perf_counter() - start) / args.products
        reduce_seconds = float("nan")
        if world > 1:
            slowest = torch.tensor([per_product], dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            per_product = float(slowest)
            buffer = torch.zeros(op.shape[0], dtype=op.dtype)
            dist.all_reduce(buffer)  # warm-up
            times = []
            for _ in range(ALL_REDUCE_REPEATS):
                dist.barrier()
                begin = time.perf_counter()
                dist.all_reduce(buffer)
                times.append(time.perf_counter() - begin)
            reduce_seconds = statistics.median(times)
        if rank == 0:
            result = {
                "per_product": per_product,
                "all_reduce": reduce_seconds,
                "method": op.choice.vector,
                "parameters": op.shape[0],
                "samples": op.num_samples,
                "machine": machine_line(),
            }
            torch.save(result, os.path.join(out_dir, "result.pt"))
    finally:
        if world > 1:
            dist.destroy_process_group()


def run(world: int, threads: int, args: argparse.Namespace) -> dict:
    """One configuration in fresh processes; returns rank 0's measurements."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(
            _measure, args=(world, threads, os.path.join(tmp, "init"), tmp, args), nprocs=world, join=True
        )
        return torch.load(os.path.join(tmp, "result.pt"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--products", type=int, default=8, help="timed products per configuration")
    parser.add_argument("--batch-size", type=int, default=64, help="images in the (union) batch")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    configurations = [(1, 1), (1, 2), (2, 1)]
    results = {config: run(*config, args) for config in configurations}
    base = results[(1, 1)]["per_product"]
    rows = []
    for (world, threads), r in results.items():
        share = r["all_reduce"] / r["per_product"] if world > 1 else 0.0
        rows.append(
            [
                f"{world} process{'es' if world > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}",
                f"{r['samples'] // world}",
                f"{1.0 / r['per_product']:.2f}",
                f"{r['per_product'] * 1e3:.0f}",
                f"{base / r['per_product']:.2f}x",
                "-" if world == 1 else f"{r['all_reduce'] * 1e3:.2f}",
                "-" if world == 1 else f"{100 * share:.1f}%",
                r["method"],
            ]
        )
    first = results[(1, 1)]
    print(
        f"Mid CNN ({first['parameters']:,} parameters), batch of {first['samples']} 3x32x32 images, "
        f"float32, {args.products} timed products per configuration; CPU, gloo; no GPU lent to this task."
    )
    print(first["machine"])
    print()
    print(
        markdown_table(
            [
                "configuration",
                "samples per rank",
                "products/s",
                "ms/product",
                "speed-up vs 1x1",
                "all_reduce ms",
                "communication share",
                "HVP method",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
