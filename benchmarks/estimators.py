"""Spectral estimators (eigenvalues, trace, density): lightning_hessian against the libraries in use.

Problem (accuracy): the tanh MLP 20-40-40-5 of ``benchmarks.common.tanh_mlp_problem`` (2,685
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
``HessianLinearOperator``: scipy ``eigsh`` through ``to_scipy()``; ``hutchinson_trace``,
``hutchpp_trace``, ``xtrace``; ``lanczos_approximate_spectrum``), ``eigenthings``
(hessian-eigenthings: ``lanczos``, ``trace``, ``spectral_density``), ``pyhessian`` (power iteration,
Hutchinson, SLQ density). Peers are optional: ``n/a`` where one is not installed
(``pip install --no-deps curvlinops-for-pytorch pyhessian hessian-eigenthings``).

Run: ``python benchmarks/estimators.py --threads 1`` (``--quick`` for fewer seeds, ``--skip-cnn``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_line, markdown_table, mid_cnn_problem, tanh_mlp_problem  # noqa: E402
from lightning_hessian import HessianOperator, eigenvalues, spectral_density, trace  # noqa: E402
from lightning_hessian.lanczos import HessianConvergenceWarning, KrylovBasis  # noqa: E402
from lightning_hessian.linear_operator import make_generator  # noqa: E402

try:
    import scipy.sparse.linalg as sla
    from scipy.stats import wasserstein_distance
except ImportError:  # pragma: no cover - scipy is a bench dependency
    sla = None
try:
    import curvlinops
except ImportError:
    curvlinops = None
try:
    import hessian_eigenthings as eigenthings
except ImportError:
    eigenthings = None
try:
    import pyhessian  # noqa: F401

    pyhessian_module = sys.modules["pyhessian.hessian"]
except ImportError:
    pyhessian_module = None

TOP_REL = 1e-4
MIN_ABS = 1e-3
#: Eigenvalue targets: name -> (k, which).
TARGETS = {"top-1": (1, "largest"), "top-5": (5, "largest"), "smallest": (1, "smallest")}
TOLS = [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 1e-6, 1e-7, 1e-8]
STEPS = [2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384]
NA = "n/a"

# ------------------------------------------------------------------------------------------ problem


def trained_mlp() -> tuple[nn.Module, Callable, list]:
    """The tanh MLP after 200 full-batch SGD steps at lr 0.5 (deterministic)."""
    model, loss_fn, batches = tanh_mlp_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(200):
        optimizer.zero_grad()
        loss_fn(model, batches[0]).backward()
        optimizer.step()
    model.eval()
    return model, loss_fn, batches


def dense_hessian(op: HessianOperator, chunk: int = 256) -> torch.Tensor:
    """The exact Hessian from batched products with identity columns (float64, symmetrized)."""
    n = op.shape[0]
    out = torch.empty(n, n, dtype=torch.float64)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        eye = torch.zeros(n, stop - start, dtype=op.dtype)
        eye[torch.arange(start, stop), torch.arange(stop - start)] = 1
        out[:, start:stop] = (op @ eye).double()
    return 0.5 * (out + out.T)


# ------------------------------------------------------------------------------- counted operators


class Counter:
    """Counts operator-vector products (one per column)."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, x: Any) -> None:
        self.count += 1 if x.ndim == 1 else x.shape[-1]


#: One counter for every operator (methods run one at a time).
COUNTER = Counter()

if pyhessian_module is not None:
    _pyhessian_hvp = pyhessian_module.hessian_vector_product

    def _counted_pyhessian_hvp(grads: Any, params: Any, v: Any) -> Any:
        COUNTER.count += 1
        return _pyhessian_hvp(grads, params, v)

    pyhessian_module.hessian_vector_product = _counted_pyhessian_hvp


def scipy_operator(n: int, multiply: Callable[[np.ndarray], np.ndarray], counter: Counter):
    """A float32 scipy LinearOperator counting its products."""

    def matmat(x: np.ndarray) -> np.ndarray:
        counter.add(x)
        return multiply(np.asarray(x, dtype=np.float32))

    return sla.LinearOperator((n, n), matvec=matmat, matmat=matmat, dtype=np.float32)


