"""One block Krylov space for eigenvalues, density and trace, against exact spectra."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import lightning_hessian.shared_space as shared_space
from lightning_hessian.errors import HessianTooLargeError
from lightning_hessian.lanczos import HessianConvergenceWarning
from lightning_hessian.linear_operator import MatrixOperator
from lightning_hessian.memory import allocator_peak_bytes
from lightning_hessian.shared_space import shared_space_estimates
from tests.spectra import with_spectrum


def hessian_like(n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A few outliers above a bulk near zero with a negative tail, like a network's Hessian."""
    generator = torch.Generator().manual_seed(seed)
    bulk = 0.05 * torch.randn(n - 5, generator=generator, dtype=torch.float64) - 0.02
    values = torch.cat([torch.tensor([9.0, 6.0, 5.0, 3.0, -0.8], dtype=torch.float64), bulk]).sort().values
    return with_spectrum(values, seed), values


def test_extreme_eigenvalues_are_converged_within_the_tolerance():
    matrix, values = hessian_like()
    tol = 1e-6
    result = shared_space_estimates(MatrixOperator(matrix), top_k=3, tol=tol, max_steps=60, seed=1)
    scale = float(values.abs().max())
    assert bool(result.eigenvalues.converged.all()) and bool(result.min_eigenvalue.converged.all())
    torch.testing.assert_close(result.eigenvalues.values, values.flip(0)[:3], rtol=0, atol=tol * scale)
    torch.testing.assert_close(result.min_eigenvalue.values, values[:1], rtol=0, atol=tol * scale)
    assert torch.all(result.eigenvalues.residuals <= tol * scale)


def test_counts_every_product_at_the_operator():
    matrix, _ = hessian_like()
    op = MatrixOperator(matrix)
    result = shared_space_estimates(op, top_k=2, seed=0)
    assert result.num_matvecs == op.num_matvecs


def test_density_is_block_gauss_quadrature_over_the_probes():
    matrix = hessian_like(60)[0]
    op = MatrixOperator(matrix)
    steps, probes = 5, 3
    result = shared_space_estimates(
        op,
        top_k=0,
        min_eigenvalue=False,
        trace=False,
        num_probes=probes,
        min_steps=steps,
        max_steps=steps,
        seed=2,
    )
    generator = shared_space.make_generator("cpu", 2)
    s = shared_space.rademacher(60, probes, generator, torch.float64, torch.device("cpu"))
    s, _ = torch.linalg.qr(s)
    nodes, weights = result.density.nodes, result.density.weights
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
    for degree in range(2 * steps):  # exact for polynomials of degree below 2 * steps
        exact = float(torch.trace(s.T @ torch.linalg.matrix_power(matrix, degree) @ s)) / probes
        assert float((weights * nodes**degree).sum()) == pytest.approx(exact, rel=1e-8, abs=1e-10)


def test_krylov_aware_trace_is_exact_once_the_space_is_everything():
    matrix, values = hessian_like(40)
    result = shared_space_estimates(MatrixOperator(matrix), num_probes=4, min_steps=10, max_steps=10, seed=0)
    assert result.trace.value == pytest.approx(float(values.sum()), abs=1e-9)
    assert result.trace.stderr == 0.0 and result.trace.num_matvecs == 0


def test_krylov_aware_trace_is_unbiased_and_its_stderr_calibrated():
    matrix, values = hessian_like(300)
    true = float(values.sum())
    z = []
    for seed in range(40):
        result = shared_space_estimates(
            MatrixOperator(matrix),
            top_k=1,
            min_eigenvalue=False,
            density=False,
            max_steps=3,
            min_steps=3,
            trace_probes=12,
            seed=seed,
            tol=1e-12,
        )
        z.append((result.trace.value - true) / result.trace.stderr)
    z = torch.tensor(z)
    assert abs(float(z.mean())) < 0.5  # unbiased: mean of 40 standardized errors
    assert 0.6 < math.sqrt(float((z**2).mean())) < 1.5  # the standard error is the error's scale


