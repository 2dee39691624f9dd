"""Every library the benchmarks compare, behind one signature per task, with its products counted.

Libraries: ``lh`` (this package), scipy's ``eigsh`` (ARPACK) on lh's or curvlinops' products, and the
optional peers curvlinops-for-pytorch, hessian-eigenthings and PyHessian
(``bash benchmarks/install_peers.sh``). A peer is imported on first use (:func:`load_peer`), so a
script or a measured child process loads only the peers it asks for; where one is not installed its
operator and its adapters are ``None`` and the scripts print ``n/a``.

Products are counted at the operator, one per vector and one per column of a matrix, into the one
counter :data:`PRODUCTS` (methods run one at a time): the peers' operators are wrapped by
:meth:`ProductCounter.counting`; lh's adapters copy ``num_matvecs`` from their results.

Adapter shapes, per task (``ops`` is a :class:`PeerOperators`):

- eigenvalues: ``setting -> eigenvalues (ascending)``, with the settings to sweep in a :class:`Sweep`;
- trace: ``(num_matvecs, seed) -> estimate``;
- density: ``(probes, steps, seed) -> Wasserstein-1 distance to the exact spectrum``;
- dense Hessian: ``(model, loss_fn, batches) -> [N, N] tensor`` (module-level, so that
  :func:`benchmarks.common.run_isolated` can run them in a spawned process);
- timing rows of the CNN table: :class:`TimingAdapters`.
"""

from __future__ import annotations

import functools
import importlib
import math
import time
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import lightning_hessian
from lightning_hessian import HessianOperator, eigenvalues, spectral_density, trace
from lightning_hessian.krylov import KrylovBasis
from lightning_hessian.lanczos import HessianConvergenceWarning
from lightning_hessian.probes import make_generator

try:
    import scipy.sparse.linalg as sla
    from scipy.stats import wasserstein_distance
except ImportError:  # pragma: no cover - scipy is a bench dependency
    sla = None

#: Tolerances swept for methods with a stopping rule, loosest first.
TOLERANCE_SWEEP = [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 1e-6, 1e-7, 1e-8]
#: Numbers of Lanczos steps swept for methods without a stopping rule, fewest first.
STEP_SWEEP = [2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384]
#: Columns of the identity multiplied at once when a dense Hessian is built from products.
IDENTITY_CHUNK = 256

# --------------------------------------------------------------------------------- counting products


class ProductCounter:
    """Operator-vector products: one per vector, one per column of a matrix."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, x: Any) -> None:
        """Count one call on ``x``: a vector, a matrix of columns, or a list of per-parameter blocks
        (counted by its first block, which carries the columns in its last dimension).
        """
        if isinstance(x, list):
            x = x[0]
        self.count += 1 if x.ndim == 1 else x.shape[-1]

    def counting(self, multiply: Callable[..., Any], per_call: int | None = None) -> Callable[..., Any]:
        """``multiply`` counting its products before each call: those of its first argument, or a fixed
        ``per_call`` where the first argument is not the vector.
        """

        def counted(x: Any, *rest: Any) -> Any:
            if per_call is None:
                self.add(x)
            else:
                self.count += per_call
            return multiply(x, *rest)

        return counted


#: The one counter every operator counts into.
PRODUCTS = ProductCounter()

# ------------------------------------------------------------------------------------ optional peers

#: Optional peers: name printed in the benchmarks -> module that provides them.
PEER_MODULES = {
    "curvlinops": "curvlinops",
    "hessian-eigenthings": "hessian_eigenthings",
    "pyhessian": "pyhessian.hessian",
}


@functools.cache
def load_peer(name: str) -> ModuleType | None:
    """The module of the peer ``name`` (a key of :data:`PEER_MODULES`), or None where not installed.

    PyHessian's ``hessian`` object calls its module's ``hessian_vector_product`` for every product, so
    that function is replaced by one counting one product per call (its vector is a list of
    per-parameter tensors, its third argument).
    """
    try:
        module = importlib.import_module(PEER_MODULES[name])
    except ImportError:
        return None
    if name == "pyhessian":
        module.hessian_vector_product = PRODUCTS.counting(module.hessian_vector_product, per_call=1)
    return module


def peers_line() -> str:
    """Which peers are installed, e.g. ``peers: curvlinops yes, hessian-eigenthings n/a, pyhessian n/a``."""
    found = (f"{name} {'yes' if load_peer(name) is not None else 'n/a'}" for name in PEER_MODULES)
    return "peers: " + ", ".join(found)


def quiet_convergence_warnings() -> None:
    """Ignore lh's convergence warnings for the rest of the run (sweeps stop methods early on purpose)."""
    warnings.simplefilter("ignore", HessianConvergenceWarning)


