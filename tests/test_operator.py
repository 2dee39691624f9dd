"""Hessian-vector products (lightning_hessian.operator): every product method against the references,
the automatic method choice and its memory, and non-finite products.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_hessian as lh
from lightning_hessian.operator import FORWARD, REVERSE
from tests.helpers import ZOO, DictModel, cross_entropy_loss, reference_hessian, tiny, zoo

# --------------------------------------------------------------------------- product methods


@pytest.mark.parametrize("name", ZOO)
def test_all_product_methods_agree_in_float32(name):
    torch.manual_seed(0)
    model, loss_fn, data, mode = zoo(name)
    results = {}
    V = torch.randn(sum(p.numel() for p in model.parameters()), 5)
    for method in (REVERSE, FORWARD):
        op = lh.HessianOperator(model, loss_fn, data, mode=mode, hvp=method)
        results[f"{method} vector"] = torch.stack([op @ V[:, j] for j in range(V.shape[1])], dim=1)
        results[f"{method} batched"] = op @ V
        assert op.num_matvecs == 2 * V.shape[1]
    reference = results[f"{REVERSE} vector"]
    for label, value in results.items():
        relative = (value - reference).norm() / reference.norm()
        assert relative <= 1e-5, f"{label}: relative difference {relative:.2e}"


@pytest.mark.parametrize("name", ["mlp", "attention", "conv_bn_train"])
def test_auto_agrees_with_reference_and_records_its_choice(name):
    model, loss_fn, data, mode = zoo(name)
    op = lh.HessianOperator(model, loss_fn, data, mode=mode, dtype=torch.float64)
    expected = reference_hessian(model, loss_fn, data, mode=mode)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    torch.testing.assert_close(op @ v, expected @ v)
    V = torch.randn(op.shape[0], 3, dtype=torch.float64)
    torch.testing.assert_close(op @ V, expected @ V)
    assert op.choice.vector in (REVERSE, FORWARD)
    assert op.choice.matrix is not None
    assert REVERSE in op.choice.seconds  # with cached graphs, tried alone first (NOTE [Cached graph first])


# --------------------------------------------------------------------------- the public methods


def test_public_methods_agree_with_the_reference_matrix():
    model, loss_fn, data, _ = zoo("mlp")
    op = lh.HessianOperator(model, loss_fn, data, dtype=torch.float64, hvp=REVERSE)
    H = reference_hessian(model, loss_fn, data)
    slices = op.space.slices()
    assert op.space.names == ("0.weight", "0.bias", "2.weight", "2.bias")
    assert op.shape == (51, 51) and op.dtype == torch.float64 and op.device == torch.device("cpu")
    assert op.num_batches == 1 and op.num_samples == 10
    parameters = op.parameters
    assert list(parameters) == list(op.space.names)
    for name, value in model.named_parameters():
        assert torch.equal(parameters[name], value.detach().double()) and parameters[name] is not value
    (x, y), *_ = data
    with torch.no_grad():
        expected_loss = float(loss_fn(copy.deepcopy(model).double(), (x.double(), y)))
    assert op.loss() == pytest.approx(expected_loss, rel=1e-12)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(51, generator=g, dtype=torch.float64)
    V = torch.randn(51, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), H @ v)
    torch.testing.assert_close(op.matmat(V), H @ V)
    op.release_graphs()  # rebuilt on the next product
    torch.testing.assert_close(op @ v, H @ v)
    # a diagonal block, and an off-diagonal block of products
    head = torch.arange(slices["2.weight"].start, slices["2.bias"].stop)
    block = op.restrict(["2.bias", "2.weight"])
    assert block.space.names == ("2.weight", "2.bias") and block.shape == (21, 21)
    torch.testing.assert_close(block @ v[head], H[head][:, head] @ v[head])
    support, targets = slices["2.weight"], slices["0.bias"]
    rows = V[support].T.contiguous()
    products = op.block_products(rows, ("2.weight",), ("0.bias",))
    torch.testing.assert_close(products, (H[targets, support] @ rows.T).T)
    torch.testing.assert_close(op.to_dense(), H)
    with pytest.raises(ValueError, match="Unknown or empty parameter names"):
        op.restrict(["nope"])
    with pytest.raises(ValueError, match=r"Expected a tensor of shape \[51\]"):
        op @ torch.ones(50, dtype=torch.float64)


# ------------------------------------------------------------------ auto must not pick a broken method


class _NoForwardMode(torch.autograd.Function):
    """x**3 with a reverse-mode rule only: forward-mode AD raises."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 3 * x**2