@pytest.mark.parametrize("density", [True, False])  # without density: one random probe beside them
def test_warm_and_cold_starts_agree_within_the_tolerance(density):
    matrix, values = hessian_like()
    op = MatrixOperator(matrix)
    cold = shared_space_estimates(
        op, top_k=3, tol=1e-6, max_steps=60, seed=0, keep_vectors=3, density=density
    )
    warm = shared_space_estimates(
        op, top_k=3, tol=1e-6, max_steps=60, seed=1, start_vectors=cold.vectors, density=density
    )
    scale = float(values.abs().max())
    torch.testing.assert_close(warm.eigenvalues.values, cold.eigenvalues.values, rtol=0, atol=2e-6 * scale)
    if density:  # the same block steps, the warm vectors beside the probes
        assert warm.num_steps <= cold.num_steps
    else:  # one chain, one vector per step: compare products
        assert warm.num_matvecs < cold.num_matvecs


@pytest.mark.parametrize("density", [True, False])
def test_a_new_eigenvalue_that_overtakes_the_previous_top_is_found_with_a_warm_start(density):
    matrix, values = hessian_like()
    before = shared_space_estimates(
        MatrixOperator(matrix), top_k=3, tol=1e-6, max_steps=60, seed=0, keep_vectors=3
    )
    # A new direction, orthogonal to the previous top eigenvectors, with a larger eigenvalue.
    generator = torch.Generator().manual_seed(7)
    u = torch.randn(matrix.shape[0], generator=generator, dtype=torch.float64)
    v = before.vectors
    u = u - v @ (v.T @ u)
    u = u / u.norm()
    changed = matrix + 20.0 * torch.outer(u, u)
    exact = torch.linalg.eigvalsh(changed).flip(0)[:3]
    after = shared_space_estimates(
        MatrixOperator(changed), top_k=3, tol=1e-6, max_steps=60, seed=1, start_vectors=v, density=density
    )
    torch.testing.assert_close(after.eigenvalues.values, exact, rtol=0, atol=1e-5 * float(exact[0]))


def top_only(op: MatrixOperator, tol: float, seed: int, **kwargs) -> shared_space.SharedSpaceResult:
    """The top 3 alone, without density, stopping from the first step on (as ``analyze`` runs it)."""
    return shared_space_estimates(
        op,
        top_k=3,
        min_eigenvalue=False,
        density=False,
        trace=False,
        tol=tol,
        min_steps=1,
        seed=seed,
        **kwargs,
    )


