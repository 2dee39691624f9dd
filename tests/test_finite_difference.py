"""Gradient-difference products (``hvp="finite-difference"``): accuracy against the exact products, no
trace left on the module, the referee of the exact methods and auto's fallback (a compiled module, a
custom autograd Function without second derivatives), the method in reports and in the callback's
history, and precision.

Compiled modules use ``torch.compile(backend="aot_eager")``: the same AOTAutograd graphs (and the
same lack of double backward) as the default inductor backend, without its C++ compile time, which
takes tens of seconds per model on this 2-core machine.
"""

from __future__ import annotations

import random
import warnings

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

import lightning_hessian as lh
from lightning_hessian.operator import FORWARD, REVERSE
from lightning_hessian.operator.differences import (
    FINITE_DIFFERENCE,
    RICHARDSON,
    difference_step,
    expected_error,
)
from tests.helpers import Snapshot, TinyModule, cross_entropy_loss, loader, reference_hessian, trainer, zoo

DOUBLE = torch.float64
# The whole zoo: ConvBN has a ReLU, whose kinks gradient differences freeze (NOTE [Frozen kinks]).
ZOO = ["mlp", "conv_bn_eval", "conv_bn_train", "attention", "recurrent", "dict_batch"]


class _OnceTanh(torch.autograd.Function):
    """tanh as a fused kernel writes it: the backward is @once_differentiable."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class FusedTanh(nn.Module):
    def forward(self, x):
        return _OnceTanh.apply(x)


def tanh_mlp(fused: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), FusedTanh() if fused else nn.Tanh(), nn.Linear(16, 3))


def _batch(n: int = 32, features: int = 4, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g))]


def _mse(module, batch):
    x, y = batch
    return F.mse_loss(module(x), F.one_hot(y, 3).to(x.dtype))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _messages(caught, text: str) -> list[str]:
    return [str(w.message) for w in caught if text in str(w.message)]


# --------------------------------------------------------------------------- accuracy


def test_the_step_follows_the_cube_root_and_fifth_root_rules_per_tensor():
    u32, u64 = 2.0**-24, 2.0**-53
    # the direction moves two tensors: the shorter allowance (1 + ||θ_k||) / ||v_k|| sets the step
    step = difference_step(torch.float32, [2.5, 11.0], [0.5, 2.0])
    assert step == pytest.approx((3 * u32) ** (1 / 3) / 2 * min(2.5 / 0.5, 11.0 / 2.0))
    assert difference_step(torch.float32, [2.5, 11.0], [0.0, 2.0]) == pytest.approx(
        (3 * u32) ** (1 / 3) / 2 * 5.5
    )
    assert difference_step(torch.float64, [1.0], [1.0], RICHARDSON) == pytest.approx(u64 ** (1 / 5) / 2)
    assert expected_error(torch.float32) < 1e-3 and expected_error(torch.float64) < 1e-9
    with pytest.raises(ValueError, match="`method` must be one of"):
        difference_step(torch.float32, [1.0], [1.0], REVERSE)
    with pytest.raises(ValueError, match="direction is zero"):
        difference_step(torch.float32, [1.0], [0.0])


@pytest.mark.parametrize("name", ZOO)
def test_gradient_differences_match_exact_products_in_float64(name):
    model, loss_fn, data, mode = zoo(name)
    exact = lh.HessianOperator(model, loss_fn, data, mode=mode, dtype=torch.float64, hvp=REVERSE)
    V = torch.randn(exact.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = exact @ V
    for method in (FINITE_DIFFERENCE, RICHARDSON):
        bound = expected_error(torch.float64, method)  # the documented accuracy: 2.3e-10 and 5.2e-12
        op = lh.HessianOperator(model, loss_fn, data, mode=mode, dtype=torch.float64, hvp=method)
        products = op @ V
        assert op.num_matvecs == 3 and op.choice.vector == method
        for j in range(3):
            assert _relative(products[:, j], expected[:, j]) < bound, (method, j)
        again = op @ V[:, 0].contiguous()  # the same vector: the same steps, the same bits
        torch.testing.assert_close(again, products[:, 0], rtol=0, atol=0)


@pytest.mark.parametrize("name", ZOO)
def test_float32_gradient_differences_are_within_the_documented_error(name):
    model, loss_fn, data, mode = zoo(name)
    reference = lh.HessianOperator(model, loss_fn, data, mode=mode, dtype=torch.float64, hvp=REVERSE)
    v = torch.randn(reference.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    op = lh.HessianOperator(model, loss_fn, data, mode=mode, hvp=FINITE_DIFFERENCE)
    product = op @ v.float()
    assert product.dtype == torch.float32
    assert _relative(product.double(), reference @ v) < expected_error(torch.float32)


def _central_by_hand(model, loss_fn, data, theta, v, method=FINITE_DIFFERENCE):
    """Gradient differences one tensor at a time: ``θ + h d`` per tensor, a gradient per batch,
    ``(g₊ - g₋) / (2h)`` per tensor (Richardson: ``(4 D(h/2) - D(h)) / 3``), weighted by batch size.
    """
    names = list(theta)
    parts = dict(zip(names, v.split([t.numel() for t in theta.values()]), strict=True))
    lengths = [1 + float(t.norm()) for t in theta.values()]
    step = difference_step(v.dtype, lengths, [float(p.norm()) for p in parts.values()], method)

    def gradient(batch, h):
        point = {n: torch.add(theta[n], parts[n].view_as(theta[n]), alpha=h).requires_grad_() for n in names}
        loss = F.cross_entropy(torch.func.functional_call(model, point, (batch[0],)), batch[1])
        return torch.autograd.grad(loss, list(point.values()))

    def central(batch, h):
        plus, minus = gradient(batch, h), gradient(batch, -h)
        return torch.cat([((a - b) / (2 * h)).reshape(-1) for a, b in zip(plus, minus, strict=True)])

    total = sum(len(batch[1]) for batch in data)
    product = None
    for batch in data:
        if method == FINITE_DIFFERENCE:
            difference = central(batch, step)
        else:
            difference = (4 * central(batch, step / 2) - central(batch, step)) / 3
        weight = len(batch[1]) / total
        product = torch.mul(difference, weight) if product is None else product.add_(difference, alpha=weight)
    return product


@pytest.mark.parametrize("method", [FINITE_DIFFERENCE, RICHARDSON])
def test_products_are_the_per_tensor_central_differences_bit_for_bit(method):
    # The reused flat points (NOTE [Cost of gradient differences]) compute what one tensor at a time does.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    data = [(x.double(), y) for x, y in _batch(16, seed=1) + _batch(7, seed=2)]
    op = lh.HessianOperator(model, cross_entropy_loss, data, hvp=method)
    V = torch.randn(op.shape[0], 2, dtype=DOUBLE, generator=torch.Generator().manual_seed(0))
    theta = {n: p.detach() for n, p in model.named_parameters()}
    products = op @ V
    for j in range(2):
        expected = _central_by_hand(model, cross_entropy_loss, data, theta, V[:, j], method)
        assert torch.equal(products[:, j], expected), j
        assert torch.equal(op @ V[:, j].contiguous(), expected), j


def test_reused_points_carry_nothing_from_one_product_to_the_next():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    op = lh.HessianOperator(model, cross_entropy_loss, _batch(16), dtype=DOUBLE, hvp=FINITE_DIFFERENCE)
    generator = torch.Generator().manual_seed(0)
    v, w = (torch.randn(op.shape[0], dtype=DOUBLE, generator=generator) for _ in range(2))
    first = op @ v
    names = op.space.names
    support, targets = names[2:], names[:3]  # the last layer's direction; entries of the first and last
    on_support = w[-op.space.subspace(support).numel :]  # the support is the flat vector's tail
    block = op.block_products(on_support[None], support, targets)
    # support and targets given in another order: the same block (its entries in flat order)
    assert torch.equal(block, op.block_products(on_support[None], support[::-1], targets[::-1]))
    # the whole vector, zero off the support: the same points, so the same gradients of the targets
    full = op @ torch.cat([torch.zeros(op.shape[0] - len(on_support), dtype=DOUBLE), on_support])
    torch.testing.assert_close(block[0], full[: block.shape[1]], rtol=1e-12, atol=0)
    with torch.no_grad():  # the module moves on (a training step): the operator keeps its θ
        for p in model.parameters():
            p.add_(1.0)
    assert torch.equal(op @ v, first)
    assert torch.equal(op @ torch.zeros_like(v), torch.zeros_like(v))
    fresh = lh.HessianOperator(model, cross_entropy_loss, _batch(16), dtype=DOUBLE, hvp=FINITE_DIFFERENCE)
    assert not torch.allclose(fresh @ v, first)


def test_an_operator_with_exact_products_keeps_no_point_of_gradient_differences():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    op = lh.HessianOperator(model, cross_entropy_loss, _batch(16), hvp=REVERSE)
    op @ torch.randn(op.shape[0])  # its first product is refereed by gradient differences
    assert REVERSE in op.choice.referee
    assert op._kernels._perturbed is None  # their point went with the referee: no memory kept
    differences = lh.HessianOperator(model, cross_entropy_loss, _batch(16), hvp=FINITE_DIFFERENCE)
    differences @ torch.randn(op.shape[0])
    assert differences._kernels._perturbed is not None


# --------------------------------------------------------------------------- no trace on the module


def _snapshot(model: nn.Module):
    return {
        "parameters": [(p, p.detach().clone()) for p in model.parameters()],
        "grads": [(p, p.grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()],
        "buffers": [(b, b.clone()) for b in model.buffers()],
        "flags": [m.training for m in model.modules()],
        "rng": (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()),
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32 if t.element_size() == 4 else torch.int64)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_gradient_differences_leave_parameters_buffers_grads_and_rng_bit_for_bit(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.2), nn.Linear(6, 3))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model[4].bias.grad = None
    model.train(mode == "eval")  # the opposite of the analysis mode: it must come back
    before = _snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mode='train' with dropout: one fixed mask
        op = lh.HessianOperator(model, cross_entropy_loss, _batch(16), mode=mode, hvp=FINITE_DIFFERENCE)
        saved = {name: value.clone() for name, value in op.parameters.items()}
        op @ torch.randn(op.shape[0], 3, generator=torch.Generator().manual_seed(0))
    after = _snapshot(model)
    for (p, value), (q, _) in zip(before["parameters"], after["parameters"], strict=True):
        assert p is q and torch.equal(_bits(p), _bits(value))
    for (_, grad, value), (_, grad_after, _) in zip(before["grads"], after["grads"], strict=True):
        assert grad_after is grad and (grad is None or torch.equal(_bits(grad), _bits(value)))
    for (buffer, value), (buffer_after, _) in zip(before["buffers"], after["buffers"], strict=True):
        assert buffer_after is buffer and torch.equal(buffer, value)
    assert after["flags"] == before["flags"]
    assert torch.equal(after["rng"][0], before["rng"][0]) and after["rng"][1] == before["rng"][1]
    assert np.array_equal(after["rng"][2], before["rng"][2])
    for name, value in op.parameters.items():  # the operator's saved copy: never stepped and stepped back
        assert torch.equal(_bits(value), _bits(saved[name])), name


def test_training_is_bit_identical_with_gradient_difference_evaluations(tmp_path):
    def fit(callbacks):
        L.seed_everything(0, verbose=False)
        model = TinyModule()
        trainer(tmp_path, callbacks, max_epochs=2, logger=False).fit(model, loader(n=32))
        return model, torch.get_rng_state()

    plain, plain_rng = fit([])
    settings = {"hvp": FINITE_DIFFERENCE, "trace_matvecs": 9, "density_steps": 8}
    hessian = lh.HessianCallback(num_batches=2, blocks="module", figures=False, analyze_kwargs=settings)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # frozen kinks: no spread to report
        model, rng = fit([hessian])
    for name, value in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert torch.equal(rng, plain_rng) and model.seen == plain.seen
    assert [entry["ok"] for entry in hessian.history] == [True, True]
    assert hessian.history[-1]["hvp"] == dict.fromkeys(["net.0", "net.1", "net.4"], FINITE_DIFFERENCE)
    assert {block.hvp for block in hessian.last_report.blocks.values()} == {FINITE_DIFFERENCE}


# --------------------------------------------------------------------------- the referee and the fallback


def test_auto_detects_a_once_differentiable_function_and_finds_the_true_eigenvalues():
    data = _batch()
    true_op = lh.HessianOperator(tanh_mlp(False), cross_entropy_loss, data, dtype=torch.float64)
    truth = lh.eigenvalues(true_op, 2)
    op = lh.HessianOperator(tanh_mlp(True), cross_entropy_loss, data, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = lh.eigenvalues(op, 2)
    (message,) = _messages(caught, "No exact Hessian-vector product method works")
    assert "reverse-over-reverse: wrong products" in message and "once_differentiable" in message
    assert "relative error of about" in message
    assert op.choice.vector == FINITE_DIFFERENCE and op.choice.referee[REVERSE].startswith("wrong")
    assert FORWARD in op.choice.failures  # no forward-mode rule: no second exact method to compare
    torch.testing.assert_close(found.values, truth.values, rtol=1e-7, atol=0)
    # float32, the model's own dtype: within the float32 accuracy of the true values
    op32 = lh.HessianOperator(tanh_mlp(True), cross_entropy_loss, data)
    with pytest.warns(RuntimeWarning, match="No exact"):
        found32 = lh.eigenvalues(op32, 2)
    torch.testing.assert_close(found32.values, truth.values, rtol=1e-3, atol=0)


class _NoGraphTanh(torch.autograd.Function):
    """tanh whose backward refuses to build a graph (as some fused kernels do under create_graph)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError("this kernel has no double backward")
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class NoGraphTanh(nn.Module):
    def forward(self, x):
        return _NoGraphTanh.apply(x)


