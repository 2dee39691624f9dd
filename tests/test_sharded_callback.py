"""Sharded models (FSDP2) on 2 CPU processes (gloo): the functional API, and HessianCallback under
Lightning's ModelParallelStrategy.

Each test launches one script in a subprocess (``tests/sharded_functional.py`` spawns its ranks;
``tests/sharded_scenarios.py`` is relaunched by Lightning for rank 1) and checks what every rank wrote
against the unsharded model on the union of both ranks' batches. Products are gradient differences
(float64: about 1e-10 relative), so values agree to ``RTOL``. The setup checks (what a sharded model
cannot use stops ``fit`` before training) run one-rank fits in this process.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_hessian as lh
from lightning_hessian.analysis import analyze_with
from lightning_hessian.reporting import scalar_metrics
from tests import helpers, sharded_scenarios

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds per launch; a deadlocked rank would exceed it (a loaded 2-core machine: ~150)
RTOL = 1e-7  # float64 gradient differences are about 1e-10 off; Lanczos tolerances 1e-9
# Against the unsharded operator with the same products (hvp="finite-difference": one formula, one
# step) and the same global probes, only the sharding differs: the gradients are summed in another
# order, and that rounding divided by the step 2h ~ 1e-5 leaves the products this close, relative
# (measured 1.5e-11 on the functional model). Everything downstream then agrees to rounding, where a
# different draw of the probes would move a stochastic trace by its standard error (0.06 to 3 here)
# and the density's nodes by a sizeable share of the spectrum.
SAME_PRODUCTS = 1e-10


def _launch(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    env.pop("LOCAL_RANK", None)
    return subprocess.run(
        [sys.executable, str(ROOT / "tests" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def _results(outdir: Path) -> list[dict[str, Any] | None]:
    paths = [outdir / f"rank{rank}.pt" for rank in range(2)]
    return [torch.load(path, weights_only=False) if path.exists() else None for path in paths]


def _close(a: Any, b: Any, rtol: float = RTOL, atol: float = 1e-10) -> bool:
    return torch.allclose(torch.as_tensor(a).double(), torch.as_tensor(b).double(), rtol=rtol, atol=atol)


def _wasserstein1(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> float:
    """The Wasserstein-1 distance of two discrete measures ``(nodes, weights)``: the integral of
    ``|F_a - F_b|`` over the line."""
    nodes = torch.cat([a[0], b[0]]).double()
    mass = torch.cat([a[1], -b[1]]).double()
    order = torch.argsort(nodes)
    between = torch.cumsum(mass[order], 0)[:-1]  # F_a - F_b between consecutive nodes
    return float((between.abs() * nodes[order].diff()).sum())


def _assert_same_density(
    got: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor], atol: float
) -> None:
    """Nodes (eigenvalue units) within ``atol``, weights within 1e-8, Wasserstein-1 within ``atol``."""
    assert got[0].shape == ref[0].shape
    assert _close(got[0], ref[0], rtol=0, atol=atol)
    # Weights are squared Ritz-vector coordinates on the probes: a perturbation moves them by about
    # itself over the gap to the next node (measured 1.3e-11); 1e-8 leaves room for close nodes.
    assert _close(got[1], ref[1], rtol=0, atol=1e-8)
    assert _wasserstein1(got, ref) <= atol


@pytest.fixture(scope="module")
def functional(tmp_path_factory) -> list[dict[str, Any]]:
    outdir = tmp_path_factory.mktemp("sharded_functional")
    process = _launch("sharded_functional.py", str(outdir))
    results = _results(outdir)
    assert process.returncode == 0 and all(results), process.stderr[-4000:]
    for result in results:
        assert "crash" not in result, result["crash"]
    return results


def test_vectors_are_shards_whose_union_is_every_entry_once(functional) -> None:
    n = functional[0]["n"]
    assert sum(r["local_size"] for r in functional) == n
    assert sorted(torch.cat([r["index"] for r in functional]).tolist()) == list(range(n))
    assert all(r["local_size"] < n for r in functional)  # no rank holds a whole vector


def test_products_loss_and_gradient_are_those_of_the_union_of_both_ranks_batches(functional) -> None:
    for r in functional:
        assert r["product"].shape == (r["local_size"], 3)
        assert _close(r["product"], r["product_ref"], rtol=1e-8, atol=1e-9)
        assert r["loss"] == pytest.approx(r["loss_ref"], rel=1e-14)
        assert r["shifted_loss"] == pytest.approx(r["shifted_loss_ref"], rel=1e-14)
        assert _close(r["gradient"], r["gradient_ref"], rtol=1e-12, atol=1e-15)


def test_tsqr_factors_the_global_block(functional) -> None:
    n = functional[0]["n"]
    q, y = torch.zeros(n, 4, dtype=torch.float64), torch.zeros(n, 4, dtype=torch.float64)
    for r in functional:
        q[r["index"]], y[r["index"]] = r["q"], r["y"]
    assert torch.equal(functional[0]["r"], functional[1]["r"])
    assert torch.allclose(q.T @ q, torch.eye(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(q @ functional[0]["r"], y, atol=1e-12)


def test_estimators_agree_with_the_unsharded_operator_on_every_rank(functional) -> None:
    for r in functional:
        # the same global probes as one process drawing each parameter's block in turn
        assert r["hutchinson"] == pytest.approx(r["hutchinson_ref"], rel=RTOL)
        assert r["trace"] == pytest.approx(r["trace_ref"], rel=RTOL)
        assert _close(r["top"], r["top_ref"]) and _close(r["smallest"], r["smallest_ref"])
        assert _close(r["shared_top"], r["top_ref"])
        assert r["density_mass"] == pytest.approx(1.0, abs=1e-12)
        assert _close(r["geometry"][:3], r["geometry_ref"][:3]) and r["geometry"][3] == 5  # all batches
        assert r["overlap"] == pytest.approx(r["overlap_ref"], abs=1e-10)
        assert _close(r["landscape"], r["landscape_ref"], rtol=1e-12)
        assert r["stability"] == pytest.approx(r["stability_ref"], rel=RTOL)  # Adam's sharded states
    for key in ("hutchinson", "hutch++", "xtrace", "trace", "top", "density_nodes", "geometry", "stability"):
        assert _close(functional[0][key], functional[1][key], rtol=0, atol=0), key  # lockstep


def test_shared_space_and_stochastic_traces_equal_the_unsharded_ones_to_rounding(functional) -> None:
    """The callback's shared-space defaults (top-3, smallest, Krylov-aware trace, block-quadrature
    density), Hutch++ and XTrace, sharded and unsharded with the same products and probes.

    Tolerances from the products' agreement ``d`` (checked first) and the spectral scale ``s``: a Ritz
    value moves by at most about the perturbation of the projected matrix, ``d s``, with 10x for the
    basis moving along (``10 d s``: 3e-9 here, measured 1e-11 at most); a trace sums ``N`` such terms
    (``N d s``: 2e-8, measured 4e-11 at most), and so does a Hutchinson sample ``z^T H z`` (``||z||^2 =
    N``) and XTrace's ``(N - s + 1)``-scaled remainder. A reference with other probes (seed 1) is off
    by 6e-3 in the trace and 6e-2 in the density's Wasserstein-1 distance.
    """
    n = functional[0]["n"]
    for r in functional:
        unsharded = r["product_fd"]
        assert float((r["product"] - unsharded).abs().max() / unsharded.abs().max()) < SAME_PRODUCTS
        got, ref = r["defaults"], r["defaults_ref"]
        scale = float(ref["nodes"].abs().max())
        eigen_tol, trace_tol = 10 * SAME_PRODUCTS * scale, n * SAME_PRODUCTS * scale
        # the same stopping decisions: as many products, the same convergence flags
        assert got["num_matvecs"] == ref["num_matvecs"] and torch.equal(got["converged"], ref["converged"])
        assert _close(got["top"], ref["top"], rtol=0, atol=eigen_tol)
        assert _close(got["smallest"], ref["smallest"], rtol=0, atol=eigen_tol)
        assert got["trace"][2] == ref["trace"][2] > 0 and ref["trace"][1] > 0  # a remainder was sampled
        assert got["trace"][0] == pytest.approx(ref["trace"][0], rel=0, abs=trace_tol)
        assert got["trace"][1] == pytest.approx(ref["trace"][1], rel=0, abs=trace_tol)
        assert got["nodes"].numel() < n  # a quadrature of the probes, not the whole spectrum
        _assert_same_density((got["nodes"], got["weights"]), (ref["nodes"], ref["weights"]), eigen_tol)
        # Both kinds of probes (Hutch++'s Rademacher, XTrace's Gaussian) are drawn entry by entry, so the
        # sharded ones are those of the plain unsharded operator with the same seed (README, "Probes").
        for method in ("hutch++", "xtrace"):
            value, stderr = r[f"{method}_plain"]
            assert r[method] == pytest.approx(value, rel=0, abs=trace_tol), method
            assert r[f"{method}_stderr"] == pytest.approx(stderr, rel=0, abs=trace_tol) and stderr > 0, method


def test_failures_on_one_rank_raise_on_both_at_the_same_point(functional) -> None:
    rank0, rank1 = functional
    # an exception inside the sharded forward on rank 1: its own error there, RankFailedError on rank 0
    assert rank1["raise"] == "RuntimeError: simulated failure on rank 1"
    assert rank0["raise"].startswith("RankFailedError") and "simulated failure on rank 1" in rank0["raise"]
    # a NaN loss on rank 1 during a product
    assert all(r["nan"].startswith("NonFiniteHessianError") for r in functional)
    assert rank0["after_nan"] == rank1["after_nan"] and math.isfinite(rank0["after_nan"])  # then it works


@pytest.fixture(scope="module")
def union_run(tmp_path_factory) -> list[dict[str, Any]]:
    outdir = tmp_path_factory.mktemp("sharded_union")
    process = _launch("sharded_scenarios.py", "union", str(outdir))
    results = _results(outdir)
    assert process.returncode == 0 and all(results), process.stderr[-4000:]
    return results


def test_model_parallel_callback_logs_the_unsharded_models_curvature_on_the_union(union_run) -> None:
    rank0, rank1 = union_run
    assert rank0["outcome"] == rank1["outcome"] == "finished"
    assert rank0["sharded"] and rank1["sharded"]  # the parameters were DTensors

    module = sharded_scenarios.make_module(shard=False)
    module.load_state_dict(rank0["state_dict"])
    settings = lh.HessianCallback(**sharded_scenarios.callback_kwargs()).settings
    optimizer = module.configure_optimizers()
    report = analyze_with(
        module, None, sharded_scenarios.union(), settings, process_group=None, optimizer=optimizer
    )
    skip = {"hessian/seconds", "hessian/num_matvecs"}  # the reference computes its blocks densely
    expected = {k: v for k, v in scalar_metrics(report).items() if k not in skip}
    dynamics = ("stability", "gradient_alignment", "gradient_curvature", "batch_sharpness")
    assert {f"hessian/net.0/{name}" for name in dynamics} <= set(expected)
    values = {"hessian/net.0/eigenvalue_1", "hessian/net.2/eigenvalue_min", "hessian/net.2/trace"}
    assert values <= set(expected)
    for result in (rank0, rank1):
        assert [entry["ok"] for entry in result["history"]] == [True, True]
        for name, value in expected.items():
            assert math.isclose(result["metrics"][name], value, rel_tol=RTOL, abs_tol=1e-9), name
        for block in ("net.0", "net.2"):  # from the second evaluation on
            assert 0.0 <= result["metrics"][f"hessian/{block}/eigenvector_overlap"] <= 1.0
    assert rank0["metrics"] == rank1["metrics"]  # identical on every rank


def test_model_parallel_training_is_bit_identical_with_and_without_the_callback(union_run, tmp_path) -> None:
    process = _launch("sharded_scenarios.py", "plain", str(tmp_path))
    plain = _results(tmp_path)[0]
    assert process.returncode == 0 and plain, process.stderr[-4000:]
    evaluated = union_run[0]
    assert len(evaluated["history"]) == 2 and not plain["history"]
    assert plain["state_dict"].keys() == evaluated["state_dict"].keys()
    for name, value in plain["state_dict"].items():
        assert torch.equal(value, evaluated["state_dict"][name]), name


@pytest.fixture(scope="module")
def failures_run(tmp_path_factory) -> tuple[list[dict[str, Any]], str]:
    outdir = tmp_path_factory.mktemp("sharded_failures")
    process = _launch("sharded_scenarios.py", "failures", str(outdir))
    results = _results(outdir)
    assert process.returncode == 0 and all(results), process.stderr[-4000:]
    return results, process.stderr


def test_model_parallel_failure_on_one_rank_is_skipped_on_both_and_training_finishes(failures_run) -> None:
    results, stderr = failures_run
    steps = sharded_scenarios.TRAIN_STEPS_PER_EPOCH
    for result in results:
        assert result["outcome"] == "finished"
        assert result["global_step"] == 3 * steps
        history = result["history"]
        assert [entry["ok"] for entry in history] == [False, False, True]
        assert "NonFiniteHessianError" in history[0]["error"]  # rank 1's NaN loss
        assert "simulated failure on rank 1" in history[1]["error"]  # raised inside the sharded forward
    assert [e.get("error") for e in results[0]["history"]] == [e.get("error") for e in results[1]["history"]]
    assert results[0]["metrics"] == results[1]["metrics"]
    assert math.isfinite(results[0]["metrics"]["hessian/model/eigenvalue_1"])
    assert "failed" in stderr  # the warning (rank 0)


def test_model_parallel_callback_defaults_equal_the_unsharded_shared_space_on_the_union(failures_run) -> None:
    """The third evaluation of the failures run: the callback's default analysis (one shared block
    Krylov space: top-3, smallest, Krylov-aware trace, block-quadrature density; stability and
    gradient geometry) against the unsharded model on the union, computed the same way (iterative,
    gradient differences, the same probes). Tolerances as in
    ``test_shared_space_and_stochastic_traces_equal_the_unsharded_ones_to_rounding``."""
    results, _ = failures_run
    module = sharded_scenarios.make_module(shard=False)
    module.load_state_dict(results[0]["state_dict"])
    callback = lh.HessianCallback(num_batches=sharded_scenarios.NUM_BATCHES, figures=False)
    assert callback.settings.krylov == "shared" and callback.settings.trace_method == "hutch++"
    settings = dataclasses.replace(callback.settings, method="iterative", hvp="finite-difference")
    optimizer = module.configure_optimizers()
    report = analyze_with(
        module, None, sharded_scenarios.union(), settings, process_group=None, optimizer=optimizer
    )
    # num_matvecs differs by design: the sharded batch sharpness counts W B single-batch passes
    skip = {"hessian/seconds", "hessian/num_matvecs"}
    expected = {k: v for k, v in scalar_metrics(report).items() if k not in skip}
    block = report.blocks["model"]
    n, scale = block.size, float(block.density.nodes.abs().max())
    assert block.density.nodes.numel() < n and block.trace.num_matvecs > 0 and block.trace.stderr > 0
    eigen_tol, trace_tol = 10 * SAME_PRODUCTS * scale, n * SAME_PRODUCTS * scale
    names = {"hessian/model/trace", "hessian/model/trace_stderr", "hessian/model/eigenvalue_3"}
    assert names | {"hessian/model/stability", "hessian/model/batch_sharpness"} <= set(expected)
    for result in results:
        assert result["history"][-1]["ok"]
        metrics = result["metrics"]
        for name, value in expected.items():
            # the rest (eigenvalues, stability, curvatures, alignment, loss) within 10 d s
            tol = trace_tol if "/trace" in name else eigen_tol
            assert math.isclose(metrics[name], value, rel_tol=10 * SAME_PRODUCTS, abs_tol=tol), name
        _assert_same_density(
            result["densities"]["model"], (block.density.nodes, block.density.weights), eigen_tol
        )


# ---------------------------------------------------------------- one-rank setup checks (in this process)
class OneRankSharded:
    """A float32 classifier that ``configure_model`` shards with FSDP2, and its 4 batches of 8."""

    @staticmethod
    def module() -> Any:
        import lightning.pytorch as pl
        import torch.nn.functional as F
        from torch import nn

        class Classifier(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                torch.manual_seed(0)
                self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
                self.steps = 0

            def configure_model(self) -> None:
                sharded_scenarios.shard_linear_layers(self.net, self.device_mesh["data_parallel"])

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.net(x)

            def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
                self.steps += 1
                return F.cross_entropy(self(batch[0]), batch[1])

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return Classifier()

    @staticmethod
    def loader() -> Any:
        from torch.utils.data import DataLoader, TensorDataset

        g = torch.Generator().manual_seed(0)
        x = torch.randn(32, 4, generator=g)
        return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)


@pytest.fixture
def one_rank_model_parallel(tmp_path):
    """Run a one-rank ModelParallelStrategy fit in this process; undo what it leaves behind (the gloo
    process group, the environment variables Lightning sets, torch's thread count)."""
    import torch.distributed as dist
    from lightning.pytorch.strategies import ModelParallelStrategy

    environ, threads = dict(os.environ), torch.get_num_threads()

    def fit(hessian: lh.HessianCallback, precision: str = "32-true", module: Any = None) -> tuple[Any, Any]:
        trainer = helpers.trainer(
            tmp_path,
            [hessian],
            strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
            max_epochs=1,
            precision=precision,
            logger=False,
        )
        module = module or OneRankSharded.module()
        trainer.fit(module, OneRankSharded.loader())
        return trainer, module

    try:
        yield fit
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_half_precision_sharded_parameters_stop_fit_before_training(one_rank_model_parallel, precision):
    hessian, module = lh.HessianCallback(num_batches=1), OneRankSharded.module()
    with pytest.raises(MisconfigurationException, match=r"sharded \(FSDP2\) parameters are torch\.") as info:
        one_rank_model_parallel(hessian, precision=precision, module=module)
    assert "precision='bf16-mixed'" in str(info.value)  # the fix, named
    assert module.steps == 0 and hessian.history == []  # not one training step


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        (
            {"method": "dense"},
            r"method='dense' cannot be used with a sharded.*method='auto' or method='iterative'",
        ),
        (
            {"analyze_kwargs": {"hvp": "reverse-over-reverse"}},
            r"'hvp': 'reverse-over-reverse'.*one of \('auto', 'finite-difference'\)",
        ),
        (
            {"analyze_kwargs": {"hvp": "finite-difference-richardson"}},
            r"'hvp': 'finite-difference-richardson'.*one of \('auto', 'finite-difference'\)",
        ),
        ({"dtype": torch.float64}, r"dtype=torch\.float64 cannot be used with a sharded.*\(torch\.float32\)"),
    ],
)
def test_settings_a_sharded_model_cannot_use_stop_fit_before_training(
    one_rank_model_parallel, settings, match
):
    hessian, module = lh.HessianCallback(num_batches=1, **settings), OneRankSharded.module()
    with pytest.raises(MisconfigurationException, match=match):
        one_rank_model_parallel(hessian, module=module)
    assert module.steps == 0 and hessian.history == []