def with_new_direction(matrix: torch.Tensor, old: torch.Tensor, value: float, seed: int) -> torch.Tensor:
    """``matrix`` plus a rank-one term that puts an eigenvalue near ``value`` along a random direction
    orthogonal to the columns of ``old``."""
    u = torch.randn(matrix.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for _ in range(2):
        u = u - old @ (old.T @ u)
    u = u / u.norm()
    return matrix + (value - float(u @ matrix @ u)) * torch.outer(u, u)


@pytest.mark.parametrize("tol", [1e-3, 1e-6])
def test_warm_and_cold_starts_without_density_match_the_exact_top_after_the_spectrum_moved(tol):
    matrix, _ = hessian_like()
    kept = top_only(MatrixOperator(matrix), tol, seed=0, keep_vectors=3).vectors
    noise = torch.randn(300, 300, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    moved = matrix + 0.1 * (noise + noise.T) / 2  # the kept vectors are now only moderately good
    exact = torch.linalg.eigvalsh(moved).flip(0)[:3]
    cold = top_only(MatrixOperator(moved), tol, seed=1)
    warm = top_only(MatrixOperator(moved), tol, seed=1, start_vectors=kept)
    threshold = tol * float(exact[0])
    for result in (cold, warm):
        assert bool(result.eigenvalues.converged.all())
        assert torch.all(result.eigenvalues.residuals <= result.eigenvalues.tol)
        torch.testing.assert_close(result.eigenvalues.values, exact, rtol=0, atol=threshold)
    torch.testing.assert_close(warm.eigenvalues.values, cold.eigenvalues.values, rtol=0, atol=threshold)
    assert warm.num_matvecs < cold.num_matvecs


# 29 is far above the old top 9, 9.3 just above it, 5.5 between the old second (6) and third (5),
# 5.05 just above the old third (by 5.5 times the residual threshold 0.009).
@pytest.mark.parametrize("value", [29.0, 9.3, 5.5, 5.05])
def test_a_new_eigenvalue_entering_the_top_is_found_with_a_warm_start_without_density(value):
    """The old vectors stay exact eigenvectors, so they converge at once: only the random part of
    the start can reveal the new direction (NOTE [Warm start without density])."""
    matrix, _ = hessian_like()
    tol = 1e-3
    kept = top_only(MatrixOperator(matrix), tol, seed=0, keep_vectors=3).vectors
    for seed in range(10):
        changed = with_new_direction(matrix, kept, value, seed)
        exact = torch.linalg.eigvalsh(changed).flip(0)[:3]
        warm = top_only(MatrixOperator(changed), tol, seed=seed + 1, start_vectors=kept)
        assert bool(warm.eigenvalues.converged.all())
        torch.testing.assert_close(warm.eigenvalues.values, exact, rtol=0, atol=tol * float(exact[0]))


@pytest.mark.parametrize("top", [(9.0, 9.0, 5.0, 3.0), (9.0, 9.0, 9.0, 3.0)])
def test_a_warm_start_keeps_the_copies_of_a_repeated_eigenvalue_that_its_vectors_carry(top):
    generator = torch.Generator().manual_seed(0)
    bulk = 0.05 * torch.randn(295, generator=generator, dtype=torch.float64) - 0.02
    values = torch.cat([torch.tensor([*top, -0.8], dtype=torch.float64), bulk]).sort().values
    op = MatrixOperator(with_spectrum(values, 0))
    tol = 1e-3
    cold = top_only(op, tol, seed=0, keep_vectors=3)
    warm = top_only(op, tol, seed=1, start_vectors=cold.vectors)
    exact = values.flip(0)[:3]
    for result in (cold, warm):
        torch.testing.assert_close(result.eigenvalues.values, exact, rtol=0, atol=tol * float(exact[0]))


class Diagonal:
    """``diag(d)``: a product allocates only its result, so a run's memory is the estimator's own."""

    def __init__(self, d: torch.Tensor) -> None:
        self.d = d
        self.shape, self.dtype, self.device = (d.shape[0], d.shape[0]), d.dtype, d.device

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        return self.d * other if other.ndim == 1 else self.d[:, None] * other


N_MEMORY = 20_000
WARM = torch.linalg.qr(torch.randn(N_MEMORY, 3, generator=torch.Generator().manual_seed(0)))[0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"trace_probes": 0},
        {"trace_probes": 64},  # the probes go in chunks of the block: no more memory than 0
        {"trace_probes": 16, "return_vectors": True, "keep_vectors": 5},
        {"density": False, "trace_probes": 16, "max_basis_bytes": 4 * N_MEMORY * 20},  # restarts
        {"density": False, "min_eigenvalue": False, "start_vectors": WARM},  # the warm chain
        {"start_vectors": WARM.double()},  # beside the probes, cast a column at a time
    ],
    ids=["density", "64-trace-probes", "returned-vectors", "capped-restarts", "warm-chain", "warm-block"],
)
def test_the_formula_bounds_what_the_allocator_holds_at_the_peak(kwargs):
    """The tensors of the formula ``check_basis_fits`` refuses by, against the bytes of the tensors
    alive at the peak (the old ``capacity + block + trace probes`` columns fell short by 20 to 200
    columns' worth at N = 1e6: benchmarks/basis_memory.py --tensors)."""
    op = Diagonal(torch.linspace(-0.1, 1.0, N_MEMORY))
    settings = {"num_probes": 4, "max_steps": 32, "tol": 1e-12, "top_k": 3, "seed": 0, **kwargs}
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HessianConvergenceWarning)  # the capped run is cut short
        peak = allocator_peak_bytes(lambda: results.append(shared_space_estimates(op, **settings)))
    warm = kwargs.get("start_vectors")
    probes = 1 if warm is not None and kwargs.get("density") is False else 4
    block = probes + (0 if warm is None else warm.shape[1])
    capacity = shared_space.basis_capacity(
        N_MEMORY, block, 32, torch.float32, kwargs.get("max_basis_bytes", 2**40)
    )
    returned = (3 if kwargs.get("return_vectors") else 0) + kwargs.get("keep_vectors", 0)
    formula = shared_space.tensor_bytes(N_MEMORY, capacity, block, returned, torch.float32)
    assert results[0].num_matvecs >= capacity  # the basis filled (restarted, for the capped run)
    assert 0.9 * formula <= peak <= formula, (peak / (4 * N_MEMORY), formula / (4 * N_MEMORY))


