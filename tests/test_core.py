"""The functional core: exact dense Hessians and Hessian-vector products against references."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_hessian as lh
from lightning_hessian.operator import FORWARD, REVERSE
from tests.helpers import SeedCNN, cross_entropy_loss, reference_hessian

# --------------------------------------------------------------------------- the seed's examples


class Quadratic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor([0.0, 0.0, 0.0]))


SEED_A = torch.tensor([[-5, -3, -0.5], [-3, -2, 0], [-0.5, 0, -0.5]])
SEED_B = torch.tensor([1.0, 3, 5])


def quadratic_loss(module: Quadratic, batch) -> torch.Tensor:
    x = module.x
    return SEED_B @ x + 0.5 * x @ SEED_A @ x


@pytest.mark.parametrize("hvp", ["auto", REVERSE, FORWARD])
def test_seed_quadratic_hessian_is_A(hvp):
    H = lh.hessian(Quadratic(), quadratic_loss, [torch.zeros(1)], hvp=hvp)
    torch.testing.assert_close(H, SEED_A, rtol=0, atol=0)


def test_seed_cnn_matches_the_seeds_own_formulation():
    """The seed's method 2 (hand-written forward over flattened parameters), at 2x2 images."""
    torch.manual_seed(0)
    h = w = 2
    net = SeedCNN(h, w)
    x = torch.randn(8, 1, h, w)
    y = torch.randint(0, 5, (8,))

    def forward_loss(a, b, c, d):
        p = [a.view(32, 1, 3, 3), b, c.view(5, 32 * h * w), d]
        z = F.conv2d(x, p[0], p[1], 1, 1)
        z = z.view(z.size(0), -1)
        return F.cross_entropy(F.linear(z, p[2], p[3]), y)

    blocks = torch.autograd.functional.hessian(
        forward_loss, tuple(p.detach().view(-1) for p in net.parameters())
    )
    expected = torch.cat([torch.cat(list(row), dim=1) for row in blocks], dim=0)
    H = lh.hessian(net, cross_entropy_loss, [(x, y)])
    assert H.shape == (965, 965)
    torch.testing.assert_close(H, expected, rtol=1e-4, atol=1e-6)
    assert torch.equal(H, H.T)


# --------------------------------------------------------------------------- the zoo


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h.mean(1))


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class DictModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 1)

    def forward(self, features):
        return self.b(torch.tanh(self.a(features))).squeeze(-1)


def dict_loss(module, batch):
    return (module(batch["features"]) - batch["target"]).pow(2).mean()


def _zoo(name: str):
    g = torch.Generator().manual_seed(1)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        data = [(torch.randn(10, 4, generator=g), torch.randint(0, 3, (10,), generator=g))]
        return model, cross_entropy_loss, data, "eval"
    if name in ("conv_bn_eval", "conv_bn_train"):
        model = ConvBN()
        with torch.no_grad():  # non-trivial running statistics
            model.bn.running_mean.uniform_(-0.5, 0.5)
            model.bn.running_var.uniform_(0.5, 1.5)
        data = [(torch.randn(6, 2, 4, 4, generator=g), torch.randint(0, 3, (6,), generator=g))]
        return model, cross_entropy_loss, data, name.removeprefix("conv_bn_")
    if name == "attention":
        data = [(torch.randn(4, 5, 3, generator=g), torch.randint(0, 3, (4,), generator=g))]
        return Attention(), cross_entropy_loss, data, "eval"
    if name == "recurrent":
        data = [(torch.randn(4, 6, 3, generator=g), torch.randint(0, 3, (4,), generator=g))]
        return Recurrent(), cross_entropy_loss, data, "eval"
    if name == "dict_batch":
        data = [{"features": torch.randn(7, 4, generator=g), "target": torch.randn(7, generator=g)}]
        return DictModel(), dict_loss, data, "eval"
    raise KeyError(name)


ZOO = ["mlp", "conv_bn_eval", "conv_bn_train", "attention", "recurrent", "dict_batch"]