def test_auto_works_where_not_even_a_first_order_graph_can_be_built():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), NoGraphTanh(), nn.Linear(16, 3))
    data = _batch()
    with pytest.raises(RuntimeError, match="no double backward"):
        lh.HessianOperator(model, cross_entropy_loss, data, hvp=REVERSE)
    op = lh.HessianOperator(model, cross_entropy_loss, data, dtype=DOUBLE)
    with pytest.warns(RuntimeWarning, match=r"No exact.*no double backward"):
        found = lh.eigenvalues(op, 2)
    truth = lh.eigenvalues(lh.HessianOperator(tanh_mlp(False), cross_entropy_loss, data, dtype=DOUBLE), 2)
    torch.testing.assert_close(found.values, truth.values, rtol=1e-7, atol=0)
    assert op.choice.vector == FINITE_DIFFERENCE


def test_a_forced_exact_method_found_wrong_raises_on_every_product():
    op = lh.HessianOperator(tanh_mlp(True), cross_entropy_loss, _batch(), hvp=REVERSE)
    v = torch.randn(op.shape[0])
    wrong = r"hvp='reverse-over-reverse' gives wrong Hessian-vector products.*once_differentiable.*hvp='auto'"
    with pytest.raises(RuntimeError, match=wrong):
        op @ v
    with pytest.raises(RuntimeError, match=wrong):
        op @ torch.randn(op.shape[0], 3)
    right = lh.HessianOperator(tanh_mlp(False), cross_entropy_loss, _batch(), hvp=REVERSE)
    right @ v
    assert right.choice.referee[REVERSE].startswith("agrees")


