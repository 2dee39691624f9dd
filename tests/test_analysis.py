"""``lightning_hessian.analyze`` through the public API: exact dense blocks, iterative blocks against the
exact spectrum, traces shared between blocks, module blocks, progress reports and bad arguments.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_hessian as lh
from tests.helpers import cross_entropy_loss, tiny, zoo

FAST = {"hvp": "reverse-over-reverse"}


def small_problem():
    """A 3-4-2 tanh MLP (26 parameters) on 10 samples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(10, 3, generator=g), torch.randint(0, 2, (10,), generator=g))]
    return model, data


def layered_problem():
    """A 5-8-4-3 tanh MLP with named modules (48 + 36 + 15 = 99 parameters) on 40 samples."""
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            hidden=nn.Linear(5, 8), act=nn.Tanh(), mid=nn.Linear(8, 4), act2=nn.Tanh(), head=nn.Linear(4, 3)
        )
    )
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g))]
    return model, data


def block_index(model: nn.Module, names) -> torch.Tensor:
    slices = lh.ParameterSpace.from_tensors(dict(model.named_parameters())).slices()
    return torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in names])


# --------------------------------------------------------------------------- dense blocks


def test_dense_block_is_the_exact_spectrum_of_the_hessian():
    model, data = small_problem()
    H = lh.hessian(model, cross_entropy_loss, data, dtype=torch.float64)
    exact = torch.linalg.eigvalsh(H)
    report = lh.analyze(model, cross_entropy_loss, data, dtype=torch.float64, top_k=3, **FAST)
    assert list(report.blocks) == ["model"]
    block = report.blocks["model"]
    assert (block.name, block.size, block.method) == ("model", 26, "dense")
    torch.testing.assert_close(block.spectrum, exact, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(block.eigenvalues.values, exact.flip(0)[:3], rtol=1e-12, atol=1e-14)
    assert block.eigenvalues.all_converged and block.eigenvalues.which == "largest"
    torch.testing.assert_close(block.min_eigenvalue.values, exact[:1], rtol=1e-12, atol=1e-14)
    assert block.min_eigenvalue.which == "smallest"
    assert block.trace.value == pytest.approx(float(H.trace()), rel=1e-12)
    assert (block.trace.stderr, block.trace.method) == (0.0, "exact")
    assert block.density.exact
    torch.testing.assert_close(block.density.nodes, exact, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(block.density.weights, torch.full((26,), 1 / 26, dtype=torch.float64))
    assert report.num_matvecs == block.num_matvecs == 26
    (x, y), *_ = data
    with torch.no_grad():
        loss = F.cross_entropy(model.double()(x.double()), y)
    model.float()
    assert report.loss == pytest.approx(float(loss), rel=1e-12)
    assert report.num_samples == 10
    assert report.scalars()["hessian/model/eigenvalue_1"] == float(exact[-1])


def test_dense_module_blocks_are_the_spectra_of_the_diagonal_blocks():
    model, data = small_problem()
    H = lh.hessian(model, cross_entropy_loss, data, dtype=torch.float64)
    report = lh.analyze(
        model, cross_entropy_loss, data, blocks="module", dtype=torch.float64, top_k=2, **FAST
    )
    assert list(report.blocks) == ["0", "2"]
    for name, names in (("0", ["0.weight", "0.bias"]), ("2", ["2.weight", "2.bias"])):
        index = block_index(model, names)
        exact = torch.linalg.eigvalsh(H[index][:, index])
        block = report.blocks[name]
        assert block.method == "dense" and block.size == index.numel()
        torch.testing.assert_close(block.spectrum, exact, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(block.eigenvalues.values, exact.flip(0)[:2], rtol=1e-12, atol=1e-14)
        assert float(block.min_eigenvalue.values[0]) == pytest.approx(float(exact[0]), rel=1e-12)
        assert block.trace.value == pytest.approx(float(exact.sum()), rel=1e-10)
    assert report.num_matvecs == 26


# --------------------------------------------------------------------------- iterative blocks


@pytest.mark.parametrize("setting", [{"method": "iterative"}, {"dense_limit": 0}])
def test_iterative_block_matches_the_exact_spectrum_within_its_tolerances(setting):
    model, data = layered_problem()
    H = lh.hessian(model, cross_entropy_loss, data, dtype=torch.float64)
    exact = torch.linalg.eigvalsh(H)
    scale = float(exact.abs().max())
    report = lh.analyze(
        model,
        cross_entropy_loss,
        data,
        dtype=torch.float64,
        top_k=3,
        tol=1e-8,
        trace_matvecs=30,
        density_probes=2,
        density_steps=10,
        seed=0,
        **setting,
        **FAST,
    )
    block = report.blocks["model"]
    assert (block.size, block.method, block.spectrum) == (99, "iterative", None)
    top = block.eigenvalues
    assert top.converged.tolist() == [True, True, True]
    assert bool(((top.values - exact.flip(0)[:3]).abs() <= 1e-6 * scale).all()), (top.values, exact[-3:])
    smallest = block.min_eigenvalue
    assert smallest.converged.tolist() == [True]
    assert abs(float(smallest.values[0] - exact[0])) <= 1e-6 * scale
    true_trace = float(H.trace())
    assert block.trace.method == "hutch++" and block.trace.num_matvecs == 30 and block.trace.stderr > 0
    assert abs(block.trace.value - true_trace) <= 4 * block.trace.stderr
    density = block.density
    assert not density.exact and density.num_probes == 2
    assert float(density.weights.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(exact[0]) - 1e-9 <= float(density.nodes.min())
    assert float(density.nodes.max()) <= float(exact[-1]) + 1e-9
    assert float(density.nodes.max()) == pytest.approx(float(exact[-1]), rel=1e-6)
    spent = top.num_matvecs + smallest.num_matvecs + block.trace.num_matvecs + density.num_matvecs
    assert report.num_matvecs == block.num_matvecs == spent


def test_iterative_blocks_share_one_set_of_trace_probes():
    model, data = layered_problem()
    H = lh.hessian(model, cross_entropy_loss, data, dtype=torch.float64)
    report = lh.analyze(
        model,
        cross_entropy_loss,
        data,
        blocks="module",
        method="iterative",
        dtype=torch.float64,
        top_k=1,
        tol=1e-6,
        trace_matvecs=40,
        density_probes=2,
        density_steps=5,
        seed=0,
        **FAST,
    )
    assert list(report.blocks) == ["hidden", "mid", "head"]
    own = 0
    for name, block in report.blocks.items():
        index = block_index(model, [f"{name}.weight", f"{name}.bias"])
        exact = float(H[index][:, index].trace())
        assert block.method == "iterative"
        assert block.trace.method == "hutchinson (shared probes)"
        assert block.trace.num_matvecs == 40 and block.trace.stderr > 0
        assert abs(block.trace.value - exact) <= 4 * block.trace.stderr, (name, block.trace, exact)
        own += block.eigenvalues.num_matvecs + block.min_eigenvalue.num_matvecs + block.density.num_matvecs
    assert report.num_matvecs == own + 40  # the 40 trace products once, not once per block


def test_module_blocks_follow_the_modules_in_order():
    model = nn.Sequential(
        OrderedDict(
            embed=nn.Linear(3, 4),
            norm=nn.BatchNorm1d(4),
            act=nn.ReLU(),
            drop=nn.Dropout(0.1),
            head=nn.Linear(4, 2),
        )
    )
    data = [(torch.randn(6, 3), torch.randint(0, 2, (6,)))]
    report = lh.analyze(model, cross_entropy_loss, data, blocks="module", top_k=1, density=False, **FAST)
    assert list(report.blocks) == ["embed", "norm", "head"]
    sizes = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in report.blocks}
    for name, block in report.blocks.items():
        assert block.name == name and block.size == sizes[name] and block.method == "dense"
    assert list(report.scalars()) == [
        f"hessian/{name}/{metric}"
        for name in ("embed", "norm", "head")
        for metric in ("trace", "trace_stderr", "eigenvalue_1", "eigenvalue_min", "eigenvalues_converged")
    ]


# --------------------------------------------------------------------------- progress


def test_progress_counts_every_product_up_to_the_report_total():
    model, data = layered_problem()
    calls = []
    report = lh.analyze(
        model,
        cross_entropy_loss,
        data,
        blocks="module",
        dense_limit=40,  # hidden (48) iterative; mid (36) and head (15) dense
        top_k=1,
        trace_matvecs=10,
        density_probes=2,
        density_steps=5,
        progress=lambda done, planned: calls.append((done, planned)),
        **FAST,
    )
    assert [b.method for b in report.blocks.values()] == ["iterative", "dense", "dense"]
    done = [d for d, _ in calls]
    assert done[0] > 0 and all(b > a for a, b in zip(done, done[1:], strict=False))
    assert done[-1] == report.num_matvecs
    assert all(planned >= d for d, planned in calls)


# --------------------------------------------------------------------------- failures and bad arguments


def test_non_finite_loss_raises_a_clear_error():
    model, data = tiny()
    x, y = data[0]
    x = x.clone()
    x[0, 0] = float("nan")
    with pytest.raises(lh.NonFiniteHessianError):
        lh.analyze(model, cross_entropy_loss, [(x, y)])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"top_k": -1}, ValueError, "`top_k` must be >= 0"),
        ({"method": "x"}, ValueError, "`method='x'` is not supported. Use one of"),
        ({"trace_method": "x"}, ValueError, "`trace_method='x'` is not supported. Use one of"),
        ({"density_probes": 0}, ValueError, "`density_probes` must be >= 1"),
        ({"mode": "x"}, ValueError, "`mode='x'` is not supported"),
        ({"progress": 3}, TypeError, "`progress` must be callable"),
    ],
)
def test_bad_arguments_raise_before_any_product(kwargs, error, match):
    model, data = tiny()
    calls = []

    def loss_fn(module, batch):
        calls.append(1)
        return cross_entropy_loss(module, batch)

    with pytest.raises(error, match=match):
        lh.analyze(model, loss_fn, data, **kwargs)
    assert not calls  # not even the loss was evaluated


