"""The loss closure (lightning_hessian.closure): the module is left as found, train/eval modes, caller
contexts (no-grad, inference mode, autocast, fused attention), dtypes, batch sizes, LightningModule
losses and the rejection of bad losses, data and modes.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_hessian as lh
import lightning_hessian.closure as closure_module
from lightning_hessian.state import TensorSlots
from tests.helpers import SEED_A, Quadratic, cross_entropy_loss, quadratic_loss, reference_hessian, tiny, zoo

# --------------------------------------------------------------------------- state and modes


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
    with pytest.warns(UserWarning, match="dropout") if mode == "train" else contextlib.nullcontext():
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


# --------------------------------------------------------------------------- caller contexts


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


def test_transformer_encoder_layer_works_on_cpu_fused_attention():
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    x = torch.randn(3, 4, 8)

    def loss_fn(module, batch):
        return module(batch).pow(2).mean()

    H = lh.hessian(model, loss_fn, [x], dtype=torch.float64)
    expected = reference_hessian(model, loss_fn, [x])
    torch.testing.assert_close(H, expected, rtol=1e-8, atol=1e-10)


def test_dtype_casts_parameters_buffers_and_inputs():
    model, loss_fn, data, _ = zoo("conv_bn_eval")
    op = lh.HessianOperator(model, loss_fn, data, dtype=torch.float64)
    assert op.dtype == torch.float64
    assert (op @ torch.randn(op.shape[0])).dtype == torch.float64
    assert next(model.parameters()).dtype == torch.float32


# --------------------------------------------------------------------------- batches and their sizes


def test_batch_size_fn_weights_batches():
    model = Quadratic()
    double = lh.hessian(model, quadratic_loss, ["a", "b"], batch_size_fn=lambda b: 1)
    torch.testing.assert_close(double, SEED_A)


@dataclass
class _Batch:
    label: str
    inputs: torch.Tensor


def test_infer_batch_size_takes_the_first_tensor_found():
    assert lh.infer_batch_size(torch.zeros(7, 2)) == 7
    assert lh.infer_batch_size((torch.zeros(8, 3), torch.zeros(8))) == 8
    assert lh.infer_batch_size({"meta": "x", "x": [torch.zeros(5, 1)]}) == 5
    assert lh.infer_batch_size(_Batch("b", torch.zeros(6))) == 6
    for bad in ("text", torch.tensor(1.0), {"n": 3}):
        with pytest.raises(ValueError, match="batch_size_fn"):
            lh.infer_batch_size(bad)


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


def test_loss_not_a_scalar_is_rejected():
    model, data = tiny()
    with pytest.raises(ValueError, match="`loss_fn` must return a scalar"):
        lh.hessian(model, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), data)


def test_loss_without_a_path_to_the_parameters_is_rejected():
    model, data = tiny()
    other = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="does not depend on the selected parameters"):
        lh.hessian(model, lambda m, b: F.cross_entropy(other(b[0]), b[1]), data)


def test_empty_data_is_rejected():
    model, _ = tiny()
    with pytest.raises(ValueError, match="`data` holds no batch"):
        lh.hessian(model, cross_entropy_loss, [])


def test_batch_of_unknown_size_is_rejected():
    model, _ = tiny()
    with pytest.raises(ValueError, match="batch_size_fn"):
        lh.hessian(model, lambda m, b: m(torch.ones(1, 3)).sum(), ["no tensor here"])


def test_bad_mode_is_rejected():
    model, data = tiny()
    with pytest.raises(ValueError, match="`mode='test'` is not supported"):
        lh.hessian(model, cross_entropy_loss, data, mode="test")


# --------------------------------------------------------------------------- held state and slots


def test_held_saves_state_once_and_restores_it_after_many_products(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2)).train()
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    op = lh.HessianOperator(model, cross_entropy_loss, [(x[:3], y[:3]), (x[3:], y[3:])], mode="eval")
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(1))
    standalone = op @ v
    before = _snapshot(model)
    saves = []
    original = closure_module.preserved_module_state
    monkeypatch.setattr(closure_module, "preserved_module_state", lambda m: saves.append(m) or original(m))
    with op.closure.held():
        assert len(saves) == 1 and not any(m.training for m in model.modules())
        held_product = op @ v
        op.for_batch(1) @ v  # a per-batch operator's closure shares the hold
        assert len(saves) == 1
    torch.testing.assert_close(held_product, standalone, rtol=0, atol=0)
    after = _snapshot(model)
    assert after[1] == before[1] and all(after[1])
    assert torch.equal(after[3], before[3]) and after[4] == before[4]
    op @ v  # outside held, a product saves and restores the state itself again
    assert len(saves) == 2


def test_slots_read_what_named_parameters_and_named_buffers_give_without_walking_the_module():
    shared, norm = nn.Linear(3, 3), nn.BatchNorm1d(3)
    model = nn.Sequential(shared, norm, nn.Tanh(), shared, norm)  # tied layers: one name per tensor
    slots = TensorSlots(model)
    for kind, named in (("_parameters", model.named_parameters), ("_buffers", model.named_buffers)):
        current = slots.current(kind)
        assert list(current) == [n for n, _ in named()]
        assert all(current[n] is t for n, t in named())
    norm.running_mean = torch.ones(3)  # a buffer replaced: the slot holds the new tensor
    assert slots.current("_buffers")["1.running_mean"] is norm.running_mean
    with slots.swapped({"0.weight": torch.zeros(3, 3)}):
        assert torch.equal(slots.current("_parameters")["0.weight"], torch.zeros(3, 3))


def test_slots_swap_tied_parameters_together_and_put_the_originals_back():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.Tanh(), shared)  # one tensor under two names
    slots = TensorSlots(model)
    weight, bias = shared.weight, shared.bias
    x = torch.randn(2, 3)
    new = {"0.weight": torch.zeros(3, 3), "0.bias": torch.ones(3)}
    with slots.swapped(new):
        assert torch.equal(model(x), torch.ones(2, 3))  # both uses of the tied layer saw the new tensors
    assert shared.weight is weight and shared.bias is bias
    with pytest.raises(RuntimeError, match="boom"), slots.swapped(new):
        raise RuntimeError("boom")
    assert shared.weight is weight
    with pytest.raises(KeyError, match="neither a parameter nor a buffer"), slots.swapped({"nope": x}):
        pass