@pytest.mark.parametrize("name", ZOO)
def test_zoo_dense_hessian_matches_float64_reference(name):
    torch.manual_seed(0)
    model, loss_fn, data, mode = _zoo(name)
    expected = reference_hessian(model, loss_fn, data, mode=mode)
    H64 = lh.hessian(model, loss_fn, data, mode=mode, dtype=torch.float64)
    torch.testing.assert_close(H64, expected, rtol=1e-9, atol=1e-11)
    H32 = lh.hessian(model, loss_fn, data, mode=mode)
    assert H32.dtype == torch.float32
    scale = expected.abs().max()
    assert (H32.double() - expected).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize("name", ZOO)
def test_all_product_methods_agree_in_float32(name):
    torch.manual_seed(0)
    model, loss_fn, data, mode = _zoo(name)
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
    model, loss_fn, data, mode = _zoo(name)
    op = lh.HessianOperator(model, loss_fn, data, mode=mode, dtype=torch.float64)
    expected = reference_hessian(model, loss_fn, data, mode=mode)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    torch.testing.assert_close(op @ v, expected @ v)
    V = torch.randn(op.shape[0], 3, dtype=torch.float64)
    torch.testing.assert_close(op @ V, expected @ V)
    assert op.choice.vector in (REVERSE, FORWARD)
    assert op.choice.matrix is not None
    assert set(op.choice.seconds) >= {REVERSE, FORWARD}


def test_transformer_encoder_layer_works_on_cpu_fused_attention():
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    x = torch.randn(3, 4, 8)

    def loss_fn(module, batch):
        return module(batch).pow(2).mean()

    H = lh.hessian(model, loss_fn, [x], dtype=torch.float64)
    expected = reference_hessian(model, loss_fn, [x])
    torch.testing.assert_close(H, expected, rtol=1e-8, atol=1e-10)


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


def test_auto_skips_a_method_that_fails():
    model = CustomCube(_NoForwardMode)
    x = torch.ones(1, 3)
    op = lh.HessianOperator(model, lambda m, b: m(b), [x], dtype=torch.float64)
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
    op = lh.HessianOperator(model, lambda m, b: m(b), [x], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="forward-over-reverse.*wrong products"):
        hv = op @ torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(hv, 6 * model.w.detach().double())
    assert op.choice.vector == REVERSE


# --------------------------------------------------------------------------- blocks, batches, selection


def test_blocks_are_the_diagonal_blocks_of_the_full_matrix():
    model, loss_fn, data, _ = _zoo("conv_bn_eval")
    full = lh.hessian(model, loss_fn, data, dtype=torch.float64)
    slices = lh.ParameterSpace.from_tensors(dict(model.named_parameters())).slices()
    for kind in ("module", "parameter", {"features": ["conv.*", "bn.*"], "classifier": "fc.*"}):
        blocks = lh.hessian(model, loss_fn, data, blocks=kind, dtype=torch.float64)
        groups = lh.resolve_blocks(list(slices), kind)
        assert list(blocks) == list(groups)
        for name, names in groups.items():
            index = torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in names])
            torch.testing.assert_close(blocks[name], full[index][:, index], rtol=1e-10, atol=1e-12)


def test_uneven_batches_give_the_hessian_of_the_mean_over_all_samples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    together = lh.hessian(model, cross_entropy_loss, [(x, y)], dtype=torch.float64)
    split = lh.hessian(model, cross_entropy_loss, [(x[:5], y[:5]), (x[5:], y[5:])], dtype=torch.float64)
    torch.testing.assert_close(split, together)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    torch.testing.assert_close(lh.hessian(model, cross_entropy_loss, loader, dtype=torch.float64), together)


def test_batch_size_fn_weights_batches():
    model = Quadratic()
    double = lh.hessian(model, quadratic_loss, ["a", "b"], batch_size_fn=lambda b: 1)
    torch.testing.assert_close(double, SEED_A)