# ----------------------------------------------------------------------------------------- operators


class PeerOperators:
    """The Hessian operator of every installed library on one model and data.

    Attributes:
        lh: lightning_hessian's ``HessianOperator`` (its method is chosen here, before any timing).
        n: Number of parameters.
        counter: :data:`PRODUCTS`, which the peers' operators count into.
        curvlinops: curvlinops' ``HessianLinearOperator`` (cross-entropy; products counted), or None.
        eigenthings: hessian-eigenthings' ``HessianOperator`` (products counted), or None.
        pyhessian: PyHessian's ``hessian`` on the first batch (cross-entropy; counted on import), or None.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, batches: list) -> None:
        self.lh = HessianOperator(model, loss_fn, batches)
        self.n = self.lh.shape[0]
        self.counter = PRODUCTS
        warm = torch.randn(self.n, 8)
        _ = self.lh @ warm[:, 0]  # the HVP method choice happens here, not in the timings
        _ = self.lh @ warm
        self.curvlinops = None
        curvlinops = load_peer("curvlinops")
        if curvlinops is not None:
            params = [p for p in model.parameters() if p.requires_grad]
            self.curvlinops = curvlinops.HessianLinearOperator(
                model, nn.CrossEntropyLoss(), params, batches, check_deterministic=False
            )
            self.curvlinops._matmat = self.counter.counting(self.curvlinops._matmat)
        self.eigenthings = None
        eigenthings = load_peer("hessian-eigenthings")
        if eigenthings is not None:
            self.eigenthings = eigenthings.HessianOperator(model, batches, loss_fn)
            self.eigenthings.matvec = self.counter.counting(self.eigenthings.matvec)
        self.pyhessian = None
        pyhessian = load_peer("pyhessian")
        if pyhessian is not None:
            x, y = batches[0]
            self.pyhessian = pyhessian.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)

    def measure(self, fn: Callable[[], Any]) -> tuple[Any, int, float]:
        """Call ``fn`` (warnings silenced); return its value, the products it used and its seconds."""
        self.counter.count = 0
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = fn()
        return value, self.counter.count, time.perf_counter() - start


def scipy_operator(op: Any, n: int, counter: ProductCounter) -> Any:
    """``op`` (anything with ``op @ tensor``) as a float32 scipy ``LinearOperator``; ``counter`` counts."""

    def multiply(x: np.ndarray) -> np.ndarray:
        return (op @ torch.from_numpy(np.asarray(x, dtype=np.float32))).numpy()

    matmat = counter.counting(multiply)
    return sla.LinearOperator((n, n), matvec=matmat, matmat=matmat, dtype=np.float32)


# --------------------------------------------------------------------------------------- eigenvalues


class Sweep(NamedTuple):
    """A method's accuracy knob: the settings to try, loosest first, and ``setting -> result``."""

    settings: list
    solve: Callable[[Any], Any]


def lh_eigenvalues(
    ops: PeerOperators, k: int, which: str, seed: int, check_multiplicity: bool = True
) -> Callable[[float], np.ndarray]:
    """lh's ``eigenvalues`` at tolerance ``tol`` (at most ``N`` products), ascending."""
    extra = {} if check_multiplicity else {"check_multiplicity": False}

    def solve(tol: float) -> np.ndarray:
        result = eigenvalues(ops.lh, k, which, tol=tol, max_matvecs=ops.n, seed=seed, **extra)
        ops.counter.count = result.num_matvecs
        return np.sort(result.values.numpy())

    return solve


def eigsh_eigenvalues(
    op: Any, n: int, k: int, which: str, seed: int, maxiter: int | None = None
) -> Callable[[float], np.ndarray]:
    """scipy ``eigsh`` (ARPACK) on a scipy operator at tolerance ``tol`` (0: machine precision),
    from a start vector drawn with ``seed``; ascending.
    """
    v0 = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    mode = "LA" if which == "largest" else "SA"

    def solve(tol: float) -> np.ndarray:
        values = sla.eigsh(op, k=k, which=mode, tol=tol, v0=v0, maxiter=maxiter)
        return np.sort(values[0])

    return solve