class _SquareTimesThree(torch.autograd.Function):
    """3 x**2 with a correct backward (6 x) but a wrong forward-mode rule (12 x)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return 3 * x**2

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x,) = inputs
        ctx.save_for_backward(x)
        ctx.x = x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 6 * x

    @staticmethod
    def jvp(ctx, tangent):
        return 12 * ctx.x * tangent


class _WrongForwardMode(torch.autograd.Function):
    """x**3 whose backward formula forward-mode AD mis-differentiates (through _SquareTimesThree)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x,) = inputs
        ctx.save_for_backward(x)
        ctx.x = x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * _SquareTimesThree.apply(x)

    @staticmethod
    def jvp(ctx, tangent):
        return 3 * ctx.x**2 * tangent


class CustomCube(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn
        self.w = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))

    def forward(self, x):
        return (self.fn.apply(self.w) * x).sum()


def test_with_cached_graphs_auto_tries_reverse_over_reverse_alone_first():
    model, loss_fn, data, _ = zoo("mlp")
    op = lh.HessianOperator(model, loss_fn, data, dtype=torch.float64)
    op @ torch.ones(op.shape[0], dtype=torch.float64)
    assert op.choice.vector == REVERSE and set(op.choice.seconds) == {REVERSE}
    assert op.choice.referee[REVERSE].startswith("agrees")  # checked by gradient differences instead


def test_auto_skips_a_method_that_fails():
    model = CustomCube(_NoForwardMode)
    x = torch.ones(1, 3)
    # Without cached graphs both exact methods are timed on the first product.
    op = lh.HessianOperator(model, lambda m, b: m(b), [x], dtype=torch.float64, cache_graphs=False)
    v = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(op @ v, 6 * model.w.detach().double())
    assert op.choice.vector == REVERSE
    assert FORWARD in op.choice.failures


def test_auto_falls_back_when_torch_func_fails_on_a_real_layer():
    """torch 2.13: jvp(grad(F.mse_loss)) raises 'ZeroTensors are immutable'; auto must not care."""
    torch.manual_seed(0)
    model = DictModel()
    batch = {"features": torch.randn(7, 4), "target": torch.randn(7)}

    def mse(module, b):
        return F.mse_loss(module(b["features"]), b["target"])

    op = lh.HessianOperator(model, mse, [batch], dtype=torch.float64)
    expected = reference_hessian(model, mse, [batch])
    V = torch.randn(op.shape[0], 4, dtype=torch.float64)
    torch.testing.assert_close(op @ V, expected @ V)
    torch.testing.assert_close(op @ V[:, 0], expected @ V[:, 0])
    if FORWARD in op.choice.failures:
        assert op.choice.vector == REVERSE


def test_auto_skips_a_method_that_disagrees():
    model = CustomCube(_WrongForwardMode)
    x = torch.ones(1, 3)
    op = lh.HessianOperator(model, lambda m, b: m(b), [x], dtype=torch.float64, cache_graphs=False)
    with pytest.warns(RuntimeWarning, match="forward-over-reverse.*wrong products"):
        hv = op @ torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(hv, 6 * model.w.detach().double())
    assert op.choice.vector == REVERSE


# ------------------------------------------------------------ non-finite products, method memory


def test_non_finite_products_raise_a_clear_error():
    model, data = tiny()
    x, y = data[0]
    x = x.clone()
    x[0, 0] = float("nan")
    op = lh.HessianOperator(model, cross_entropy_loss, [(x, y)], hvp=REVERSE)
    with pytest.raises(lh.NonFiniteHessianError, match="not finite"):
        op @ torch.ones(op.shape[0])


def test_auto_remembers_its_choice_for_the_same_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    data = [(torch.randn(5, 3), torch.randint(0, 2, (5,)))]
    first = lh.HessianOperator(model, cross_entropy_loss, data)
    first @ torch.ones(first.shape[0], 2)
    again = lh.HessianOperator(model, cross_entropy_loss, data)
    assert (again.choice.vector, again.choice.matrix) == (first.choice.vector, first.choice.matrix)
    other_data = [(torch.randn(7, 3), torch.randint(0, 2, (7,)))]
    other_batch = lh.HessianOperator(model, cross_entropy_loss, other_data)
    assert other_batch.choice.vector is None  # different shapes: measured afresh


