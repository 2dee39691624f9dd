"""Hessian-vector products of half-precision models: how far from float64 at the same weights.

For each model of ``benchmarks/gradient_products.py``'s zoo, the weights are cast to bfloat16 and to
float16 (what ``precision="bf16-true"``/``"16-true"`` trains), and products are taken at those
weights, on the batch cast the same way:

- in the half dtype itself (what the functional API computes without ``dtype=``): the exact product
  (reverse-over-reverse) and central gradient differences;
- with ``dtype=torch.float32`` (what ``HessianCallback`` uses for half-precision parameters): the
  exact product;

each against the float64 product at the same (half-precision) weights and inputs: relative error
``||Hv - H64 v|| / ||H64 v||``, median and worst over 5 random vectors. A model whose layers have no
kernel in a dtype on this machine is reported as such.

Run: ``python benchmarks/half_precision.py`` (``--threads 1``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_line, markdown_table  # noqa: E402
from benchmarks.gradient_products import (  # noqa: E402
    FINITE_DIFFERENCE,
    MODELS,
    REVERSE,
    cross_entropy,
    problem,
    quiet_operator,
    quietly,
    relative,
)

HALF = (torch.bfloat16, torch.float16)


def cast(data: list, dtype: torch.dtype) -> list:
    return [(inputs.to(dtype), labels) for inputs, labels in data]


def errors(name: str, dtype: torch.dtype, vectors: int = 5) -> list[str]:
    """Median / worst relative errors of the half-precision and float32 products against float64."""
    model, data = problem(name)
    half = copy.deepcopy(model).to(dtype)
    reference = quiet_operator(
        copy.deepcopy(half).double(), cross_entropy, cast(cast(data, dtype), torch.float64), hvp=REVERSE
    )
    g = torch.Generator().manual_seed(0)
    directions = [torch.randn(reference.shape[0], generator=g, dtype=torch.float64) for _ in range(vectors)]
    exact = [reference @ v for v in directions]
    columns = []
    for method, product_dtype in ((REVERSE, None), (FINITE_DIFFERENCE, None), (REVERSE, torch.float32)):
        try:
            op = quiet_operator(half, cross_entropy, cast(data, dtype), hvp=method, dtype=product_dtype)
            working = product_dtype or dtype
            found = [
                relative(quietly(op.__matmul__, v.to(working)), e)
                for v, e in zip(directions, exact, strict=True)
            ]
            columns.append(f"{statistics.median(found):.1e} / {max(found):.1e}")
        except (RuntimeError, NotImplementedError) as error:
            columns.append(f"no kernel ({str(error).splitlines()[0][:60]})")
    return columns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in MODELS:
        for dtype in HALF:
            rows.append([name, str(dtype).removeprefix("torch."), *errors(name, dtype)])
    print(machine_line() + f", {args.threads} thread(s)")
    print(
        markdown_table(
            [
                "model",
                "weights",
                "exact product in that dtype",
                "gradient differences in that dtype",
                "exact product with dtype=float32",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