class Suite:
    """Every library's operator on one model and data, each with a product counter."""

    def __init__(self, model: nn.Module, loss_fn: Callable, batches: list) -> None:
        self.model, self.loss_fn, self.batches = model, loss_fn, batches
        self.lh = HessianOperator(model, loss_fn, batches)
        self.n = self.lh.shape[0]
        self.counter = COUNTER
        self.exact = np.zeros(0)
        warm = torch.randn(self.n, 8)
        _ = self.lh @ warm[:, 0]  # the HVP method choice happens here, not in the timings
        _ = self.lh @ warm
        self.curvlinops = None
        if curvlinops is not None:
            params = [p for p in model.parameters() if p.requires_grad]
            self.curvlinops = curvlinops.HessianLinearOperator(
                model, nn.CrossEntropyLoss(), params, batches, check_deterministic=False
            )
            original = self.curvlinops._matmat

            def counted(x, _original=original):
                self.counter.add(x[0] if isinstance(x, list) else x)
                return _original(x)

            self.curvlinops._matmat = counted
        self.eigenthings = None
        if eigenthings is not None:
            self.eigenthings = eigenthings.HessianOperator(model, batches, loss_fn)
            original_mv = self.eigenthings.matvec

            def counted_mv(v, _original=original_mv):
                self.counter.add(v)
                return _original(v)

            self.eigenthings.matvec = counted_mv
        self.pyhessian = None
        if pyhessian_module is not None:
            x, y = batches[0]
            self.pyhessian = pyhessian_module.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)

    def run(self, fn: Callable[[], Any]) -> tuple[Any, int, float]:
        """Call ``fn``; return its value, products and seconds."""
        self.counter.count = 0
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = fn()
        return value, self.counter.count, time.perf_counter() - start


# ----------------------------------------------------------------------------------- eigenvalues


def eig_methods(
    suite: Suite, k: int, which: str, seed: int, only_checked: bool = True
) -> dict[str, tuple[list, Callable] | None]:
    """Per method: (settings to sweep, loose first; ``setting -> sorted ascending values``)."""
    lh_op, counter = suite.lh, suite.counter

    def ours(tol: float) -> np.ndarray:
        result = eigenvalues(lh_op, k, which, tol=tol, max_matvecs=suite.n, seed=seed)
        counter.count = result.num_matvecs
        return np.sort(result.values.numpy())

    def arpack(op: Any) -> Callable[[float], np.ndarray]:
        v0 = np.random.default_rng(seed).standard_normal(suite.n).astype(np.float32)

        def run(tol: float) -> np.ndarray:
            values = sla.eigsh(
                op, k=k, which="LA" if which == "largest" else "SA", tol=tol, v0=v0, maxiter=10**5
            )
            return np.sort(values[0])

        return run

    def ours_unchecked(tol: float) -> np.ndarray:
        result = eigenvalues(
            lh_op, k, which, tol=tol, max_matvecs=suite.n, seed=seed, check_multiplicity=False
        )
        counter.count = result.num_matvecs
        return np.sort(result.values.numpy())

    methods: dict[str, Any] = {"lh": (TOLS, ours)}
    if not only_checked:
        methods["lh no check"] = (TOLS, ours_unchecked)
    if sla is not None:
        wrapped = scipy_operator(suite.n, lambda x: (lh_op @ torch.from_numpy(x)).numpy(), counter)
        methods["eigsh (lh HVP)"] = (TOLS + [0.0], arpack(wrapped))
    methods["curvlinops + eigsh"] = None
    if suite.curvlinops is not None:
        cl = suite.curvlinops
        wrapped_cl = scipy_operator(suite.n, lambda x: (cl @ torch.from_numpy(x)).numpy(), Counter())
        methods["curvlinops + eigsh"] = (TOLS + [0.0], arpack(wrapped_cl))
    methods["eigenthings lanczos"] = None
    if suite.eigenthings is not None:

        def lanczos_steps(steps: int) -> np.ndarray:
            result = eigenthings.lanczos(
                suite.eigenthings,
                k=k,
                max_iter=min(max(steps, k), suite.n),
                which="LA" if which == "largest" else "SA",
                reorthogonalize=True,
                seed=seed,
            )
            return np.sort(result.eigenvalues.numpy())

        methods["eigenthings lanczos"] = ([s for s in STEPS if s >= k], lanczos_steps)
    methods["pyhessian power"] = None
    if suite.pyhessian is not None and which == "largest":

        def power(tol: float) -> np.ndarray:
            torch.manual_seed(seed)
            values, _ = suite.pyhessian.eigenvalues(maxIter=1000, tol=tol, top_n=k)
            return np.sort(np.array(values))

        methods["pyhessian power"] = (TOLS, power)
    return methods


