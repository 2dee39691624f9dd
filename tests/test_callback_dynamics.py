"""The callback's training-dynamics values: every logged name, their values against the functional
API on the trained state, the landscape figure, the switches, bit-identical training, and a clear
warning for an optimizer whose edge of stability is not derived."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_hessian as lh
from tests.helpers import FAST, TinyModule, events, loader, trainer

DYNAMICS = ("stability", "gradient_alignment", "gradient_curvature", "batch_sharpness")


class AdamModule(TinyModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


class AdadeltaModule(TinyModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adadelta(self.parameters())


def _fit(tmp_path, module, **kwargs):
    torch.manual_seed(0)
    hessian = lh.HessianCallback(num_batches=2, top_k=2, analyze_kwargs=FAST, **kwargs)
    logger = TensorBoardLogger(tmp_path / "tb")
    fit = trainer(tmp_path, [hessian], max_epochs=2, logger=logger)
    fit.fit(module, loader(n=32))
    return hessian, fit, logger


def test_every_dynamics_name_is_logged_and_the_figure_reaches_tensorboard(tmp_path):
    hessian, fit, logger = _fit(tmp_path, TinyModule(dropout=0.0), landscape=True)
    first, second = hessian.history
    for name in DYNAMICS:
        assert f"hessian/model/{name}" in first and f"hessian/model/{name}" in second, name
    assert "hessian/model/eigenvector_overlap" not in first  # nothing to compare with yet
    assert 0.0 <= second["hessian/model/eigenvector_overlap"] <= 1.0
    assert "hessian/model/preconditioned_eigenvalue_1" not in first  # SGD: not adaptive
    # SGD with momentum 0.9 and lr 0.1: stability = lr * λ1 / (2 + 2β), read from the top eigenvalue.
    assert first["hessian/model/stability"] == pytest.approx(0.1 * first["hessian/model/eigenvalue_1"] / 3.8)
    accumulator = events(logger.log_dir)
    assert "hessian/model/landscape" in accumulator.Tags()["images"]
    for name in (*DYNAMICS, "eigenvector_overlap"):
        assert f"hessian/model/{name}" in accumulator.Tags()["scalars"], name
    block = hessian.last_report.blocks["model"]
    assert list(block.landscape.losses) == ["v1", "v2", "gradient"]
    assert block.eigenvalues.vectors is None  # kept for the overlap, not logged or saved


def test_logged_values_equal_the_functional_api_on_the_trained_state(tmp_path):
    module = AdamModule(dropout=0.0)
    hessian, fit, _ = _fit(tmp_path, module)
    last = hessian.history[-1]
    batches = hessian.batches
    op = lh.HessianOperator(module, None, batches, batch_size_fn=len_of_first)
    stability = lh.stability(op, fit.optimizers[0], tol=1e-8)
    assert stability.adaptive and stability.threshold == pytest.approx(38.0)
    assert last["hessian/model/preconditioned_eigenvalue_1"] == pytest.approx(stability.eigenvalue, rel=1e-2)
    assert last["hessian/model/stability"] == pytest.approx(stability.value, rel=1e-2)
    geometry = lh.gradient_geometry(op)
    assert last["hessian/model/gradient_curvature"] == pytest.approx(geometry.curvature, rel=1e-4)
    assert last["hessian/model/batch_sharpness"] == pytest.approx(geometry.batch_sharpness, rel=1e-4)


def len_of_first(batch) -> int:
    return len(batch[0])


def test_each_switch_turns_its_names_off(tmp_path):
    hessian, _, _ = _fit(
        tmp_path, TinyModule(), stability=False, gradient_geometry=False, eigenvector_overlap=False
    )
    for entry in hessian.history:
        assert not any(name in key for key in entry for name in (*DYNAMICS, "eigenvector_overlap"))
    assert hessian.last_report.blocks["model"].landscape is None


def test_an_unsupported_optimizer_warns_once_and_logs_the_rest(tmp_path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        hessian, _, _ = _fit(tmp_path, AdadeltaModule())
    messages = [str(w.message) for w in record if "no stability value" in str(w.message)]
    assert len(messages) == 1 and "Adadelta is not one of" in messages[0]
    assert "stability=False" in messages[0]
    for entry in hessian.history:
        assert "hessian/model/stability" not in entry and "hessian/model/gradient_curvature" in entry


def test_training_is_bit_identical_with_every_dynamics_quantity_on(tmp_path):
    def run(callbacks):
        torch.manual_seed(0)
        module = AdamModule(dropout=0.3)
        trainer(tmp_path, callbacks, max_epochs=2, logger=False).fit(module, loader(n=32))
        return module

    plain = run([])
    hessian = lh.HessianCallback(num_batches=2, landscape=True, every_n_steps=3, analyze_kwargs=FAST)
    watched = run([hessian])
    assert len(hessian.history) >= 3 and all(entry["ok"] for entry in hessian.history)
    assert "hessian/model/preconditioned_eigenvalue_1" in hessian.history[-1]
    for name, value in plain.state_dict().items():
        assert torch.equal(watched.state_dict()[name], value), name
    assert watched.seen == plain.seen
