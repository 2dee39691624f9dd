"""Dense Hessian of the seed CNN (12x12, 23,365 parameters): lightning_hessian against the alternatives.

Each method runs in its own fresh process (one after the other, never two at once), which reports
its wall time and peak RSS. Methods (the library adapters are in ``benchmarks/peers.py``):

- ``lh``: ``lh.hessian(model, loss_fn, data)``.
- ``seed 2``: the seed document's second method VERBATIM: ``torch.autograd.functional.hessian`` over
  the tuple of flattened parameters with the hand-written ``forward_loss``.
- ``seed 1 (fair)``: the seed's first method (a loop over the gradient's entries, each
  ``autograd.grad``-ed once more) made fair: rows go into a preallocated ``[N, N]`` matrix instead of
  a quadratic ``torch.cat``.
- ``torch.func``: ``torch.func.hessian`` of a flat-parameter closure over ``functional_call``. Needs
  about 15 GB; skipped unless that much memory is free (or with ``--skip-func``).
- ``curvlinops``: ``curvlinops.HessianLinearOperator`` applied to identity column chunks, if installed
  (``pip install --no-deps curvlinops-for-pytorch einops einconv linear_operator``).

Accuracy: the largest absolute difference from a float64 reference on a fixed set of rows (every
bias row, rows of each weight tensor; computed by an independent float64 row loop), and the largest
absolute difference from ``lh``'s full matrix (saved to a temporary file; read back memory-mapped
after the peak memory was recorded).

Run: ``python benchmarks/dense.py`` (add ``--skip-func`` to never run torch.func, ``--only lh seed1``
to run a subset, ``--repeat 2`` to run each method more than once and keep the fastest).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    GB,
    Measurement,
    free_memory_bytes,
    machine_line,
    markdown_table,
    num_parameters,
    run_isolated,
    seed_cnn_problem,
)
from benchmarks.peers import (  # noqa: E402
    curvlinops_dense_hessian,
    lh_dense_hessian,
    load_peer,
    torch_func_dense_hessian,
)

H_SIZE, W_SIZE = 12, 12
FUNC_NEEDS_BYTES = 18 * 10**9  # torch.func.hessian peaked at ~15.6 GB here; keep a margin on a shared machine
NUM_REFERENCE_ROWS = 200

# ------------------------------------------------------------------------------------------ problem


def setup_problem():
    """Untimed set-up in each child: the seed CNN, its batch and a loss_fn (same seeds everywhere).

    Libraries are imported before any method runs (lh with ``benchmarks.peers``, curvlinops here), so
    that no method's time includes an import.
    """
    load_peer("curvlinops")
    model, loss_fn, batches = seed_cnn_problem(H_SIZE, W_SIZE)
    return model, loss_fn, batches


def reference_rows(n: int) -> list[int]:
    """Rows to check against float64: all biases, the first/last rows of the weights, random others."""
    model, _, _ = seed_cnn_problem(H_SIZE, W_SIZE)
    rows, start = set(), 0
    generator = torch.Generator().manual_seed(123)
    for name, p in model.named_parameters():
        size = p.numel()
        if name.endswith("bias"):
            rows.update(range(start, start + size))
        else:
            rows.update([start, start + 1, start + size - 1])
            rows.update((start + torch.randperm(size, generator=generator)[:40]).tolist())
        start += size
    return sorted(rows)[:NUM_REFERENCE_ROWS] if len(rows) > NUM_REFERENCE_ROWS else sorted(rows)


def float64_reference(rows: list[int]) -> torch.Tensor:
    """Rows of H in float64 by an independent row loop (double backward of single gradient entries)."""
    model, loss_fn, batches = seed_cnn_problem(H_SIZE, W_SIZE)
    model = model.double()
    x, y = batches[0]
    params = list(model.parameters())
    loss = loss_fn(model, (x.double(), y))
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, create_graph=True)])
    out = torch.empty(len(rows), grad.numel(), dtype=torch.float64)
    for k, i in enumerate(rows):
        row = torch.autograd.grad(
            grad[i], params, retain_graph=True, allow_unused=True, materialize_grads=True
        )
        torch.cat([r.reshape(-1) for r in row], out=out[k])
    return out


# ------------------------------------------------------------------------------------------ methods


# The seed's method 2, verbatim except for one change: the seed draws x and y *inside* forward_loss
# (a new random batch on every call). To make the comparison a fixed function, they are drawn once,
# outside, with a fixed seed (the same batch every other method uses: `seed_cnn_problem`).
_SEED_X, _SEED_Y = seed_cnn_problem(H_SIZE, W_SIZE)[2][0]


def forward_loss(a, b, c, d):
    p = [a.view(32, 1, 3, 3), b, c.view(5, 32 * 12 * 12), d]
    x = _SEED_X  # seed: x = torch.randn(size=[8, 1, 12, 12], dtype=torch.float32)
    y = _SEED_Y  # seed: y = torch.randint(0, 5, [8])
    x = F.conv2d(x, p[0], p[1], 1, 1)
    x = x.view(x.size(0), -1)
    x = F.linear(x, p[2], p[3])
    loss = F.cross_entropy(x, y)
    return loss


def method_seed2(model, loss_fn, batches):
    net = model
    h = torch.autograd.functional.hessian(forward_loss, tuple([_.view(-1) for _ in net.parameters()]))
    return h  # a 4x4 tuple of blocks, left as the seed leaves it (assembling it is not timed)


def method_seed1_fair(model, loss_fn, batches):
    params = list(model.parameters())
    loss = loss_fn(model, batches[0])
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, create_graph=True)])
    n = grad.numel()
    hessian = torch.empty(n, n, dtype=grad.dtype)
    for i in range(n):
        row = torch.autograd.grad(
            grad[i], params, retain_graph=True, allow_unused=True, materialize_grads=True
        )
        torch.cat([r.reshape(-1) for r in row], out=hessian[i])
    return hessian


METHODS = {
    "lh": ("lh.hessian", lh_dense_hessian),
    "seed2": ("seed 2: autograd.functional.hessian (verbatim)", method_seed2),
    "seed1": ("seed 1: row loop, preallocated (fair)", method_seed1_fair),
    "func": ("torch.func.hessian (flat closure)", torch_func_dense_hessian),
    "curvlinops": ("curvlinops HessianLinearOperator @ I", curvlinops_dense_hessian),
}

# ------------------------------------------------------------------------------------------ accuracy


def _rows_of(result, rows: list[int]) -> torch.Tensor:
    """Selected rows of a method's result ([N, N] tensor, or the seed's tuple of blocks)."""
    if isinstance(result, torch.Tensor):
        return result[rows].double()
    sizes = [block_row[0].shape[0] for block_row in result]
    offsets = np.cumsum([0, *sizes])
    out = []
    for i in rows:
        b = int(np.searchsorted(offsets, i, side="right") - 1)
        out.append(torch.cat([blk[i - offsets[b]].reshape(-1) for blk in result[b]]).double())
    return torch.stack(out)


def _max_difference_to_file(result, path: str) -> float:
    """Largest |result - lh| with lh's matrix memory-mapped from ``path``, in row slabs."""
    reference = np.load(path, mmap_mode="r")
    n = reference.shape[0]
    worst = 0.0
    if isinstance(result, torch.Tensor):
        for start in range(0, n, 2048):
            ref = torch.from_numpy(np.array(reference[start : start + 2048]))
            worst = max(worst, float((result[start : start + 2048] - ref).abs().max()))
        return worst
    row_start = 0
    for block_row in result:
        rows = block_row[0].shape[0]
        col_start = 0
        for blk in block_row:
            cols = blk.reshape(rows, -1).shape[1]
            ref = np.array(reference[row_start : row_start + rows, col_start : col_start + cols])
            worst = max(worst, float((blk.reshape(rows, cols) - torch.from_numpy(ref)).abs().max()))
            col_start += cols
        row_start += rows
    return worst