def accurate(values: np.ndarray, exact: np.ndarray, k: int, which: str) -> tuple[bool, float]:
    """Whether ``values`` (ascending) meet the target; and the error measure."""
    if values.shape[0] < k or not np.all(np.isfinite(values)):
        return False, float("inf")
    if which == "largest":
        err = float(np.max(np.abs(values[-k:] - exact[-k:]) / np.abs(exact[-k:])))
        return err <= TOP_REL, err
    err = float(abs(values[0] - exact[0]))
    return err <= MIN_ABS, err


def sweep(suite: Suite, spec: tuple[list, Callable], exact: np.ndarray, k: int, which: str):
    """Loosest setting reaching the target: (products, seconds, error, setting) or None."""
    settings, fn = spec
    for setting in settings:
        try:
            values, products, seconds = suite.run(lambda s=setting: fn(s))
        except Exception:  # noqa: BLE001 - a failing setting counts as not reaching the target
            continue
        ok, err = accurate(values, exact, k, which)
        if ok:
            return products, seconds, err, setting
    return None


def eigen_benchmark(suite: Suite, exact: np.ndarray, seeds: list[int]) -> dict:
    """Sweep results (median over seeds) per target and method."""
    out: dict[str, dict[str, Any]] = {}
    for target, (k, which) in TARGETS.items():
        out[target] = {}
        per_method: dict[str, list] = {}
        for seed in seeds:
            for name, spec in eig_methods(suite, k, which, seed).items():
                per_method.setdefault(name, [])
                if spec is not None:
                    per_method[name].append(sweep(suite, spec, exact, k, which))
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


def eigen_defaults(suite: Suite, exact: np.ndarray, seeds: list[int]) -> list[list[str]]:
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
                spec = eig_methods(suite, k, which, seed, only_checked=False).get(name)
                if spec is None:
                    break
                arg = 2 * k if name == "eigenthings lanczos" else setting
                values, products, _ = suite.run(lambda spec=spec, arg=arg: spec[1](arg))
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


def krylov_oracle(suite: Suite, exact: np.ndarray, k: int, which: str, seed: int) -> int:
    """Fewest products after which full-reorthogonalization Lanczos's Ritz values meet the target.

    The oracle stop (judged against the exact spectrum) is a lower bound for every single-vector Krylov
    method from a random start, restarted ones such as ARPACK included.
    """
    krylov = KrylovBasis(suite.lh, suite.n, suite.n, make_generator("cpu", seed))
    krylov.inject()
    while krylov.pending:
        krylov.step([0])
        values = np.sort(krylov.ritz().values.numpy())
        if accurate(values, exact, k, which)[0]:
            break
    return krylov.num_matvecs