def eigenthings_lanczos(ops: PeerOperators, k: int, which: str, seed: int) -> Callable[[int], np.ndarray]:
    """hessian-eigenthings' ``lanczos`` with reorthogonalization after ``steps`` steps; ascending."""
    eigenthings = load_peer("hessian-eigenthings")

    def solve(steps: int) -> np.ndarray:
        result = eigenthings.lanczos(
            ops.eigenthings,
            k=k,
            max_iter=min(max(steps, k), ops.n),
            which="LA" if which == "largest" else "SA",
            reorthogonalize=True,
            seed=seed,
        )
        return np.sort(result.eigenvalues.numpy())

    return solve


def pyhessian_power(
    ops: PeerOperators, k: int, seed: int, max_iter: int = 1000
) -> Callable[[float], np.ndarray]:
    """PyHessian's power iteration (largest only) at tolerance ``tol``; ascending."""

    def solve(tol: float) -> np.ndarray:
        torch.manual_seed(seed)
        values, _ = ops.pyhessian.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
        return np.sort(np.array(values))

    return solve


def eigenvalue_methods(
    ops: PeerOperators, k: int, which: str, seed: int, include_unchecked: bool = False
) -> dict[str, Sweep | None]:
    """Per method (in table order): its tolerance or step sweep; None where the peer is missing.

    ``"lh no check"`` (``check_multiplicity=False``) only with ``include_unchecked``; the
    ``"eigsh (lh HVP)"`` row only where scipy is installed.
    """
    methods: dict[str, Sweep | None] = {"lh": Sweep(TOLERANCE_SWEEP, lh_eigenvalues(ops, k, which, seed))}
    if include_unchecked:
        unchecked = lh_eigenvalues(ops, k, which, seed, check_multiplicity=False)
        methods["lh no check"] = Sweep(TOLERANCE_SWEEP, unchecked)
    arpack_tolerances = [*TOLERANCE_SWEEP, 0.0]
    if sla is not None:
        lh_scipy = scipy_operator(ops.lh, ops.n, ops.counter)  # lh's products are counted here
        methods["eigsh (lh HVP)"] = Sweep(
            arpack_tolerances, eigsh_eigenvalues(lh_scipy, ops.n, k, which, seed, maxiter=10**5)
        )
    methods["curvlinops + eigsh"] = None
    if ops.curvlinops is not None:
        curvlinops_scipy = scipy_operator(ops.curvlinops, ops.n, ProductCounter())  # counted inside
        methods["curvlinops + eigsh"] = Sweep(
            arpack_tolerances, eigsh_eigenvalues(curvlinops_scipy, ops.n, k, which, seed, maxiter=10**5)
        )
    methods["eigenthings lanczos"] = None
    if ops.eigenthings is not None:
        steps = [s for s in STEP_SWEEP if s >= k]
        methods["eigenthings lanczos"] = Sweep(steps, eigenthings_lanczos(ops, k, which, seed))
    methods["pyhessian power"] = None
    if ops.pyhessian is not None and which == "largest":
        methods["pyhessian power"] = Sweep(TOLERANCE_SWEEP, pyhessian_power(ops, k, seed))
    return methods


def krylov_oracle_products(ops: PeerOperators, seed: int, reached: Callable[[np.ndarray], bool]) -> int:
    """Fewest products after which full-reorthogonalization Lanczos's Ritz values (ascending) are
    ``reached`` (judged against the exact spectrum).

    This oracle stop is a lower bound for every single-vector Krylov method from a random start,
    restarted ones such as ARPACK included.
    """
    krylov = KrylovBasis(ops.lh, ops.n, ops.n, make_generator("cpu", seed))
    krylov.inject()
    while krylov.pending:
        krylov.step([0])
        if reached(np.sort(krylov.ritz().values.numpy())):
            break
    return krylov.num_matvecs


# --------------------------------------------------------------------------------------------- trace

#: Trace estimators of lh and their names in curvlinops.
CURVLINOPS_TRACE = {"hutchinson": "hutchinson_trace", "hutch++": "hutchpp_trace", "xtrace": "xtrace"}


def lh_trace(ops: PeerOperators, method: str) -> Callable[[int, int], float]:
    """lh's ``trace`` with ``method`` (``"hutchinson"``, ``"hutch++"``, ``"xtrace"``)."""

    def estimate(num_matvecs: int, seed: int) -> float:
        result = trace(ops.lh, method, num_matvecs, seed=seed)
        ops.counter.count = result.num_matvecs
        return result.value

    return estimate


