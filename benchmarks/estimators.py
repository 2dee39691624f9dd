"""Spectral estimators (eigenvalues, trace, density): lightning_hessian against the libraries in use.

Problem (accuracy): the tanh MLP 20-40-40-5 of ``benchmarks.common.trained_tanh_mlp_problem`` (2,685
parameters, 512 random points, 5 classes) after 200 full-batch SGD steps at lr 0.5 with
cross-entropy. Its exact Hessian is computed densely (float64 eigenvalues). Every method uses its own
Hessian-vector products on the same model and data; products are counted at the operator.

- Eigenvalues: products and wall time to reach 1e-4 relative accuracy on the top-1 and top-5
  eigenvalues and 1e-3 absolute on the smallest. Each method's accuracy knob (tolerance, or the
  number of steps for methods without a stopping rule) is swept from loose to tight and the loosest
  setting that reaches the target is reported (median over seeds); a second table runs everything at
  its default / the same nominal ``tol=1e-4``.
- Trace: mean relative error over 10 seeds at 60 and 99 products.
- Density: Wasserstein-1 distance of the estimated eigenvalue density to the exact spectrum at equal
  products (2 probes x 50 steps = 100, 4 x 50 = 200), mean and standard error over 20 seeds.

Problem (timing): the mid-size CNN of ``benchmarks.common.mid_cnn_problem`` (141,034 parameters,
batch of 64 3x32x32 images): seconds per product and wall time of the top eigenvalue (to 1e-4
relative of a tight reference) and of a 99-product trace.

Methods: ``lh`` (this package), ``eigsh`` (scipy ARPACK on lh's products), ``curvlinops`` (its
``HessianLinearOperator``: scipy ``eigsh`` on its products; ``hutchinson_trace``,
``hutchpp_trace``, ``xtrace``; ``lanczos_approximate_spectrum``), ``eigenthings``
(hessian-eigenthings: ``lanczos``, ``trace``, ``spectral_density``), ``pyhessian`` (power iteration,
Hutchinson, SLQ density); their adapters and product counting are in ``benchmarks/peers.py``. Peers are
optional: ``n/a`` where one is not installed
(``pip install --no-deps curvlinops-for-pytorch pyhessian hessian-eigenthings``).

Run: ``python benchmarks/estimators.py --threads 1`` (``--quick`` for fewer seeds, ``--skip-cnn``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    machine_line,
    markdown_table,
    mid_cnn_problem,
    trained_tanh_mlp_problem,
)
from benchmarks.peers import (  # noqa: E402
    TIMING_ADAPTERS,
    PeerOperators,
    Sweep,
    density_methods,
    eigenvalue_methods,
    krylov_oracle_products,
    lh_operator_dense_hessian,
    lh_top_eigenvalue,
    peers_line,
    quiet_convergence_warnings,
    trace_methods,
)

TOP_REL = 1e-4
MIN_ABS = 1e-3
#: Eigenvalue targets: name -> (k, which).
TARGETS = {"top-1": (1, "largest"), "top-5": (5, "largest"), "smallest": (1, "smallest")}
NA = "n/a"

# ----------------------------------------------------------------------------------- eigenvalues


def accurate(values: np.ndarray, exact: np.ndarray, k: int, which: str) -> tuple[bool, float]:
    """Whether ``values`` (ascending) meet the target; and the error measure."""
    if values.shape[0] < k or not np.all(np.isfinite(values)):
        return False, float("inf")
    if which == "largest":
        err = float(np.max(np.abs(values[-k:] - exact[-k:]) / np.abs(exact[-k:])))
        return err <= TOP_REL, err
    err = float(abs(values[0] - exact[0]))
    return err <= MIN_ABS, err


def sweep(ops: PeerOperators, spec: Sweep, exact: np.ndarray, k: int, which: str):
    """Loosest setting reaching the target: (products, seconds, error, setting) or None."""
    for setting in spec.settings:
        try:
            values, products, seconds = ops.measure(lambda s=setting: spec.solve(s))
        except Exception:  # noqa: BLE001 - a failing setting counts as not reaching the target
            continue
        ok, err = accurate(values, exact, k, which)
        if ok:
            return products, seconds, err, setting
    return None


def eigen_benchmark(ops: PeerOperators, exact: np.ndarray, seeds: list[int]) -> dict:
    """Sweep results (median over seeds) per target and method."""
    out: dict[str, dict[str, Any]] = {}
    for target, (k, which) in TARGETS.items():
        out[target] = {}
        per_method: dict[str, list] = {}
        for seed in seeds:
            for name, spec in eigenvalue_methods(ops, k, which, seed).items():
                per_method.setdefault(name, [])
                if spec is not None:
                    per_method[name].append(sweep(ops, spec, exact, k, which))
        for name, runs in per_method.items():
            good = [r for r in runs if r is not None]
            if not runs:
                out[target][name] = None
            elif len(good) < len(runs):
                out[target][name] = "not reached"
            else:
                out[target][name] = (
                    statistics.median(r[0] for r in good),
                    statistics.median(r[1] for r in good),
                    max(r[2] for r in good),
                )
            print(f"  eig {target:9s} {name:22s} {out[target][name]}", flush=True)
    return out


def eigen_defaults(ops: PeerOperators, exact: np.ndarray, seeds: list[int]) -> list[list[str]]:
    """Each method at its default (or the nominal tol=1e-4): products and error, median over seeds."""
    rows = []
    settings = {
        "lh (tol=1e-4, default)": ("lh", 1e-4),
        "lh (tol=1e-4, check_multiplicity=False)": ("lh no check", 1e-4),
        "eigsh tol=1e-4": ("eigsh (lh HVP)", 1e-4),
        "eigsh tol=0 (default)": ("eigsh (lh HVP)", 0.0),
        "eigenthings lanczos (default steps 2k)": ("eigenthings lanczos", 0),
        "pyhessian power (default tol=1e-3)": ("pyhessian power", 1e-3),
    }
    for label, (name, setting) in settings.items():
        row = [label]
        for k, which in TARGETS.values():
            cells = []
            for seed in seeds:
                spec = eigenvalue_methods(ops, k, which, seed, include_unchecked=True).get(name)
                if spec is None:
                    break
                arg = 2 * k if name == "eigenthings lanczos" else setting
                values, products, _ = ops.measure(lambda spec=spec, arg=arg: spec.solve(arg))
                cells.append((products, accurate(values, exact, k, which)[1]))
            if not cells:
                row.append(NA)
                continue
            products = statistics.median(c[0] for c in cells)
            err = max(c[1] for c in cells)
            row.append(f"{products:g} ({err:.1e})")
        rows.append(row)
        print("  default", row, flush=True)
    return rows


def eigen_matched(ops: PeerOperators, exact: np.ndarray, seeds: list[int]) -> list[list[str]]:
    """Products when each method's own stopping rule guarantees the target (median over seeds).

    A residual ``||A x - theta x|| <= r`` bounds the eigenvalue error by ``r``. lh's ``tol`` is relative
    to the spectral scale (the largest ``|theta|``), ARPACK's to each ``|theta|``; both are set so the
    residual guarantees 1e-4 relative on the top-k values and 1e-3 absolute on the smallest. The last
    row is the Krylov oracle, a lower bound for every single-vector Krylov method.
    """
    scale = float(np.max(np.abs(exact)))
    tolerances = {  # target -> (lh tol, ARPACK tol)
        "top-1": (TOP_REL * exact[-1] / scale, TOP_REL),
        "top-5": (TOP_REL * exact[-5] / scale, TOP_REL),
        "smallest": (MIN_ABS / scale, MIN_ABS / abs(exact[0])),
    }
    cells: dict[str, list[str]] = {"lh": [], "eigsh (lh HVP)": [], "Krylov oracle (lower bound)": []}
    lh_medians = {}
    for target, (k, which) in TARGETS.items():
        lh_tol, arpack_tol = tolerances[target]
        runs: dict[str, list] = {name: [] for name in cells}
        for seed in seeds:
            methods = eigenvalue_methods(ops, k, which, seed)
            for name, tol in (("lh", lh_tol), ("eigsh (lh HVP)", arpack_tol)):
                spec = methods.get(name)
                if spec is not None:
                    values, products, _ = ops.measure(lambda spec=spec, tol=tol: spec.solve(tol))
                    runs[name].append((products, accurate(values, exact, k, which)[1]))
            oracle = krylov_oracle_products(
                ops, seed, lambda values, k=k, which=which: accurate(values, exact, k, which)[0]
            )
            runs["Krylov oracle (lower bound)"].append((oracle, 0.0))
        lh_medians[target] = statistics.median(r[0] for r in runs["lh"])
        for name, found in runs.items():
            if not found:
                cells[name].append(NA)
                continue
            products = statistics.median(r[0] for r in found)
            ratio = "" if name == "lh" else f" (x{products / lh_medians[target]:.2f})"
            error = "" if name.startswith("Krylov") else f", worst error {max(r[1] for r in found):.1e}"
            cells[name].append(f"{products:g}{ratio}{error}")
        print(f"  matched {target}", {name: cells[name][-1] for name in cells}, flush=True)
    tols = (
        "lh tol = target x |lambda| / scale ("
        + ", ".join(f"{lh:.2e}" for lh, _ in tolerances.values())
        + "); eigsh tol = "
        + ", ".join(f"{arpack:.3g}" for _, arpack in tolerances.values())
    )
    print("  matched tolerances:", tols, flush=True)
    return [[name, *row] for name, row in cells.items()]


def eigen_table(results: dict) -> str:
    """The sweep table: products / time per target, with the ratio to lh's products."""
    names = list(results["top-1"])
    rows = []
    for name in names:
        row = [name]
        for target in ("top-1", "top-5", "smallest"):
            cell = results[target].get(name)
            ours = results[target].get("lh")
            if cell is None:
                row.append(NA)
            elif isinstance(cell, str):
                row.append(cell)
            else:
                ratio = f" (x{cell[0] / ours[0]:.2f})" if isinstance(ours, tuple) and name != "lh" else ""
                row.append(f"{cell[0]:g}{ratio} / {cell[1]:.2f}s")
        rows.append(row)
    return markdown_table(
        ["method", "top-1 to 1e-4 rel: products / time", "top-5 to 1e-4 rel", "smallest to 1e-3 abs"], rows
    )