def test_auto_does_not_discard_a_method_over_rounding_noise_on_a_zero_column(recwarn):
    """A bias before a train-mode BatchNorm has a zero Hessian: both methods return rounding noise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    batch = (torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,)))
    op = lh.HessianOperator(model, cross_entropy_loss, [batch], mode="train", params="0.bias")
    product = op @ torch.randn(4, dtype=torch.float64)
    assert float(product.abs().max()) < 1e-12
    assert op.choice.failures == {}
    assert not [w for w in recwarn if "gives wrong products" in str(w.message)]
    full = lh.hessian(model, cross_entropy_loss, [batch], mode="train")  # dense: unit columns, some zero
    torch.testing.assert_close(full, reference_hessian(model, cross_entropy_loss, [batch], "train"))
    assert not [w for w in recwarn if "gives wrong products" in str(w.message)]


def test_forced_forward_over_reverse_on_mse_names_the_torch_limitation():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    batch = (torch.randn(8, 3), torch.randn(8, 2))

    def mse(module, b):
        return F.mse_loss(module(b[0]), b[1])

    op = lh.HessianOperator(model, mse, [batch], hvp=FORWARD)
    with pytest.raises(RuntimeError, match=r"torch limitation.*hvp='auto'"):
        op @ torch.randn(op.shape[0])
    auto = lh.HessianOperator(model, mse, [batch])
    assert (auto @ torch.randn(auto.shape[0])).shape == (op.shape[0],)


class _EmbeddingMean(nn.Module):
    """EmbeddingBag(mode='mean') written with nn.Embedding, which has second derivatives."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())

    def forward(self, index):
        return F.embedding(index, self.weight).mean(1)


def test_embedding_bag_falls_back_to_gradient_differences_and_says_how_to_exclude_it():
    """PyTorch has no second derivatives of EmbeddingBag: auto warns once and differences gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(10, 4), nn.Linear(4, 2)).double()
    batch = (torch.randint(0, 10, (8, 3)), torch.randint(0, 2, (8,)))
    op = lh.HessianOperator(model, cross_entropy_loss, [batch])
    v = torch.randn(op.shape[0], dtype=torch.float64)
    advice = r"gradient differences.*'0' \(EmbeddingBag\).*params=\['1\.\*'\]"
    with pytest.warns(RuntimeWarning, match=advice):
        hv = op @ v
    assert op.choice.vector == "finite-difference"
    twin = nn.Sequential(_EmbeddingMean(model[0].weight), copy.deepcopy(model[1]))
    expected = reference_hessian(twin, cross_entropy_loss, [batch]) @ v
    assert float((hv - expected).norm() / expected.norm()) < 1e-7
    with pytest.raises(NotImplementedError, match="_embedding_bag_backward"):
        lh.HessianOperator(model, cross_entropy_loss, [batch], hvp=REVERSE) @ v
    rest = lh.HessianOperator(model, cross_entropy_loss, [batch], params="1.*")
    assert (rest @ torch.randn(rest.shape[0], dtype=torch.float64)).shape == (10,)
    assert rest.choice.vector in (REVERSE, FORWARD)


def test_auto_choice_memory_is_not_inherited_by_a_new_model_at_a_freed_address():
    """The choice is remembered per live model: a new model never takes over a dead one's key, even
    where Python gives it the same ``id`` (which made a test's remembered choice leak into another's).
    """
    from lightning_hessian.operator.selection import _model_serial

    dead = [nn.Linear(2, 2) for _ in range(300)]
    serial_at = {id(m): _model_serial(m) for m in dead}
    del dead
    alive = [nn.Linear(2, 2) for _ in range(300)]
    reused = [m for m in alive if id(m) in serial_at]
    assert reused, "no freed address was reused; the test needs one"
    assert all(_model_serial(m) != serial_at[id(m)] for m in reused)
    assert len({_model_serial(m) for m in alive}) == len(alive)


def test_a_small_block_product_is_not_sized_from_free_memory(monkeypatch):
    # Asking the system for free memory takes about as long as a small model's gradient: a block
    # whose columns together need little runs in one chunk without asking; a large one still asks.
    import lightning_hessian.operator.hessian as hessian_module

    calls = []

    def counted(device):
        calls.append(device)
        return 8 * 1024**3

    monkeypatch.setattr(hessian_module, "available_memory", counted)
    model, data = tiny()
    op = lh.HessianOperator(model, cross_entropy_loss, data, hvp=REVERSE)
    V = torch.randn(op.shape[0], 4, dtype=op.dtype)
    torch.testing.assert_close(op @ V, torch.stack([op @ V[:, j].contiguous() for j in range(4)], 1))
    assert calls == []
    monkeypatch.setattr(hessian_module, "_SMALL_PRODUCT_BYTES", 1)
    op @ V
    assert len(calls) == 1