def curvlinops_trace(ops: PeerOperators, method: str) -> Callable[[int, int], float]:
    """curvlinops' estimator for ``method``, at the largest product count it accepts (a multiple of 3
    for Hutch++, of 2 for XTrace) not above the one asked.
    """
    estimator = getattr(load_peer("curvlinops"), CURVLINOPS_TRACE[method])
    multiple = 3 if method == "hutch++" else 2 if method == "xtrace" else 1

    def estimate(num_matvecs: int, seed: int) -> float:
        torch.manual_seed(seed)
        return float(estimator(ops.curvlinops, num_matvecs - num_matvecs % multiple))

    return estimate


def eigenthings_trace(ops: PeerOperators, method: str) -> Callable[[int, int], float]:
    """hessian-eigenthings' ``trace`` with ``method`` (``"hutchinson"``, ``"hutch++"``)."""
    eigenthings = load_peer("hessian-eigenthings")

    def estimate(num_matvecs: int, seed: int) -> float:
        return float(
            eigenthings.trace(ops.eigenthings, num_matvecs=num_matvecs, method=method, seed=seed).estimate
        )

    return estimate


def pyhessian_trace(ops: PeerOperators) -> Callable[[int, int], float]:
    """PyHessian's Hutchinson ``trace``, run for exactly ``num_matvecs`` probes (no early stop)."""

    def estimate(num_matvecs: int, seed: int) -> float:
        torch.manual_seed(seed)
        return float(np.mean(ops.pyhessian.trace(maxIter=num_matvecs, tol=-math.inf)))

    return estimate


def trace_methods(ops: PeerOperators) -> dict[str, Callable[[int, int], float] | None]:
    """Per method (in table order): ``(num_matvecs, seed) -> estimate``; None where the peer is missing."""
    methods: dict[str, Callable[[int, int], float] | None] = {}
    for method in ("hutchinson", "hutch++", "xtrace"):
        methods[f"lh {method}"] = lh_trace(ops, method)
    for method in CURVLINOPS_TRACE:
        methods[f"curvlinops {method}"] = (
            curvlinops_trace(ops, method) if ops.curvlinops is not None else None
        )
    for method in ("hutchinson", "hutch++"):
        methods[f"eigenthings {method}"] = (
            eigenthings_trace(ops, method) if ops.eigenthings is not None else None
        )
    methods["pyhessian hutchinson"] = pyhessian_trace(ops) if ops.pyhessian is not None else None
    return methods


# ------------------------------------------------------------------------------------------- density


def wasserstein_to_spectrum(nodes: np.ndarray, weights: np.ndarray, exact: np.ndarray) -> float:
    """Wasserstein-1 distance of a weighted set of nodes (non-finite or weightless ones dropped) to
    the exact eigenvalues.
    """
    keep = np.isfinite(nodes) & (weights > 0)
    return float(wasserstein_distance(nodes[keep], exact, u_weights=weights[keep]))


def lh_density(ops: PeerOperators, exact: np.ndarray) -> Callable[[int, int, int], float]:
    """lh's ``spectral_density`` (SLQ nodes and weights)."""

    def distance(probes: int, steps: int, seed: int) -> float:
        d = spectral_density(ops.lh, num_probes=probes, num_steps=steps, seed=seed)
        ops.counter.count = d.num_matvecs
        return wasserstein_to_spectrum(d.nodes.numpy(), d.weights.numpy(), exact)

    return distance


def eigenthings_density(ops: PeerOperators, exact: np.ndarray) -> Callable[[int, int, int], float]:
    """hessian-eigenthings' ``spectral_density`` (its raw SLQ nodes and weights, normalized)."""
    eigenthings = load_peer("hessian-eigenthings")

    def distance(probes: int, steps: int, seed: int) -> float:
        d = eigenthings.spectral_density(ops.eigenthings, num_runs=probes, lanczos_steps=steps, seed=seed)
        nodes, weights = d.raw_eigenvalues.flatten().numpy(), d.raw_weights.flatten().numpy()
        return wasserstein_to_spectrum(nodes, weights / weights.sum(), exact)

    return distance