# ----------------------------------------------------------------------------------------- trace


def trace_benchmark(ops: PeerOperators, true: float, seeds: list[int]) -> list[list[str]]:
    """Per method: mean relative error, and median products / seconds, at 60 and 99 products."""
    rows = []
    for name, fn in trace_methods(ops).items():
        row = [name]
        for m in (60, 99):
            if fn is None:
                row += [NA, NA]
                continue
            errors, products, seconds = [], [], []
            for seed in seeds:
                value, used, secs = ops.measure(lambda fn=fn, m=m, seed=seed: fn(m, seed))
                errors.append(abs(value - true) / abs(true))
                products.append(used)
                seconds.append(secs)
            row += [
                f"{np.mean(errors):.4f}",
                f"{statistics.median(products):g} / {statistics.median(seconds):.2f}s",
            ]
        rows.append(row)
        print("  trace", row, flush=True)
    return rows


# --------------------------------------------------------------------------------------- density


def density_benchmark(ops: PeerOperators, exact: np.ndarray, seeds: list[int]) -> list[list[str]]:
    """Per method: W1 to the exact spectrum (mean ± standard error) at 2 x 50 and 4 x 50 products."""
    rows = []
    configs = [(2, 50), (4, 50)]
    for name, fn in density_methods(ops, exact).items():
        row = [name]
        for p, s in configs:
            if fn is None:
                row += [NA]
                continue
            w1s, products, seconds = [], [], []
            try:
                for seed in seeds:
                    value, used, secs = ops.measure(lambda fn=fn, seed=seed, p=p, s=s: fn(p, s, seed))
                    w1s.append(value)
                    products.append(used)
                    seconds.append(secs)
            except Exception as error:  # noqa: BLE001 - a peer that fails is reported, not fatal
                row.append(f"fails: {str(error).splitlines()[0][:60]}")
                continue
            used, secs = statistics.median(products), statistics.median(seconds)
            spread = np.std(w1s, ddof=1) / math.sqrt(len(w1s)) if len(w1s) > 1 else float("nan")
            row.append(f"{np.mean(w1s):.2e} ± {spread:.1e} ({used:g} products, {secs:.2f}s)")
        rows.append(row)
        print("  density", row, flush=True)
    return rows