def test_params_selection_frozen_and_shared_parameters():
    torch.manual_seed(0)
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(3, 2))
    model[4].bias.requires_grad_(False)
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    parameters = list(model.parameters())
    op = lh.HessianOperator(model, cross_entropy_loss, [(x, y)], dtype=torch.float64)
    assert op.space.names == ("0.weight", "0.bias", "4.weight")
    assert op.shape == (9 + 3 + 6, 9 + 3 + 6)
    H = op.to_dense()
    torch.testing.assert_close(H, reference_hessian(model, cross_entropy_loss, [(x, y)]))
    sub = lh.hessian(model, cross_entropy_loss, [(x, y)], params="4.*", dtype=torch.float64)
    torch.testing.assert_close(sub, H[12:, 12:])
    # the tied weight is still one Parameter object, registered under both names
    assert all(a is b for a, b in zip(parameters, model.parameters(), strict=True))
    assert model[0].weight is model[2].weight and isinstance(model[2].weight, nn.Parameter)


def test_flatten_unflatten_round_trip_in_named_parameters_order():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    space = lh.ParameterSpace.from_tensors(dict(model.named_parameters()))
    flat = space.flatten(dict(model.named_parameters()))
    expected = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(flat, expected)
    for name, tensor in space.unflatten(flat).items():
        torch.testing.assert_close(tensor, dict(model.named_parameters())[name].detach())


# --------------------------------------------------------------------------- state, modes, dtypes, contexts


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        torch.get_rng_state(),
        random.getstate(),
    )


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_module_state_is_unchanged(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Dropout(0.3), nn.Linear(5, 2))
    model.train()
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    model(x).sum().backward()  # populate .grad and running stats
    before = _snapshot(model)
    with pytest.warns(UserWarning, match="dropout") if mode == "train" else _nullcontext():
        op = lh.HessianOperator(model, cross_entropy_loss, [(x, y)], mode=mode)
    g = torch.Generator().manual_seed(0)
    op @ torch.randn(op.shape[0], generator=g)
    op @ torch.randn(op.shape[0], 3, generator=g)
    lh.hessian(model, cross_entropy_loss, [(x, y)], mode=mode, blocks="module")
    after = _snapshot(model)
    for key in before[0]:
        assert torch.equal(before[0][key], after[0][key]), key
    assert before[1] == after[1]
    assert all(torch.equal(a, b) for a, b in zip(before[2], after[2], strict=True))
    assert torch.equal(before[3], after[3])
    assert before[4] == after[4]


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def test_train_mode_uses_batch_statistics_and_a_fixed_dropout_mask():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2))
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    train = lh.hessian(model, cross_entropy_loss, [(x, y)], mode="train", dtype=torch.float64)
    evaluation = lh.hessian(model, cross_entropy_loss, [(x, y)], mode="eval", dtype=torch.float64)
    torch.testing.assert_close(train, reference_hessian(model, cross_entropy_loss, [(x, y)], mode="train"))
    assert not torch.allclose(train, evaluation)
    dropout = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 2))
    with pytest.warns(UserWarning, match="fixed random dropout mask"):
        op = lh.HessianOperator(dropout, cross_entropy_loss, [(x, y)], mode="train", dtype=torch.float64)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    torch.testing.assert_close(op @ v, op @ v)  # the same mask at every product
    H = op.to_dense()
    torch.testing.assert_close(H, H.T)


def test_works_under_no_grad_and_inference_mode_callers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    expected = lh.hessian(model, cross_entropy_loss, [(x, y)])
    with torch.no_grad():
        torch.testing.assert_close(lh.hessian(model, cross_entropy_loss, [(x, y)]), expected)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()  # inference tensors
        torch.testing.assert_close(lh.hessian(model, cross_entropy_loss, [(xi, yi)]), expected)