def test_the_dense_path_referees_its_first_column():
    data = _batch()
    with pytest.warns(RuntimeWarning, match="No exact"):
        dense = lh.hessian(tanh_mlp(True), cross_entropy_loss, data, dtype=torch.float64)
    expected = reference_hessian(tanh_mlp(False), cross_entropy_loss, data)
    assert float((dense - expected).abs().max()) < 1e-8 * float(expected.abs().max())
    assert torch.equal(dense, dense.T)


def test_the_method_is_recorded_per_block_with_one_warning(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = lh.analyze(tanh_mlp(True), cross_entropy_loss, _batch(), blocks="module", dtype=DOUBLE)
    assert len(_messages(caught, "No exact")) == 1
    # Layer 2 comes after the fused tanh: its block needs no derivative of the tanh's backward.
    assert report.blocks["0"].hvp == FINITE_DIFFERENCE and report.blocks["2"].hvp == REVERSE
    expected = lh.analyze(tanh_mlp(False), cross_entropy_loss, _batch(), blocks="module", dtype=DOUBLE)
    for name, value in expected.scalars().items():
        assert report.scalars()[name] == pytest.approx(value, rel=1e-7, abs=1e-9), name
    loaded = lh.HessianReport.load(report.save(tmp_path / "report.pt"))
    methods = {name: block.hvp for name, block in loaded.blocks.items()}
    assert methods == {"0": FINITE_DIFFERENCE, "2": REVERSE}


def test_a_forced_method_is_not_refused_over_rounding_noise_on_a_zero_hessian():
    """A bias before a train-mode BatchNorm has a zero Hessian: nothing to judge (NOTE [Referee verdicts])."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    batch = (torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,)))
    op = lh.HessianOperator(model, cross_entropy_loss, [batch], mode="train", params="0.bias", hvp=REVERSE)
    assert float((op @ torch.randn(4, dtype=torch.float64)).abs().max()) < 1e-12
    assert op.choice.referee[REVERSE].startswith("unverified")


class Abs(nn.Module):
    """A kink that gradient differences do not freeze (NOTE [Frozen kinks]), unlike ReLU's."""

    def forward(self, x):
        return x.abs()


def test_gradient_differences_across_kinks_are_reported():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 256), Abs(), nn.Linear(256, 3))
    data = _batch(64, features=10)
    op = lh.HessianOperator(model, cross_entropy_loss, data, hvp=FINITE_DIFFERENCE)
    with pytest.warns(RuntimeWarning, match=r"hvp='finite-difference'.*cross kinks.*dtype=torch.float64"):
        op @ torch.randn(op.shape[0])
    auto = lh.HessianOperator(model, cross_entropy_loss, data)  # exact methods work, the referee abstains
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto @ torch.randn(auto.shape[0])
    assert auto.choice.vector in (REVERSE, FORWARD) and auto.choice.referee[auto.choice.vector].startswith(
        "unverified"
    )


