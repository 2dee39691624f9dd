"""HessianCallback never changes the training run; failures follow `on_error`; precision; grad contexts."""

from __future__ import annotations

import random
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_hessian as lh
from tests.helpers import (
    FAST,
    Snapshot,
    TinyModule,
    cross_entropy_loss,
    loader,
    trainer,
)


class Probe(Callback):
    """Records what the training run sees after each step: training flags, gradients, loss."""

    def __init__(self) -> None:
        self.flags: list[tuple[bool, ...]] = []
        self.grads: list[list[torch.Tensor | None]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.flags.append(tuple(m.training for m in pl_module.modules()))
        self.grads.append([None if p.grad is None else p.grad.clone() for p in pl_module.parameters()])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.flags.append(tuple(m.training for m in pl_module.modules()))


def _fit(root, callbacks, logger=False):
    L.seed_everything(0, verbose=False)
    model = TinyModule(dropout=0.3)
    probe = Probe()
    fit = trainer(root, [*callbacks, probe], max_epochs=2, logger=logger)
    fit.fit(model, loader(n=40, batch_size=8), loader(n=16, batch_size=8, shuffle=True))
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    return model, fit, probe, rng


@pytest.mark.parametrize(("mode", "data"), [("eval", "train"), ("train", "val")])
def test_training_is_bit_identical_with_and_without_the_callback(tmp_path, mode, data):
    """Dropout + BatchNorm, shuffled train and val loaders (global RNG), SGD with momentum."""
    plain, plain_trainer, plain_probe, plain_rng = _fit(tmp_path / "plain", [])
    hessian = lh.HessianCallback(
        every_n_epochs=1, every_n_steps=3, data=data, num_batches=2, mode=mode, blocks="module"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mode='train' with dropout warns about its fixed masks
        logger = TensorBoardLogger(tmp_path / "tb") if mode == "train" else False
        model, fit, probe, rng = _fit(tmp_path / "hessian", [hessian], logger=logger)
    assert [h["step"] for h in hessian.history if h["ok"]] == [3, 5, 6, 9, 10]
    assert model.seen == plain.seen  # the same batches in the same order
    for name, value in plain.state_dict().items():  # weights and BatchNorm buffers
        assert torch.equal(model.state_dict()[name], value), name
    for a, b in zip(
        plain_trainer.optimizers[0].state.values(), fit.optimizers[0].state.values(), strict=True
    ):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert probe.flags == plain_probe.flags
    for grads, plain_grads in zip(probe.grads, plain_probe.grads, strict=True):
        assert all(torch.equal(g, p) for g, p in zip(grads, plain_grads, strict=True))
    assert torch.equal(rng[0], plain_rng[0]) and rng[1] == plain_rng[1]
    assert np.array_equal(rng[2], plain_rng[2])


def _nan_in_epoch_1(module, batch):
    loss = cross_entropy_loss(module, batch)
    return loss * float("nan") if module.current_epoch == 1 else loss


def test_a_failed_evaluation_warns_once_and_training_goes_on(tmp_path):
    hessian = lh.HessianCallback(loss_fn=_nan_in_epoch_1, num_batches=2, analyze_kwargs=FAST)
    fit = trainer(tmp_path, [hessian], max_epochs=3, logger=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(TinyModule(), loader(n=32))
    failures = [
        str(w.message) for w in caught if "HessianCallback" in str(w.message) and "failed" in str(w.message)
    ]
    assert len(failures) == 1
    assert "epoch 1" in failures[0] and "on_error='raise'" in failures[0]
    assert [(h["epoch"], h["ok"]) for h in hessian.history] == [(0, True), (1, False), (2, True)]
    assert "NonFiniteHessianError" in hessian.history[1]["error"]
    assert fit.current_epoch == 3 and fit.global_step == 12


def test_on_error_raise_stops_training(tmp_path):
    hessian = lh.HessianCallback(
        loss_fn=_nan_in_epoch_1, num_batches=2, on_error="raise", analyze_kwargs=FAST
    )
    fit = trainer(tmp_path, [hessian], max_epochs=3, logger=False)
    with pytest.raises(lh.NonFiniteHessianError):
        fit.fit(TinyModule(), loader(n=32))
    assert fit.current_epoch == 1


def test_out_of_memory_is_a_skipped_evaluation(tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(lh.HessianOperator, "block_products", out_of_memory)
    hessian = lh.HessianCallback(num_batches=1)
    with pytest.warns(UserWarning, match="OutOfMemoryError"):
        trainer(tmp_path, [hessian], max_epochs=1, logger=False).fit(TinyModule(), loader(n=16))
    assert [h["ok"] for h in hessian.history] == [False]


def test_manual_optimization_needs_loss_fn(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"manual optimization.*loss_fn="):
        trainer(tmp_path, [lh.HessianCallback()], max_epochs=1, logger=False).fit(
            TinyModule(manual=True), loader(n=16)
        )
    hessian = lh.HessianCallback(loss_fn=cross_entropy_loss, num_batches=1, analyze_kwargs=FAST)
    trainer(tmp_path, [hessian], max_epochs=1, logger=False).fit(TinyModule(manual=True), loader(n=16))
    assert hessian.history[-1]["ok"]


def test_bf16_mixed_training_gets_float32_curvature(tmp_path):
    torch.manual_seed(0)
    hessian = lh.HessianCallback(num_batches=2, analyze_kwargs=FAST)
    snapshot = Snapshot(hessian)
    fit = trainer(tmp_path, [hessian, snapshot], max_epochs=1, logger=False, precision="bf16-mixed")
    fit.fit(TinyModule(), loader(n=32))
    (step, state), *_ = snapshot.states.items()
    model = TinyModule()
    model.load_state_dict(state)
    expected = lh.analyze(model, None, hessian.batches, seed=0, **FAST).scalars()
    assert hessian.last_report.blocks["model"].spectrum.dtype == torch.float64
    for tag, value in expected.items():
        assert hessian.history[-1][tag] == pytest.approx(value, rel=1e-5, abs=1e-7), tag
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what autocast would have done to the loss
        assert model(hessian.batches[0][0]).dtype == torch.bfloat16


class EvaluateAfterValidation(lh.HessianCallback):
    """Evaluates from a validation hook, which Lightning runs under inference_mode (or no_grad)."""

    def __init__(self, **settings) -> None:
        super().__init__(**settings)
        self.contexts: list[tuple[bool, bool]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        self.contexts.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        self.on_train_end(trainer, pl_module)  # the end-of-training evaluation, from here


def test_evaluation_runs_with_grad_from_no_grad_and_inference_mode(tmp_path):
    torch.manual_seed(0)
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
    settings = {"data": data, "analyze_kwargs": FAST, "figures": False}
    hessian = lh.HessianCallback(evaluate_at_end=False, **settings)
    model = TinyModule()
    trainer(tmp_path, [hessian], max_epochs=1, logger=False).fit(model, loader(n=32))
    (first,) = hessian.history
    later = {}
    for inference_mode in (False, True):  # Lightning validates under no_grad, or inference_mode
        caller = EvaluateAfterValidation(**settings)
        validation = trainer(tmp_path, [caller], logger=False, inference_mode=inference_mode)
        validation.validate(model, loader(n=16, shuffle=False), verbose=False)
        assert caller.contexts == [(False, inference_mode)]
        (later[inference_mode],) = caller.history
    no_grad, inference = later[False], later[True]
    assert no_grad["ok"] and inference["ok"], later
    assert no_grad["hessian/model/eigenvalue_1"] == first["hessian/model/eigenvalue_1"]
    assert inference["hessian/model/trace"] == first["hessian/model/trace"]