class _WithUnusedModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.unused = nn.Linear(4, 4)  # defined but never called in forward
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("method", ["auto", "iterative"])
def test_a_module_the_loss_does_not_use_is_a_zero_block_and_the_rest_is_evaluated(method):
    torch.manual_seed(0)
    model = _WithUnusedModule().double()
    data = [(torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,)))]
    with pytest.warns(UserWarning, match="does not depend on the parameters of block 'unused'"):
        report = lh.analyze(model, cross_entropy_loss, data, blocks="module", method=method, seed=0)
    assert list(report.blocks) == ["a", "unused", "b"]
    zero = report.blocks["unused"]
    assert zero.method == "zero" and zero.trace.value == 0.0 and zero.trace.stderr == 0.0
    assert zero.eigenvalues.values.tolist() == [0.0, 0.0, 0.0] and bool(zero.eigenvalues.converged.all())
    assert float(zero.min_eigenvalue.values[0]) == 0.0
    exact = lh.hessian(model, cross_entropy_loss, data, blocks="module")
    for name in ("a", "b"):
        block = report.blocks[name]
        true_trace = float(exact[name].diagonal().sum())
        assert abs(block.trace.value - true_trace) <= max(1e-9, 4 * block.trace.stderr)
        top = torch.linalg.eigvalsh(exact[name]).flip(0)[:3]
        torch.testing.assert_close(block.eigenvalues.values, top, rtol=1e-5, atol=1e-8)
    assert exact["unused"].abs().max() == 0