# --------------------------------------------------------------------------- compiled modules


def test_auto_falls_back_once_on_a_compiled_module_and_matches_the_eager_one():
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    compiled = torch.compile(eager, backend="aot_eager")
    data = _batch()
    settings = {"blocks": "module", "top_k": 2, "density": False}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = lh.analyze(compiled, _mse, data, **settings)
    (message,) = _messages(caught, "No exact")
    assert "double backward" in message and "ZeroTensors" in message and "relative error of about" in message
    assert [block.hvp for block in report.blocks.values()] == [FINITE_DIFFERENCE] * 2
    expected = lh.analyze(eager, _mse, data, **settings)
    for got, want in zip(report.blocks.values(), expected.blocks.values(), strict=True):
        assert want.hvp == REVERSE
        torch.testing.assert_close(got.eigenvalues.values, want.eigenvalues.values, rtol=1e-3, atol=0)
        assert got.trace.value == pytest.approx(want.trace.value, rel=1e-3)


class CompiledRegression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        self.net = torch.compile(net, backend="aot_eager")

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return _mse(self, batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_callback_evaluates_a_compiled_module_through_gradient_differences(tmp_path):
    hessian = lh.HessianCallback(num_batches=2, top_k=2, figures=False)
    snapshot = Snapshot(hessian)
    module = CompiledRegression()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [hessian, snapshot], max_epochs=1, logger=False).fit(module, loader(n=32))
    assert len(_messages(caught, "No exact")) == 1
    (entry,) = hessian.history
    assert entry["ok"] and entry["hvp"] == {"model": FINITE_DIFFERENCE}
    (state,) = snapshot.states.values()
    eager = CompiledRegression()
    eager.net = eager.net._orig_mod
    eager.load_state_dict({k.replace("_orig_mod.", ""): v for k, v in state.items()})
    expected = lh.analyze(eager, None, hessian.batches, top_k=2, density=False).scalars()
    for name in ("hessian/model/eigenvalue_1", "hessian/model/eigenvalue_2", "hessian/model/trace"):
        assert entry[name] == pytest.approx(expected[name], rel=1e-3), name