# ------------------------------------------------------------------------------------------- CNN


def seconds_per_product(fn: Callable[[], Any] | None, columns: int) -> str:
    """Seconds per column of ``fn``'s product, timed on its second call (``n/a`` without ``fn``)."""
    if fn is None:
        return NA
    fn()
    start = time.perf_counter()
    fn()
    return f"{(time.perf_counter() - start) / columns:.3f}"


def top_eigenvalue_cell(ops: PeerOperators, spec: Sweep, reference: float) -> str:
    """Products / seconds of the loosest setting within 1e-4 relative of ``reference``."""
    for setting in spec.settings:
        value, products, seconds = ops.measure(lambda s=setting: spec.solve(s))
        if abs(value - reference) <= TOP_REL * abs(reference):
            return f"{products} / {seconds:.1f}s"
    return "not reached"


def cnn_benchmark(threads_note: str) -> list[list[str]]:
    """Seconds per product and wall time of top-1 (1e-4 rel of a tight reference) and a 99-product trace."""
    model, loss_fn, batches = mid_cnn_problem()
    ops = PeerOperators(model, loss_fn, batches)
    n = ops.n
    print(f"  CNN: {n} parameters; {threads_note}", flush=True)
    reference, used, secs = ops.measure(lambda: lh_top_eigenvalue(ops, 1e-7, seed=123))
    print(f"  CNN reference top eigenvalue {reference:.6f} ({used} products, {secs:.1f}s)", flush=True)
    v = torch.randn(n)
    block = torch.randn(n, 16)
    rows = []
    for name, build in TIMING_ADAPTERS.items():
        adapters = build(ops, v, block)  # built in turn: PyHessian draws its vector here
        if adapters is None:
            rows.append([name, NA, NA, NA, NA])
            print("  cnn", rows[-1], flush=True)
            continue
        vec = seconds_per_product(adapters.product, 1)
        mat = seconds_per_product(adapters.batched_product, 16)
        top = top_eigenvalue_cell(ops, adapters.top_eigenvalue, reference)
        if adapters.top_method is not None:
            top = f"{top} ({adapters.top_method})"
        _, used, secs = ops.measure(adapters.trace)
        rows.append([name, vec, mat, top, f"{used} / {secs:.1f}s ({adapters.trace_method})"])
        print("  cnn", rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="fewer seeds")
    parser.add_argument("--skip-cnn", action="store_true")
    parser.add_argument("--only-cnn", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only_cnn:
        print(machine_line())
        rows = cnn_benchmark(f"{torch.get_num_threads()} threads")
        header = ["method", "s/product (1 vector)", "s/product (16 batched)", "top-1: products / time"]
        print(markdown_table([*header, "trace, 99 products"], rows))
        return
    quiet_convergence_warnings()
    print(machine_line())
    print(peers_line())
    eig_seeds = [0, 1] if args.quick else [0, 1, 2]
    trace_seeds = list(range(4 if args.quick else 10))
    density_seeds = list(range(4 if args.quick else 20))

    model, loss_fn, batches = trained_tanh_mlp_problem()
    ops = PeerOperators(model, loss_fn, batches)
    start = time.perf_counter()
    dense = lh_operator_dense_hessian(ops.lh)
    exact = torch.linalg.eigvalsh(dense).numpy()
    true_trace = float(torch.trace(dense))
    print(
        f"MLP: {ops.n} parameters, loss {float(loss_fn(model, batches[0])):.4f}, dense Hessian "
        f"{time.perf_counter() - start:.1f}s; top-6 {np.round(exact[-6:][::-1], 4)}, smallest "
        f"{np.round(exact[:2], 4)}, trace {true_trace:.3f}",
        flush=True,
    )

    eig = eigen_benchmark(ops, exact, eig_seeds)
    defaults = eigen_defaults(ops, exact, eig_seeds)
    matched = eigen_matched(ops, exact, list(range(4 if args.quick else 10)))
    traces = trace_benchmark(ops, true_trace, trace_seeds)
    densities = density_benchmark(ops, exact, density_seeds)
    cnn_rows = [] if args.skip_cnn else cnn_benchmark(f"{torch.get_num_threads()} threads")

    print(
        "\n### Eigenvalues (MLP, loosest setting reaching the target; median over seeds; x = ratio to lh)\n"
    )
    print(eigen_table(eig))
    print(
        "\n### Eigenvalues at defaults / nominal tol (MLP): products (worst error: rel top, abs smallest)\n"
    )
    print(markdown_table(["method", "top-1", "top-5", "smallest"], defaults))
    print("\n### Eigenvalues with matched guarantees (MLP): products, median over seeds; x = ratio to lh\n")
    header = ["method", "top-1 to 1e-4 rel", "top-5 to 1e-4 rel", "smallest to 1e-3 abs"]
    print(markdown_table(header, matched))
    print(f"\n### Trace (MLP, true {true_trace:.3f}): mean relative error over {len(trace_seeds)} seeds\n")
    print(
        markdown_table(["method", "err @60", "products / time @60", "err @99", "products / time @99"], traces)
    )
    print(
        f"\n### Density (MLP): Wasserstein-1 to the exact spectrum, mean ± standard error over "
        f"{len(density_seeds)} seeds\n"
    )
    print(markdown_table(["method", "2 probes x 50 steps", "4 probes x 50 steps"], densities))
    if cnn_rows:
        print(
            "\n### Mid CNN (141,034 parameters, batch 64): seconds per product; top-1 to 1e-4; trace at 99\n"
        )
        print(
            markdown_table(
                [
                    "method",
                    "s/product (1 vector)",
                    "s/product (16 batched)",
                    "top-1: products / time",
                    "trace 99 products",
                ],
                cnn_rows,
            )
        )


if __name__ == "__main__":
    main()
