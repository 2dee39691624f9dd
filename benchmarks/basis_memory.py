"""Peak memory of one shared-space run against the formula that ``check_basis_fits`` refuses by.

Operator: a diagonal float32 matrix of size ``N`` (default 1,000,000), multiplied as ``d[:, None] * V``:
no model graphs, so the run's memory is the Krylov basis and the vectors around it. Each configuration
runs :func:`lightning_hessian.shared_space.shared_space_estimates` (4 probes, at most 32 block steps,
``tol=1e-12`` so that the basis fills: the worst case) in a fresh spawned process:

- plain, for the peak RSS growth (``VmHWM`` reset just before the call, minus the RSS then: the
  first run in the process, so the runtime's first-use growth and the C allocator's kept heap count);
- with ``--tensors``, once more under ``torch.profiler`` (``profile_memory=True``), for the peak of the
  bytes that PyTorch's CPU allocator held at once during the call (tensors only).

Both are compared with :func:`lightning_hessian.shared_space.peak_bytes` (the formula) and with the
formula documented before (``itemsize * N * (capacity + block + trace probes)``). MiB = 2**20 bytes.

``--restart`` instead prints the products of a top-3-and-smallest search without density (``tol=1e-6``)
on a diagonal spectrum like a network's Hessian (``N = 100,000``, float64), uncapped and with the basis
capped by ``max_basis_bytes`` (thick restarts), against the exact eigenvalues.

Run::

    python benchmarks/basis_memory.py                   # N = 1e6, 2 threads
    python benchmarks/basis_memory.py --tensors         # also the allocator's peak (a second process)
    python benchmarks/basis_memory.py --n 200000 --threads 1
    python benchmarks/basis_memory.py --restart
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_line, markdown_table, run_isolated  # noqa: E402
from lightning_hessian import shared_space  # noqa: E402
from lightning_hessian.memory import allocator_peak_bytes  # noqa: E402

MIB = 2**20
#: (label, keyword arguments of ``shared_space_estimates``) of each configuration.
CONFIGURATIONS = [
    ("density, trace probes 0", {"trace_probes": 0}),
    ("density, trace probes 16", {"trace_probes": 16}),
    ("density, trace probes 32", {"trace_probes": 32}),
    ("density, trace probes 64", {"trace_probes": 64}),
    ("density, trace probes 99", {"trace_probes": 99}),
    ("top-3 only, trace probes 16", {"density": False, "min_eigenvalue": False, "trace_probes": 16}),
]
COMMON = {"num_probes": 4, "max_steps": 32, "tol": 1e-12, "top_k": 3, "seed": 0}


class DiagonalOperator:
    """``diag(d)`` through the operator protocol."""

    def __init__(self, n: int) -> None:
        self.d = torch.linspace(-0.1, 1.0, n, dtype=torch.float32)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.d.shape[0], self.d.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.d.dtype

    @property
    def device(self) -> torch.device:
        return self.d.device

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        return self.d * other if other.ndim == 1 else self.d[:, None] * other


def build(n: int, kwargs: dict) -> tuple[DiagonalOperator, dict]:
    return DiagonalOperator(n), kwargs


def run(op: DiagonalOperator, kwargs: dict) -> tuple[int, int]:
    result = shared_space.shared_space_estimates(op, **COMMON, **kwargs)
    return result.num_matvecs, result.num_steps


def profiled(op: DiagonalOperator, kwargs: dict) -> int:
    """Peak bytes the CPU allocator held at once during the call (above what it held before)."""
    return allocator_peak_bytes(lambda: shared_space.shared_space_estimates(op, **COMMON, **kwargs))


def formulas(n: int, kwargs: dict) -> tuple[int, int, int]:
    """``(capacity, bytes of the formula, bytes of the formula documented before)``."""
    settings = {**COMMON, **kwargs}
    block = settings["num_probes"]
    free = shared_space.available_memory(torch.device("cpu"))
    cap_bytes = shared_space.BASIS_BYTES if free is None else int(shared_space.BASIS_MEMORY_SHARE * free)
    capacity = shared_space.basis_capacity(n, block, settings["max_steps"], torch.float32, cap_bytes)
    old = 4 * n * (capacity + block + settings.get("trace_probes", 16))
    return capacity, shared_space.peak_bytes(n, capacity, block, 0, torch.float32), old


def hessian_like_diagonal(n: int) -> torch.Tensor:
    """Outliers 9, 6, 5, 3 and -0.8 above and below a bulk of ``0.05 N(0, 1) - 0.02`` (float64)."""
    bulk = 0.05 * torch.randn(n - 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.02
    return torch.cat([torch.tensor([9.0, 6.0, 5.0, 3.0, -0.8], dtype=torch.float64), bulk])


def restart_table(n: int) -> None:
    """Products of the capped (restarted) search against the uncapped one, and their errors."""
    op = DiagonalOperator(n)
    op.d = hessian_like_diagonal(n)
    exact = op.d.sort().values
    rows = []
    for columns in (None, 64, 32, 16, 12):
        kwargs = {"top_k": 3, "density": False, "trace": False, "tol": 1e-6, "max_steps": 200, "seed": 0}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = shared_space.shared_space_estimates(
                op, max_basis_bytes=None if columns is None else 8 * n * columns, **kwargs
            )
        values = torch.cat([result.eigenvalues.values, result.min_eigenvalue.values])
        error = (values - torch.cat([exact.flip(0)[:3], exact[:1]])).abs().max()
        flags = torch.cat([result.eigenvalues.converged, result.min_eigenvalue.converged])
        rows.append(
            [
                "uncapped" if columns is None else f"{columns} columns",
                result.num_matvecs,
                result.num_steps,
                f"{bool(flags.all())}",
                f"{float(error):.1e}",
                len(caught),
            ]
        )
    print(f"N = {n:,} float64 diagonal, top-3 and smallest, no density, tol=1e-6 (threshold 9e-6)")
    header = ["basis", "products", "block steps", "all converged", "max error", "warnings"]
    print(markdown_table(header, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tensors", action="store_true", help="also the allocator's peak")
    parser.add_argument("--restart", action="store_true", help="the thick-restart products instead")
    args = parser.parse_args()
    print(machine_line(), flush=True)
    if args.restart:
        torch.set_num_threads(args.threads)
        restart_table(100_000 if args.n == 1_000_000 else args.n)
        return
    print(f"N = {args.n:,} float32; {COMMON}", flush=True)
    rows = []
    for label, kwargs in CONFIGURATIONS:
        capacity, formula, old = formulas(args.n, kwargs)
        plain = run_isolated(run, args.n, kwargs, setup=build, threads=args.threads)
        if plain.error:
            raise SystemExit(plain.error)
        tensors = "-"
        if args.tensors:
            profiled_run = run_isolated(profiled, args.n, kwargs, setup=build, threads=args.threads)
            if profiled_run.error:
                raise SystemExit(profiled_run.error)
            tensors = f"{profiled_run.result / MIB:.0f}"
        rss = plain.peak_increment_bytes
        rows.append(
            [
                label,
                capacity,
                f"{plain.result[0]} / {plain.result[1]}",
                f"{old / MIB:.0f}",
                f"{formula / MIB:.0f}",
                tensors,
                f"{rss / MIB:.0f}",
                f"{rss / formula:.2f}x",
            ]
        )
        print(" | ".join(str(cell) for cell in rows[-1]), flush=True)
    header = [
        "configuration",
        "capacity",
        "products / steps",
        "formula before MiB",
        "formula MiB",
        "peak tensors MiB",
        "peak RSS growth MiB",
        "RSS / formula",
    ]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