# --------------------------------------------------------------------------- precision


def test_gradient_differences_run_with_autocast_off_in_the_parameters_dtype():
    model, loss_fn, data, mode = zoo("mlp")
    exact = lh.HessianOperator(model, loss_fn, data, hvp=REVERSE)
    v = torch.randn(exact.shape[0])
    expected = exact @ v
    op = lh.HessianOperator(model, loss_fn, data, hvp=FINITE_DIFFERENCE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        product = op @ v
    assert product.dtype == torch.float32
    assert _relative(product, expected) < expected_error(torch.float32)


def test_half_precision_products_say_what_they_are_worth_and_offer_float32():
    model, loss_fn, [(x, y)], _ = zoo("mlp")
    model, data = model.bfloat16(), [(x.bfloat16(), y)]
    with pytest.warns(UserWarning, match=r"torch\.bfloat16.*about 1e-2.*dtype=torch\.float32"):
        lh.HessianOperator(model, loss_fn, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op = lh.HessianOperator(model, loss_fn, data, dtype=torch.float32)
    assert (op @ torch.randn(op.shape[0])).dtype == torch.float32


class _CheckpointedTanh(nn.Module):
    """``Linear -> [Linear -> tanh] -> Linear`` with the middle recomputed in backward (or not)."""

    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        self.checkpointed = checkpointed
        self.inner, self.middle, self.outer = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def segment(z: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.middle(z))

        hidden = self.inner(x)
        if self.checkpointed:
            hidden = torch.utils.checkpoint.checkpoint(segment, hidden, use_reentrant=False)
        else:
            hidden = segment(hidden)
        return self.outer(hidden)


@pytest.mark.parametrize("method", [FINITE_DIFFERENCE, REVERSE])
def test_activation_checkpointing_recomputes_with_the_swapped_in_parameters(method):
    """The forward that checkpointing runs again in backward sees the perturbed (or differentiated)
    parameters, not the module's own: products equal those of the same model without checkpointing.
    """
    torch.manual_seed(0)
    plain = _CheckpointedTanh(checkpointed=False).double()
    checkpointed = _CheckpointedTanh(checkpointed=True).double()
    checkpointed.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 4, generator=g, dtype=DOUBLE), torch.randint(0, 3, (6,), generator=g))]
    exact = lh.HessianOperator(plain, cross_entropy_loss, data, hvp=REVERSE)
    V = torch.randn(exact.shape[0], 3, dtype=DOUBLE, generator=g)
    expected = exact @ V
    products = lh.HessianOperator(checkpointed, cross_entropy_loss, data, hvp=method) @ V
    tolerance = 1e-7 if method == FINITE_DIFFERENCE else 1e-12
    assert (products - expected).norm() <= tolerance * expected.norm()