def test_autocast_is_off_inside():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    expected = lh.hessian(model, cross_entropy_loss, [(x, y)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        H = lh.hessian(model, cross_entropy_loss, [(x, y)])
    assert H.dtype == torch.float32
    torch.testing.assert_close(H, expected)


def test_dtype_casts_parameters_buffers_and_inputs():
    model, loss_fn, data, _ = _zoo("conv_bn_eval")
    op = lh.HessianOperator(model, loss_fn, data, dtype=torch.float64)
    assert op.dtype == torch.float64
    assert (op @ torch.randn(op.shape[0])).dtype == torch.float64
    assert next(model.parameters()).dtype == torch.float32


def test_lightning_module_training_step_is_the_default_loss_and_logging_is_silenced():
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
            self.logged = 0

        def training_step(self, batch, batch_idx):
            loss = cross_entropy_loss(self.net, batch)
            self.log("train_loss", loss)
            self.log_dict({"other": loss})
            return {"loss": loss}

        def log(self, *args, **kwargs):
            self.logged += 1

        def log_dict(self, *args, **kwargs):
            self.logged += 1

    torch.manual_seed(0)
    module = Module()
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    H = lh.hessian(module, None, [(x, y)], dtype=torch.float64)
    torch.testing.assert_close(H, reference_hessian(module.net, cross_entropy_loss, [(x, y)]))
    assert module.logged == 0
    assert "log" not in module.__dict__

    class Manual(Module):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(TypeError, match="manual optimization.*loss_fn"):
        lh.hessian(Manual(), None, [(x, y)])


# --------------------------------------------------------------------------- bad input


def _tiny():
    model = nn.Sequential(nn.Linear(3, 2))
    return model, [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]


def test_loss_not_a_scalar_is_rejected():
    model, data = _tiny()
    with pytest.raises(ValueError, match="`loss_fn` must return a scalar"):
        lh.hessian(model, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), data)


def test_loss_without_a_path_to_the_parameters_is_rejected():
    model, data = _tiny()
    other = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="does not depend on the selected parameters"):
        lh.hessian(model, lambda m, b: F.cross_entropy(other(b[0]), b[1]), data)


def test_params_matching_nothing_is_rejected():
    model, data = _tiny()
    with pytest.raises(ValueError, match=r"`params='conv\.\*'` selects no trainable parameter.*0\.weight"):
        lh.hessian(model, cross_entropy_loss, data, params="conv.*")


def test_unknown_blocks_is_rejected():
    model, data = _tiny()
    with pytest.raises(ValueError, match="Unknown `blocks='layer'`"):
        lh.hessian(model, cross_entropy_loss, data, blocks="layer")
    with pytest.raises(ValueError, match=r"`blocks\['x'\]='nothing\*'` matches no selected parameter"):
        lh.hessian(model, cross_entropy_loss, data, blocks={"x": "nothing*"})


def test_empty_data_is_rejected():
    model, _ = _tiny()
    with pytest.raises(ValueError, match="`data` holds no batch"):
        lh.hessian(model, cross_entropy_loss, [])


def test_batch_of_unknown_size_is_rejected():
    model, _ = _tiny()
    with pytest.raises(ValueError, match="batch_size_fn"):
        lh.hessian(model, lambda m, b: m(torch.ones(1, 3)).sum(), ["no tensor here"])


def test_bad_mode_is_rejected():
    model, data = _tiny()
    with pytest.raises(ValueError, match="`mode='test'` is not supported"):
        lh.hessian(model, cross_entropy_loss, data, mode="test")


def test_dense_hessian_too_large_is_rejected_before_allocating(monkeypatch):
    import time

    model = nn.Linear(1000, 200)  # 200,200 parameters: a 160 GB float32 matrix
    data = [(torch.randn(2, 1000), torch.randint(0, 200, (2,)))]
    start = time.perf_counter()
    with pytest.raises(lh.HessianTooLargeError, match=r"needs 1\d\d\.\d\d GB.*`blocks=`.*`params=`"):
        lh.hessian(model, cross_entropy_loss, data)
    assert time.perf_counter() - start < 10


def test_non_finite_products_raise_a_clear_error():
    model, data = _tiny()
    x, y = data[0]
    x = x.clone()
    x[0, 0] = float("nan")
    op = lh.HessianOperator(model, cross_entropy_loss, [(x, y)], hvp=REVERSE)
    with pytest.raises(lh.NonFiniteHessianError, match="not finite"):
        op @ torch.ones(op.shape[0])
    with pytest.raises(lh.NonFiniteHessianError):
        lh.analyze(model, cross_entropy_loss, [(x, y)])


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