def eigen_matched(suite: Suite, exact: np.ndarray, seeds: list[int]) -> list[list[str]]:
    """Products when each method's own stopping rule guarantees the target (median over seeds).

    A residual ``||A x - theta x|| <= r`` bounds the eigenvalue error by ``r``. lh's ``tol`` is relative
    to the spectral scale (the largest ``|theta|``), ARPACK's to each ``|theta|``; both are set so the
    residual guarantees 1e-4 relative on the top-k values and 1e-3 absolute on the smallest.
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
            methods = eig_methods(suite, k, which, seed)
            for name, tol in (("lh", lh_tol), ("eigsh (lh HVP)", arpack_tol)):
                spec = methods.get(name)
                if spec is not None:
                    values, products, _ = suite.run(lambda spec=spec, tol=tol: spec[1](tol))
                    runs[name].append((products, accurate(values, exact, k, which)[1]))
            runs["Krylov oracle (lower bound)"].append((krylov_oracle(suite, exact, k, which, seed), 0.0))
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


# ----------------------------------------------------------------------------------------- trace


def trace_methods(suite: Suite) -> dict[str, Callable[[int, int], float] | None]:
    """Per method: ``(num_matvecs, seed) -> estimate``."""
    out: dict[str, Any] = {}

    def ours(m: int, s: int, method: str) -> float:
        result = trace(suite.lh, method, m, seed=s)
        suite.counter.count = result.num_matvecs
        return result.value

    for method in ("hutchinson", "hutch++", "xtrace"):
        out[f"lh {method}"] = lambda m, s, method=method: ours(m, s, method)
    names = {"hutchinson": "hutchinson_trace", "hutch++": "hutchpp_trace", "xtrace": "xtrace"}
    for method, fn_name in names.items():
        out[f"curvlinops {method}"] = None
        if suite.curvlinops is not None:

            def cl(m: int, s: int, fn_name: str = fn_name, method: str = method) -> float:
                torch.manual_seed(s)
                m = m - m % (3 if method == "hutch++" else 2 if method == "xtrace" else 1)
                return float(getattr(curvlinops, fn_name)(suite.curvlinops, m))

            out[f"curvlinops {method}"] = cl
    for method in ("hutchinson", "hutch++"):
        out[f"eigenthings {method}"] = None
        if suite.eigenthings is not None:
            out[f"eigenthings {method}"] = lambda m, s, method=method: float(
                eigenthings.trace(suite.eigenthings, num_matvecs=m, method=method, seed=s).estimate
            )
    out["pyhessian hutchinson"] = None
    if suite.pyhessian is not None:

        def ph(m: int, s: int) -> float:
            torch.manual_seed(s)
            return float(np.mean(suite.pyhessian.trace(maxIter=m, tol=-math.inf)))

        out["pyhessian hutchinson"] = ph
    return out


def trace_benchmark(suite: Suite, true: float, seeds: list[int]) -> list[list[str]]:
    rows = []
    for name, fn in trace_methods(suite).items():
        row = [name]
        for m in (60, 99):
            if fn is None:
                row += [NA, NA]
                continue
            errors, products, seconds = [], [], []
            for seed in seeds:
                value, used, secs = suite.run(lambda fn=fn, m=m, seed=seed: fn(m, seed))
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


def w1_nodes(nodes: np.ndarray, weights: np.ndarray, exact: np.ndarray) -> float:
    keep = np.isfinite(nodes) & (weights > 0)
    return float(wasserstein_distance(nodes[keep], exact, u_weights=weights[keep]))


def density_methods(suite: Suite) -> dict[str, Callable[[int, int, int], float] | None]:
    """Per method: ``(probes, steps, seed) -> W1 to the exact spectrum`` (uses ``suite.exact``)."""
    exact = suite.exact

    def ours(p: int, s: int, seed: int) -> float:
        d = spectral_density(suite.lh, num_probes=p, num_steps=s, seed=seed)
        suite.counter.count = d.num_matvecs
        return w1_nodes(d.nodes.numpy(), d.weights.numpy(), exact)

    out: dict[str, Any] = {"lh SLQ": ours, "eigenthings SLQ": None, "pyhessian SLQ": None, "curvlinops": None}
    if suite.eigenthings is not None:

        def he(p: int, s: int, seed: int) -> float:
            d = eigenthings.spectral_density(suite.eigenthings, num_runs=p, lanczos_steps=s, seed=seed)
            nodes, weights = d.raw_eigenvalues.flatten().numpy(), d.raw_weights.flatten().numpy()
            return w1_nodes(nodes, weights / weights.sum(), exact)

        out["eigenthings SLQ"] = he
    if suite.pyhessian is not None:

        def ph(p: int, s: int, seed: int) -> float:
            torch.manual_seed(seed)
            nodes, weights = suite.pyhessian.density(iter=s, n_v=p)
            nodes, weights = np.array(nodes).ravel(), np.array(weights).ravel()
            return w1_nodes(nodes, weights / weights.sum(), exact)

        out["pyhessian SLQ"] = ph
    if suite.curvlinops is not None:

        def cl(p: int, s: int, seed: int) -> float:
            torch.manual_seed(seed)
            grid, density = curvlinops.lanczos_approximate_spectrum(suite.curvlinops, ncv=s, num_repeats=p)
            grid, density = grid.double().numpy(), density.double().numpy()
            return float(wasserstein_distance(grid, exact, u_weights=density / density.sum()))

        out["curvlinops"] = cl
    return out


def density_benchmark(suite: Suite, seeds: list[int]) -> list[list[str]]:
    rows = []
    configs = [(2, 50), (4, 50)]
    for name, fn in density_methods(suite).items():
        row = [name]
        for p, s in configs:
            if fn is None:
                row += [NA]
                continue
            w1s, products, seconds = [], [], []
            try:
                for seed in seeds:
                    value, used, secs = suite.run(lambda fn=fn, seed=seed, p=p, s=s: fn(p, s, seed))
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


def cnn_benchmark(threads_note: str) -> list[list[str]]:
    """Seconds per product and wall time of top-1 (1e-4 rel of a tight reference) and a 99-product trace."""
    model, loss_fn, batches = mid_cnn_problem()
    suite = Suite(model, loss_fn, batches)
    n = suite.n
    print(f"  CNN: {n} parameters; {threads_note}", flush=True)

    def top1(tol: float, seed: int) -> float:
        result = eigenvalues(suite.lh, 1, tol=tol, seed=seed)
        suite.counter.count = result.num_matvecs
        return result.values.item()

    reference, used, secs = suite.run(lambda: top1(1e-7, 123))
    print(f"  CNN reference top eigenvalue {reference:.6f} ({used} products, {secs:.1f}s)", flush=True)

    def top_ok(value: float) -> bool:
        return abs(value - reference) <= TOP_REL * abs(reference)

    v = torch.randn(n)
    block = torch.randn(n, 16)
    rows = []

    def per_product(fn_vec: Callable | None, fn_mat: Callable | None) -> tuple[str, str]:
        cells = []
        for fn, cols in ((fn_vec, 1), (fn_mat, 16)):
            if fn is None:
                cells.append(NA)
                continue
            fn()
            start = time.perf_counter()
            fn()
            cells.append(f"{(time.perf_counter() - start) / cols:.3f}")
        return cells[0], cells[1]

    def top1_sweep(fn: Callable[[float], float], settings: list) -> str:
        for setting in settings:
            value, products, seconds = suite.run(lambda s=setting: fn(s))
            if top_ok(value):
                return f"{products} / {seconds:.1f}s"
        return "not reached"

    lh_vec, lh_mat = per_product(lambda: suite.lh @ v, lambda: suite.lh @ block)
    lh_top = top1_sweep(lambda t: top1(t, 0), TOLS)
    result, _, secs = suite.run(lambda: trace(suite.lh, "hutch++", 99, seed=0))
    used = result.num_matvecs
    rows.append(["lh", lh_vec, lh_mat, lh_top, f"{used} / {secs:.1f}s (hutch++)"])
    print("  cnn", rows[-1], flush=True)
    if suite.curvlinops is not None:
        cl = suite.curvlinops
        vec, mat = per_product(lambda: cl @ v, lambda: cl @ block)
        wrapped = scipy_operator(n, lambda x: (cl @ torch.from_numpy(x)).numpy(), Counter())
        v0 = np.random.default_rng(0).standard_normal(n).astype(np.float32)
        top = top1_sweep(lambda t: float(sla.eigsh(wrapped, k=1, which="LA", tol=t, v0=v0)[0][0]), TOLS)
        torch.manual_seed(0)
        _, used, secs = suite.run(lambda: curvlinops.hutchpp_trace(cl, 99))
        rows.append(["curvlinops", vec, mat, f"{top} (eigsh)", f"{used} / {secs:.1f}s (hutchpp_trace)"])
    else:
        rows.append(["curvlinops", NA, NA, NA, NA])
    print("  cnn", rows[-1], flush=True)
    if suite.eigenthings is not None:
        he_op = suite.eigenthings
        vec, _ = per_product(lambda: he_op.matvec(v), None)
        top = top1_sweep(
            lambda s: float(eigenthings.lanczos(he_op, k=1, max_iter=s, which="LA", seed=0).eigenvalues[0]),
            STEPS[:12],
        )
        _, used, secs = suite.run(lambda: eigenthings.trace(he_op, num_matvecs=99, method="hutch++", seed=0))
        rows.append(["eigenthings", vec, NA, f"{top} (lanczos)", f"{used} / {secs:.1f}s (hutch++)"])
    else:
        rows.append(["eigenthings", NA, NA, NA, NA])
    print("  cnn", rows[-1], flush=True)
    if suite.pyhessian is not None:
        ph = suite.pyhessian
        vv = [torch.randn_like(p) for p in ph.params]
        vec, _ = per_product(lambda: pyhessian_module.hessian_vector_product(ph.gradsH, ph.params, vv), None)

        def power(tol: float) -> float:
            torch.manual_seed(0)
            return float(ph.eigenvalues(maxIter=200, tol=tol, top_n=1)[0][0])

        top = top1_sweep(power, TOLS[:9])
        torch.manual_seed(0)
        _, used, secs = suite.run(lambda: ph.trace(maxIter=99, tol=-math.inf))
        rows.append(["pyhessian", vec, NA, f"{top} (power)", f"{used} / {secs:.1f}s (hutchinson)"])
    else:
        rows.append(["pyhessian", NA, NA, NA, NA])
    print("  cnn", rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------------------- main


def eigen_table(results: dict) -> str:
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
    warnings.simplefilter("ignore", HessianConvergenceWarning)
    print(machine_line())
    print(
        "peers:",
        ", ".join(
            f"{name} {'yes' if mod is not None else NA}"
            for name, mod in (
                ("curvlinops", curvlinops),
                ("hessian-eigenthings", eigenthings),
                ("pyhessian", pyhessian_module),
            )
        ),
    )
    eig_seeds = [0, 1] if args.quick else [0, 1, 2]
    trace_seeds = list(range(4 if args.quick else 10))
    density_seeds = list(range(4 if args.quick else 20))

    model, loss_fn, batches = trained_mlp()
    suite = Suite(model, loss_fn, batches)
    start = time.perf_counter()
    dense = dense_hessian(suite.lh)
    exact = torch.linalg.eigvalsh(dense).numpy()
    suite.exact = exact
    true_trace = float(torch.trace(dense))
    print(
        f"MLP: {suite.n} parameters, loss {float(loss_fn(model, batches[0])):.4f}, dense Hessian "
        f"{time.perf_counter() - start:.1f}s; top-6 {np.round(exact[-6:][::-1], 4)}, smallest "
        f"{np.round(exact[:2], 4)}, trace {true_trace:.3f}",
        flush=True,
    )

    eig = eigen_benchmark(suite, exact, eig_seeds)
    defaults = eigen_defaults(suite, exact, eig_seeds)
    matched = eigen_matched(suite, exact, list(range(4 if args.quick else 10)))
    traces = trace_benchmark(suite, true_trace, trace_seeds)
    densities = density_benchmark(suite, density_seeds)
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