def post_compare(result, model, loss_fn, batches, *, rows_path: str, ref_path: str, lh_path: str, save: bool):
    """In the child after timing: errors vs the float64 rows and vs lh's matrix; lh saves its matrix."""
    rows = torch.load(rows_path)
    reference = torch.load(ref_path)
    out = {"err64": float((_rows_of(result, rows) - reference).abs().max())}
    symmetric = isinstance(result, torch.Tensor) and result.shape[0] == result.shape[1]
    if symmetric:
        sample = rows[:: max(1, len(rows) // 20)]
        out["asym"] = float(max((result[i] - result[:, i]).abs().max() for i in sample))
    if save:
        np.save(lh_path, result.numpy())
    elif os.path.exists(lh_path):
        out["err_lh"] = _max_difference_to_file(result, lh_path)
    return out


class _Post:
    """Picklable ``post`` carrying the paths (spawned children import this module by name)."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def __call__(self, result, *state):
        return post_compare(result, *state, **self.kwargs)


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(METHODS), help="methods to run (default all)")
    parser.add_argument("--skip-func", action="store_true", help="never run torch.func.hessian (~15 GB)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per method; the fastest is kept")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each child")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a child is killed")
    args = parser.parse_args()
    wanted = args.only or list(METHODS)
    if "lh" not in wanted:
        wanted = ["lh", *wanted]  # lh's matrix is the reference for the full comparison

    model, _, _ = seed_cnn_problem(H_SIZE, W_SIZE)
    n = num_parameters(model)
    hessian_bytes = n * n * 4
    print(f"# Dense Hessian, seed CNN at {H_SIZE}x{W_SIZE}: N = {n:,} parameters, batch of 8")
    print(f"# {machine_line()}")
    print(
        f"# the float32 Hessian itself: {hessian_bytes / GB:.2f} GB; target peak <= 1.5x = "
        f"{1.5 * hessian_bytes / GB:.2f} GB"
    )

    with tempfile.TemporaryDirectory(prefix="lh-dense-bench-") as tmp:
        rows = reference_rows(n)
        paths = {
            "rows_path": os.path.join(tmp, "rows.pt"),
            "ref_path": os.path.join(tmp, "ref64.pt"),
            "lh_path": os.path.join(tmp, "lh.npy"),
        }
        torch.save(rows, paths["rows_path"])
        torch.save(float64_reference(rows), paths["ref_path"])

        results: dict[str, Measurement] = {}
        for key in wanted:
            label, fn = METHODS[key]
            if key == "func":
                free = free_memory_bytes()
                if args.skip_func or free < FUNC_NEEDS_BYTES:
                    why = "--skip-func" if args.skip_func else f"needs ~15.6 GB, {free / GB:.1f} GB free"
                    results[key] = Measurement(error=f"skipped ({why})")
                    print(f"{label}: skipped ({why})", flush=True)
                    continue
            if key == "curvlinops" and load_peer("curvlinops") is None:
                results[key] = Measurement(error="n/a (curvlinops not installed)")
                print(f"{label}: n/a (not installed)", flush=True)
                continue
            best = None
            for _ in range(max(1, args.repeat)):
                post = _Post(**paths, save=key == "lh" and best is None)
                m = run_isolated(
                    fn, setup=setup_problem, post=post, threads=args.threads, timeout=args.timeout
                )
                if best is None or (m.error is None and (best.error or m.seconds < best.seconds)):
                    best = m
            results[key] = best
            status = best.error.strip().splitlines()[-1] if best.error else f"{best.seconds:.2f} s"
            print(f"{label}: {status}", flush=True)

    lh_m = results["lh"]
    seed_times = [results[k].seconds for k in ("seed1", "seed2") if k in results and not results[k].error]
    header = [
        "method",
        "wall s",
        "x lh time",
        "peak RSS GB",
        "peak above start GB",
        "max abs diff vs float64 rows",
        "max abs diff vs lh",
    ]
    table = []
    for key in wanted:
        m, label = results[key], METHODS[key][0]
        if m.error:
            table.append([label, m.error.strip().splitlines()[-1], "", "", "", "", ""])
            continue
        r = m.result or {}
        table.append(
            [
                label,
                f"{m.seconds:.2f}",
                f"{m.seconds / lh_m.seconds:.2f}" if not lh_m.error else "",
                f"{m.peak_bytes / GB:.2f}",
                f"{m.peak_increment_bytes / GB:.2f}",
                f"{r.get('err64', float('nan')):.2e}",
                "(reference)" if key == "lh" else f"{r.get('err_lh', float('nan')):.2e}",
            ]
        )
    print()
    print(markdown_table(header, table))
    print()
    if not lh_m.error:
        if seed_times:
            fastest_seed = min(seed_times)
            print(
                f"target speed: lh {lh_m.seconds:.2f} s vs faster seed method {fastest_seed:.2f} s = "
                f"{fastest_seed / lh_m.seconds:.1f}x faster (target >= 2x): "
                f"{'met' if fastest_seed >= 2 * lh_m.seconds else 'NOT met'}"
            )
        print(
            f"target memory: lh peak {lh_m.peak_bytes / GB:.2f} GB (above start "
            f"{lh_m.peak_increment_bytes / GB:.2f} GB) vs 1.5 x {hessian_bytes / GB:.2f} GB = "
            f"{1.5 * hessian_bytes / GB:.2f} GB: "
            f"{'met' if lh_m.peak_bytes <= 1.5 * hessian_bytes else 'NOT met'}"
        )
        if "asym" in (lh_m.result or {}):
            print(f"lh symmetry: max |H[i, :] - H[:, i]| on sampled rows = {lh_m.result['asym']:.1e}")


if __name__ == "__main__":
    main()