def test_the_check_refuses_exactly_when_the_formula_exceeds_free_memory(monkeypatch):
    matrix, _ = hessian_like(100)
    cap = 8 * 100 * 12  # 12 float64 columns
    needed = shared_space.peak_bytes(100, 12, 4, 0, torch.float64)
    # basis, 2 working blocks + 6 of the allocator's heap, the projections, the runtime
    assert needed == 8 * 100 * (12 + 8 * 4) + 8 * 4 * 12**2 + 64 * 2**20
    monkeypatch.setattr(shared_space, "available_memory", lambda device: needed - 1)
    op = MatrixOperator(matrix)
    with pytest.raises(HessianTooLargeError):
        shared_space_estimates(op, density=False, max_basis_bytes=cap)
    assert op.num_matvecs == 0  # refused before any product
    monkeypatch.setattr(shared_space, "available_memory", lambda device: needed)
    assert shared_space_estimates(op, density=False, max_basis_bytes=cap).num_matvecs > 0


def test_a_run_that_cannot_fit_names_the_settings_that_help(monkeypatch):
    """The basis is capped at a quarter of free memory, so a refusal means the vectors beside it do
    not fit: the message names the probes first, and they are what makes it fit; neither the steps
    nor the trace probes change it (as they did not before either, though the message named them)."""
    free = 140_000_000  # a quarter holds 8 columns of 1e6 float32: the basis of 4 probes takes its floor
    monkeypatch.setattr(shared_space, "available_memory", lambda device: free)
    op = Diagonal(torch.linspace(-0.1, 1.0, 1_000_000))
    messages = []
    for kwargs in ({}, {"max_steps": 8}, {"trace_probes": 0}):
        with pytest.raises(HessianTooLargeError) as refused:
            shared_space_estimates(op, **kwargs)
        messages.append(str(refused.value))
    assert messages[0] == messages[1] == messages[2]
    message = messages[0]
    needed = shared_space.peak_bytes(1_000_000, 8, 4, 0, torch.float32)
    assert (
        f"needs {needed / 2**20:.2f} MB (1000000 parameters x (8 basis + 32 working + 0 returned)" in message
    )
    assert f"but cpu has {free / 2**20:.2f} MB free" in message and "GB" not in message
    assert message.index("`density_probes`") < message.index("`params=`") < message.index("`blocks=`")
    assert "`trace_matvecs` nothing" in message
    with pytest.warns(HessianConvergenceWarning, match="capped at 8 columns"):  # fits, in a small basis
        result = shared_space_estimates(op, num_probes=1)  # the first fix named
    assert result.num_matvecs > 0


def test_a_capped_density_run_warns_and_flags_what_it_missed():
    matrix, _ = hessian_like()
    with pytest.warns(
        HessianConvergenceWarning, match=r"capped at 12 columns by memory .* instead of 4 x max_steps=40"
    ):
        result = shared_space_estimates(MatrixOperator(matrix), tol=1e-6, max_basis_bytes=8 * 300 * 12)
    assert result.num_steps == 3  # the cap, not the density's 8 steps nor convergence, stopped it
    assert not bool(result.eigenvalues.converged.all())