def pyhessian_density(ops: PeerOperators, exact: np.ndarray) -> Callable[[int, int, int], float]:
    """PyHessian's ``density`` (SLQ nodes and weights, normalized)."""

    def distance(probes: int, steps: int, seed: int) -> float:
        torch.manual_seed(seed)
        nodes, weights = ops.pyhessian.density(iter=steps, n_v=probes)
        nodes, weights = np.array(nodes).ravel(), np.array(weights).ravel()
        return wasserstein_to_spectrum(nodes, weights / weights.sum(), exact)

    return distance


def curvlinops_density(ops: PeerOperators, exact: np.ndarray) -> Callable[[int, int, int], float]:
    """curvlinops' ``lanczos_approximate_spectrum`` (a density on a grid, normalized)."""
    curvlinops = load_peer("curvlinops")

    def distance(probes: int, steps: int, seed: int) -> float:
        torch.manual_seed(seed)
        grid, density = curvlinops.lanczos_approximate_spectrum(ops.curvlinops, ncv=steps, num_repeats=probes)
        grid, density = grid.double().numpy(), density.double().numpy()
        return float(wasserstein_distance(grid, exact, u_weights=density / density.sum()))

    return distance


def density_methods(
    ops: PeerOperators, exact: np.ndarray
) -> dict[str, Callable[[int, int, int], float] | None]:
    """Per method (in table order): ``(probes, steps, seed) -> W1 to exact``; None where missing."""
    return {
        "lh SLQ": lh_density(ops, exact),
        "eigenthings SLQ": eigenthings_density(ops, exact) if ops.eigenthings is not None else None,
        "pyhessian SLQ": pyhessian_density(ops, exact) if ops.pyhessian is not None else None,
        "curvlinops": curvlinops_density(ops, exact) if ops.curvlinops is not None else None,
    }


# ------------------------------------------------------------------------------------ dense Hessians


def products_with_identity(multiply: Callable[[Tensor], Tensor], out: Tensor, dtype: torch.dtype) -> Tensor:
    """Fill ``out`` ``[N, N]`` with ``multiply`` of the identity, :data:`IDENTITY_CHUNK` columns at a time
    (each chunk of the identity in ``dtype``).
    """
    n = out.shape[0]
    for start in range(0, n, IDENTITY_CHUNK):
        stop = min(n, start + IDENTITY_CHUNK)
        basis = torch.zeros(n, stop - start, dtype=dtype)
        basis[torch.arange(start, stop), torch.arange(stop - start)] = 1
        out[:, start:stop] = multiply(basis)
    return out


def lh_operator_dense_hessian(op: HessianOperator) -> Tensor:
    """The exact Hessian from lh's products with identity columns (float64, symmetrized)."""
    n = op.shape[0]
    out = products_with_identity(
        lambda basis: (op @ basis).double(), torch.empty(n, n, dtype=torch.float64), op.dtype
    )
    return 0.5 * (out + out.T)


def lh_dense_hessian(model: nn.Module, loss_fn: Callable, batches: list) -> Tensor:
    """``lightning_hessian.hessian(model, loss_fn, batches)``."""
    return lightning_hessian.hessian(model, loss_fn, batches)


def torch_func_dense_hessian(model: nn.Module, loss_fn: Callable, batches: list) -> Tensor:
    """``torch.func.hessian`` of a flat-parameter cross-entropy closure over ``functional_call``
    (first batch).
    """
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    batch = batches[0]

    def flat_loss(theta: Tensor) -> Tensor:
        pieces = torch.split(theta, sizes)
        params = {n: t.view(s) for n, t, s in zip(names, pieces, shapes, strict=True)}
        return F.cross_entropy(functional_call(model, params, (batch[0],)), batch[1])

    return torch.func.hessian(flat_loss)(flat)


def curvlinops_dense_hessian(model: nn.Module, loss_fn: Callable, batches: list) -> Tensor:
    """curvlinops' ``HessianLinearOperator`` (cross-entropy) applied to identity column chunks (float32)."""
    curvlinops = load_peer("curvlinops")
    params = [p for p in model.parameters() if p.requires_grad]
    op = curvlinops.HessianLinearOperator(
        model, torch.nn.CrossEntropyLoss(), params, batches, check_deterministic=False
    )
    n = sum(p.numel() for p in params)
    return products_with_identity(lambda basis: op @ basis, torch.empty(n, n), torch.get_default_dtype())


# ---------------------------------------------------------------------------------- timing (CNN table)