def test_bf16_mixed_keeps_float32_sharded_parameters_and_evaluates(one_rank_model_parallel):
    hessian = lh.HessianCallback(
        num_batches=1,
        method="iterative",
        top_k=1,
        min_eigenvalue=False,
        trace=False,
        density=False,
        gradient_geometry=False,
        stability=False,
        eigenvector_overlap=False,
        analyze_kwargs={"hvp": "finite-difference"},  # the sharded rule, given explicitly
    )
    trainer, module = one_rank_model_parallel(hessian, precision="bf16-mixed")
    assert trainer.global_step == 4 and all(p.dtype == torch.float32 for p in module.parameters())
    assert [entry["ok"] for entry in hessian.history] == [True], hessian.history
    assert math.isfinite(hessian.history[0]["hessian/model/eigenvalue_1"])


def test_the_sharded_operator_names_the_hvp_values_it_takes() -> None:
    with pytest.raises(ValueError, match=r"hvp='exact'.*use one of \('auto', 'finite-difference'\)"):
        lh.ShardedHessianOperator(torch.nn.Linear(2, 2), None, [], hvp="exact")


def test_the_sharded_check_refuses_selected_parameters_of_several_dtypes(monkeypatch) -> None:
    from torch import nn

    from lightning_hessian import callback_checks
    from lightning_hessian.settings import AnalysisSettings

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double())
    callback_checks.check_sharded_settings(model, AnalysisSettings(method="dense"))  # whole: unchecked
    monkeypatch.setattr(callback_checks, "has_sharded_parameters", lambda module: True)
    with pytest.raises(MisconfigurationException, match=r"several dtypes.*params="):
        callback_checks.check_sharded_settings(model, AnalysisSettings())
    callback_checks.check_sharded_settings(model, AnalysisSettings(params="1.*"))  # one dtype selected