def test_a_capped_density_run_warns_with_the_fixes():
    matrix, _ = hessian_like()
    with pytest.warns(HessianConvergenceWarning) as caught:
        shared_space_estimates(MatrixOperator(matrix), tol=1e-6, max_basis_bytes=8 * 300 * 12)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "3 block steps, below the density's min_steps=8" in message
    assert "A density cannot restart" in message and "`max_basis_bytes`" in message


@pytest.mark.parametrize("smallest", [True, False])
def test_a_capped_run_without_density_restarts_to_the_exact_eigenvalues(smallest):
    matrix, values = hessian_like()
    tol = 1e-6
    settings = {"top_k": 3, "min_eigenvalue": smallest, "density": False, "trace": False, "tol": tol}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged within the cap: no warning
        capped = shared_space_estimates(
            MatrixOperator(matrix), max_steps=100, max_basis_bytes=8 * 300 * 20, **settings
        )
    uncapped = shared_space_estimates(MatrixOperator(matrix), max_steps=100, **settings)
    scale = float(values.abs().max())
    exact = torch.linalg.eigvalsh(matrix)
    for result in (capped, uncapped):
        assert bool(result.eigenvalues.converged.all())
        torch.testing.assert_close(result.eigenvalues.values, exact.flip(0)[:3], rtol=0, atol=tol * scale)
        assert torch.all(result.eigenvalues.residuals <= tol * scale)
        if smallest:
            assert bool(result.min_eigenvalue.converged.all())
            torch.testing.assert_close(result.min_eigenvalue.values, exact[:1], rtol=0, atol=tol * scale)
    assert capped.num_matvecs > 20  # more products than the basis holds: it restarted
    assert capped.num_matvecs <= 2 * uncapped.num_matvecs


def test_the_krylov_aware_trace_stays_unbiased_after_restarts():
    matrix, values = hessian_like(200)
    true = float(values.sum())
    z = []
    for seed in range(30):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", HessianConvergenceWarning)  # the smallest is not converged
            result = shared_space_estimates(
                MatrixOperator(matrix),
                top_k=3,
                density=False,
                max_steps=12,
                trace_probes=12,
                seed=seed,
                tol=1e-12,
                max_basis_bytes=8 * 200 * 16,
            )
        assert result.num_steps == 12  # restarted: 48 products through a basis of 16
        z.append((result.trace.value - true) / result.trace.stderr)
    z = torch.tensor(z)
    assert abs(float(z.mean())) < 0.6
    assert 0.6 < math.sqrt(float((z**2).mean())) < 1.5


def test_a_capped_run_without_density_that_runs_out_of_steps_warns():
    matrix, _ = hessian_like()
    with pytest.warns(
        HessianConvergenceWarning, match=r"restarted \d+ time\(s\) within the cap.*`max_steps`"
    ):
        result = shared_space_estimates(
            MatrixOperator(matrix), density=False, tol=1e-12, max_steps=10, max_basis_bytes=8 * 300 * 16
        )
    flags = torch.cat([result.eigenvalues.converged, result.min_eigenvalue.converged])
    assert result.num_steps == 10 and not bool(flags.all())


def test_an_uncapped_run_does_not_warn():
    matrix, _ = hessian_like()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = shared_space_estimates(MatrixOperator(matrix), tol=1e-12, max_steps=10)
    flags = torch.cat([result.eigenvalues.converged, result.min_eigenvalue.converged])
    assert not bool(flags.all())  # max_steps, not memory, stopped it: the flags say so


def test_bad_arguments_are_refused():
    op = MatrixOperator(torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="`max_steps` must be >= 8"):
        shared_space_estimates(op, max_steps=3)
    with pytest.raises(ValueError, match=r"`start_vectors` must be \[N=5, w\]"):
        shared_space_estimates(op, start_vectors=torch.zeros(4, 2))
    with pytest.raises(TypeError, match="`tol` must be a number"):
        shared_space_estimates(op, tol="small")