def test_shared_krylov_blocks_match_the_exact_spectrum_with_fewer_products():
    from lightning_hessian.analysis import analyze_with
    from lightning_hessian.settings import AnalysisSettings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    data = [(torch.randn(64, 6, dtype=torch.float64), torch.randint(0, 3, (64,)))]
    exact = torch.linalg.eigvalsh(lh.hessian(model, cross_entropy_loss, data))
    settings = AnalysisSettings(
        method="iterative", krylov="shared", tol=1e-6, trace_matvecs=16, keep_vectors=3
    )
    report = analyze_with(model, cross_entropy_loss, data, settings)
    block = report.blocks["model"]
    scale = float(exact.abs().max())
    torch.testing.assert_close(block.eigenvalues.values, exact.flip(0)[:3], rtol=0, atol=1e-6 * scale)
    torch.testing.assert_close(block.min_eigenvalue.values, exact[:1], rtol=0, atol=1e-6 * scale)
    assert bool(block.eigenvalues.converged.all()) and bool(block.min_eigenvalue.converged.all())
    assert abs(block.trace.value - float(exact.sum())) <= max(1e-9, 4 * block.trace.stderr)
    assert block.trace.method == "krylov-aware" and block.density is not None
    assert block.ritz_vectors.shape == (exact.numel(), 3)
    assert report.num_matvecs == block.num_matvecs
    separate = lh.analyze(model, cross_entropy_loss, data, method="iterative", tol=1e-6, trace_matvecs=16)
    assert report.num_matvecs < separate.num_matvecs
    warm = analyze_with(
        model, cross_entropy_loss, data, settings, start_vectors={"model": block.ritz_vectors, "other": exact}
    )
    torch.testing.assert_close(
        warm.blocks["model"].eigenvalues.values, block.eigenvalues.values, rtol=0, atol=2e-6 * scale
    )


def test_the_training_dynamics_products_are_counted_in_the_block_and_the_report():
    model, loss_fn, data, _ = zoo("mlp")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    for param in model.parameters():  # uneven second moments: step sizes differ per parameter
        param.grad = torch.randn(param.shape, generator=generator)
    optimizer.step()
    plain = lh.analyze(model, loss_fn, data, method="iterative", density=False, trace=False)
    report = lh.analyze(
        model,
        loss_fn,
        data,
        method="iterative",
        density=False,
        trace=False,
        gradient_geometry=True,
        optimizer=optimizer,
    )
    block = report.blocks["model"]
    extra = block.gradient_geometry.num_matvecs + block.stability.num_matvecs
    assert block.stability.adaptive and block.stability.num_matvecs > 0  # its own Lanczos search
    assert block.num_matvecs == plain.blocks["model"].num_matvecs + extra
    assert report.num_matvecs == block.num_matvecs