class TimingAdapters(NamedTuple):
    """One library's row of the timing table.

    Attributes:
        product: One product with the fixed vector.
        batched_product: One product with the fixed 16-column block; None where the library has none.
        top_eigenvalue: ``setting -> top eigenvalue``, with the settings to sweep.
        top_method: Name of the eigenvalue method in the table (None: not named).
        trace: A 99-product trace estimate (seed 0).
        trace_method: Name of the trace estimator in the table.
    """

    product: Callable[[], Any]
    batched_product: Callable[[], Any] | None
    top_eigenvalue: Sweep
    top_method: str | None
    trace: Callable[[], Any]
    trace_method: str


def lh_top_eigenvalue(ops: PeerOperators, tol: float, seed: int) -> float:
    """lh's largest eigenvalue at tolerance ``tol`` (products counted)."""
    result = eigenvalues(ops.lh, 1, tol=tol, seed=seed)
    ops.counter.count = result.num_matvecs
    return result.values.item()


def lh_timing(ops: PeerOperators, v: Tensor, block: Tensor) -> TimingAdapters:
    """lh: ``op @ v``, ``op @ block``, ``eigenvalues`` (seed 0) and Hutch++."""
    return TimingAdapters(
        product=lambda: ops.lh @ v,
        batched_product=lambda: ops.lh @ block,
        top_eigenvalue=Sweep(TOLERANCE_SWEEP, lambda tol: lh_top_eigenvalue(ops, tol, seed=0)),
        top_method=None,
        trace=lambda: lh_trace(ops, "hutch++")(99, 0),
        trace_method="hutch++",
    )


def curvlinops_timing(ops: PeerOperators, v: Tensor, block: Tensor) -> TimingAdapters | None:
    """curvlinops: ``op @ v``, ``op @ block``, scipy ``eigsh`` on its products and ``hutchpp_trace``."""
    if ops.curvlinops is None:
        return None
    op = ops.curvlinops
    top = eigsh_eigenvalues(scipy_operator(op, ops.n, ProductCounter()), ops.n, 1, "largest", seed=0)
    return TimingAdapters(
        product=lambda: op @ v,
        batched_product=lambda: op @ block,
        top_eigenvalue=Sweep(TOLERANCE_SWEEP, lambda tol: float(top(tol)[-1])),
        top_method="eigsh",
        trace=lambda: curvlinops_trace(ops, "hutch++")(99, 0),
        trace_method="hutchpp_trace",
    )


def eigenthings_timing(ops: PeerOperators, v: Tensor, block: Tensor) -> TimingAdapters | None:
    """hessian-eigenthings: ``matvec(v)``, ``lanczos`` (no reorthogonalization, seed 0) and Hutch++."""
    if ops.eigenthings is None:
        return None
    eigenthings = load_peer("hessian-eigenthings")
    op = ops.eigenthings

    def top(steps: int) -> float:
        return float(eigenthings.lanczos(op, k=1, max_iter=steps, which="LA", seed=0).eigenvalues[0])

    return TimingAdapters(
        product=lambda: op.matvec(v),
        batched_product=None,
        top_eigenvalue=Sweep(STEP_SWEEP[:12], top),
        top_method="lanczos",
        trace=lambda: eigenthings_trace(ops, "hutch++")(99, 0),
        trace_method="hutch++",
    )


def pyhessian_timing(ops: PeerOperators, v: Tensor, block: Tensor) -> TimingAdapters | None:
    """PyHessian: ``hessian_vector_product`` (a fresh random vector), power iteration and Hutchinson."""
    if ops.pyhessian is None:
        return None
    hvp, ph = load_peer("pyhessian").hessian_vector_product, ops.pyhessian
    vectors = [torch.randn_like(p) for p in ph.params]
    top = pyhessian_power(ops, 1, seed=0, max_iter=200)
    return TimingAdapters(
        product=lambda: hvp(ph.gradsH, ph.params, vectors),
        batched_product=None,
        top_eigenvalue=Sweep(TOLERANCE_SWEEP[:9], lambda tol: float(top(tol)[-1])),
        top_method="power",
        trace=lambda: pyhessian_trace(ops)(99, 0),
        trace_method="hutchinson",
    )


#: Per library (in table order): ``(ops, v, block) -> its timing adapters``, None where missing.
TIMING_ADAPTERS: dict[str, Callable[[PeerOperators, Tensor, Tensor], TimingAdapters | None]] = {
    "lh": lh_timing,
    "curvlinops": curvlinops_timing,
    "eigenthings": eigenthings_timing,
    "pyhessian": pyhessian_timing,
}
