"""HessianCallback refuses setup mistakes before training (at construction or when `fit` starts), with
the fix, instead of one warning per epoch and nothing logged.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader

import lightning_hessian as lh
from lightning_hessian.callback_checks import check_loss_fn, compute_dtype, warn_unreachable_schedule
from lightning_hessian.evaluation_data import LightningBatchSize
from lightning_hessian.schedule import Schedule
from tests.helpers import FAST, TinyModule, cross_entropy_loss, dataset, loader, trainer


def _fit_fails(root, hessian, module=None, match="", **settings):
    module = module or TinyModule()
    fit = trainer(root, [hessian], max_epochs=2, logger=False, **settings)
    with pytest.raises(MisconfigurationException, match=match):
        fit.fit(module, loader(n=16))
    assert fit.global_step == 0 and module.seen == []  # not one training step


# --------------------------------------------------------------------------- at fit start


def test_params_that_match_no_parameter_stop_fit_before_training(tmp_path):
    _fit_fails(
        tmp_path, lh.HessianCallback(params="encoder.*"), match=r"params='encoder\.\*'.*net\.0\.weight"
    )


def test_a_block_that_matches_no_parameter_stops_fit_before_training(tmp_path):
    hessian = lh.HessianCallback(blocks={"first": "net.0.*", "head": "head.*"})
    _fit_fails(tmp_path, hessian, match=r"blocks\['head'\].*matches no selected parameter")


class LazyModule(TinyModule):
    """Creates its layers in `configure_model` (as for large models): none exist at construction."""

    def __init__(self) -> None:
        super().__init__()
        del self.net

    def configure_model(self) -> None:
        if not hasattr(self, "net"):
            self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def test_patterns_are_checked_on_the_parameters_configure_model_creates(tmp_path):
    hessian = lh.HessianCallback(params="net.2.*", num_batches=1, analyze_kwargs=FAST, figures=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [hessian], max_epochs=1, logger=False).fit(LazyModule(), loader(n=16))
    assert hessian.history[-1]["ok"] and hessian.last_report.blocks["model"].size == 21
    _fit_fails(tmp_path, lh.HessianCallback(params="net.9.*"), module=LazyModule(), match="net.9")


def test_data_val_without_a_validation_dataloader_stops_fit_before_training(tmp_path):
    _fit_fails(tmp_path, lh.HessianCallback(data="val"), match=r"data='val'.*val_dataloader")


def test_data_val_with_validation_data_passes_the_check(tmp_path):
    hessian = lh.HessianCallback(data="val", num_batches=1, analyze_kwargs=FAST, figures=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [hessian], max_epochs=1, logger=False).fit(
            TinyModule(), loader(n=16), loader(n=16, shuffle=False)
        )
    assert hessian.history[-1]["ok"]


# --------------------------------------------------------------------------- at construction


@pytest.mark.parametrize("container", [tuple, list])
def test_one_batch_passed_as_data_is_refused_with_the_fix(container):
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match=r"one batch.*data=\[\(x, y\)\]"):
        lh.HessianCallback(data=container((x, y)))
    assert lh.HessianCallback(data=[(x, y)]).data == [(x, y)]
    # Batches that are tensors of one layout stay a list of batches; so does a tuple of pairs.
    lh.HessianCallback(data=[torch.randn(8, 4), torch.randn(8, 4)])
    lh.HessianCallback(data=((x, y), (x, y)))
    lh.HessianCallback(data=(torch.randn(8, 4),))


def test_a_loss_fn_that_cannot_take_module_and_batch_is_refused():
    with pytest.raises(TypeError, match=r"loss_fn\(module, batch\).*cannot be"):
        lh.HessianCallback(loss_fn=lambda batch: batch.sum())
    with pytest.raises(TypeError, match="loss_fn"):
        lh.HessianCallback(loss_fn=lambda module, batch, target: 0)
    with pytest.raises(TypeError, match="loss_fn"):
        lh.HessianCallback(loss_fn=len)  # len(obj, /)
    # Extra defaults, *args, and callables without a signature pass.
    lh.HessianCallback(loss_fn=lambda module, batch, scale=1.0: 0)
    lh.HessianCallback(loss_fn=lambda *args: 0)
    check_loss_fn(max)


# --------------------------------------------------------------------------- the schedule


@pytest.mark.parametrize(
    ("schedule", "max_epochs", "max_steps", "expected"),
    [
        ({"epochs": [5]}, 3, -1, r"epochs=\[5\] are never reached"),
        ({"epochs": [1, 3, 4]}, 3, -1, r"epochs=\[3, 4\] are never reached"),
        ({"every_n_epochs": 5, "evaluate_at_end": False}, 3, -1, "will evaluate nothing"),
        ({"every_n_steps": 50, "evaluate_at_end": False}, 1000, 20, "will evaluate nothing"),
        ({"epochs": [5], "evaluate_at_end": False}, 3, -1, "will evaluate nothing"),
    ],
)
def test_a_schedule_that_cannot_fire_warns(schedule, max_epochs, max_steps, expected):
    settings = {"every_n_epochs": None, "epochs": None, "every_n_steps": None, "evaluate_at_end": True}
    with pytest.warns(UserWarning, match=expected):
        warn_unreachable_schedule(Schedule.create(*{**settings, **schedule}.values()), max_epochs, max_steps)


@pytest.mark.parametrize(
    ("schedule", "max_epochs", "max_steps"),
    [
        ({"every_n_epochs": 5}, 3, -1),  # the end of training is still evaluated
        ({"every_n_epochs": 3, "evaluate_at_end": False}, 3, -1),
        ({"epochs": [2]}, 3, -1),
        ({"every_n_steps": 50, "evaluate_at_end": False}, 3, -1),  # steps per epoch are unknown
        ({"epochs": [5]}, -1, 100),
        ({"epochs": [5]}, None, -1),
    ],
)
def test_a_schedule_that_can_fire_does_not_warn(schedule, max_epochs, max_steps):
    settings = {"every_n_epochs": None, "epochs": None, "every_n_steps": None, "evaluate_at_end": True}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_unreachable_schedule(Schedule.create(*{**settings, **schedule}.values()), max_epochs, max_steps)


def test_unreachable_epochs_warn_when_fit_starts(tmp_path):
    hessian = lh.HessianCallback(epochs=[5], num_batches=1, analyze_kwargs=FAST, figures=False)
    fit = trainer(tmp_path, [hessian], max_epochs=1, logger=False)
    with pytest.warns(UserWarning, match=r"epochs=\[5\] are never reached.*max_epochs=1"):
        fit.fit(TinyModule(), loader(n=16))
    assert [h["reason"] for h in hessian.history] == ["end"]


# --------------------------------------------------------------------------- batch sizes


def test_batch_size_fn_is_an_argument_routed_into_the_settings():
    def size(batch):
        return len(batch[1])

    hessian = lh.HessianCallback(batch_size_fn=size)
    assert hessian.settings.batch_size_fn is size
    assert lh.HessianCallback(analyze_kwargs={"batch_size_fn": size}).settings.batch_size_fn is size
    with pytest.raises(ValueError, match="batch_size_fn.*twice"):
        lh.HessianCallback(batch_size_fn=size, analyze_kwargs={"batch_size_fn": size})
    with pytest.raises(TypeError, match="batch_size_fn"):
        lh.HessianCallback(batch_size_fn=3)


class TimeMajor(L.LightningModule):
    """A GRU fed time-major sequences: x is [time, batch, features], y is [batch]."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[-1])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _time_major_loader():
    data = dataset(n=12)
    x = data.tensors[0].reshape(12, 1, 4).expand(12, 7, 4)
    batches = [(x[i : i + 4].transpose(0, 1).contiguous(), data.tensors[1][i : i + 4]) for i in (0, 4, 8)]
    batches[-1] = (batches[-1][0][:, :2], batches[-1][1][:2])  # a smaller last batch
    return DataLoader(batches, batch_size=None)


def test_time_major_batches_warn_and_batch_size_fn_counts_the_samples(tmp_path):
    def run(**settings):
        hessian = lh.HessianCallback(num_batches=3, analyze_kwargs=FAST, figures=False, **settings)
        torch.manual_seed(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(tmp_path, [hessian], max_epochs=1, logger=False).fit(TimeMajor(), _time_major_loader())
        advice = [str(w.message) for w in caught if "disagree on their first dimension" in str(w.message)]
        return hessian, advice

    default, advice = run()
    assert len(advice) == 1 and "batch_size_fn=" in advice[0] and "[4, 7]" in advice[0]
    assert default.last_report.num_samples == 21  # the time dimension counted, as Lightning does
    given, advice = run(batch_size_fn=lambda batch: batch[1].shape[0])
    assert not advice and given.history[-1]["ok"]
    assert given.last_report.num_samples == 10


class Boxed:
    """A batch type holding its tensors out of sight of any batch-size rule."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y


class BoxedModule(TinyModule):
    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch.x), batch.y)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self.seen.append(float(batch.x.sum()))


def _boxed_loader():
    x, y = dataset(n=16).tensors
    return DataLoader([Boxed(x[i : i + 8], y[i : i + 8]) for i in (0, 8)], batch_size=None)


def test_a_batch_of_unknown_size_stops_fit_at_the_first_batch(tmp_path):
    module = BoxedModule()
    fit = trainer(tmp_path, [lh.HessianCallback(num_batches=1)], max_epochs=2, logger=False)
    with pytest.raises(MisconfigurationException, match=r"number of samples.*batch_size_fn="):
        fit.fit(module, _boxed_loader())
    assert fit.global_step == 0
    hessian = lh.HessianCallback(
        num_batches=1, batch_size_fn=lambda b: len(b.y), analyze_kwargs=FAST, figures=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [hessian], max_epochs=1, logger=False).fit(BoxedModule(), _boxed_loader())
    assert hessian.history[-1]["ok"] and hessian.last_report.num_samples == 8


def test_lightning_batch_size_follows_lightning_and_names_the_argument():
    size = LightningBatchSize()
    assert size({"x": torch.zeros(5, 2), "y": torch.zeros(5)}) == 5
    assert size(torch.zeros(3, 2)) == 3
    with pytest.raises(ValueError, match="batch_size_fn="):
        size(Boxed(torch.zeros(2), torch.zeros(2)))


# --------------------------------------------------------------------------- half precision


def test_bf16_true_parameters_are_analyzed_in_float32(tmp_path, caplog):
    """The callback's numbers are those of a float32 analysis of the bfloat16 weights: the loss to
    float32 rounding, and the converged top eigenvalues to 1e-5 relative (a converged Ritz value is
    within residual^2 / gap of an eigenvalue, below 1e-7 relative here, and float32 rounding adds about
    1e-7). Computed in bfloat16, the top eigenvalue is 1.5e-3 off."""
    torch.manual_seed(0)
    hessian = lh.HessianCallback(
        num_batches=2,
        method="iterative",  # Lanczos: QR factorizations that have no bfloat16 CPU kernel
        top_k=2,
        analyze_kwargs={"trace_matvecs": 9, "density_steps": 8},
        figures=False,
    )
    fit = trainer(tmp_path, [hessian], max_epochs=1, logger=False, precision="bf16-true")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        fit.fit(TinyModule(dropout=0.0), loader(n=32))
    assert next(fit.lightning_module.parameters()).dtype == torch.bfloat16
    (entry,) = hessian.history
    assert entry["ok"], entry
    scalars = {k: v for k, v in entry.items() if k.startswith("hessian/")}
    assert scalars and all(math.isfinite(v) for v in scalars.values())
    assert not [w for w in caught if "gives wrong products" in str(w.message)]
    said = [r.getMessage() for r in caplog.records if "half precision" in r.getMessage()]
    assert len(said) == 1 and "float32" in said[0]
    assert hessian.dtype is None  # the user's setting (and the checkpoint key) stay as given

    # The reference: the same weights and batches, converted to float32 (exactly), dense and exact.
    module = copy.deepcopy(fit.lightning_module).float()
    batches = [(x.float(), y) for x, y in hessian.batches]
    assert [x.dtype for x, _ in hessian.batches] == [torch.bfloat16] * 2  # as training saw them
    reference = torch.linalg.eigvalsh(lh.hessian(module, cross_entropy_loss, batches).double())
    sizes = [len(y) for _, y in batches]
    with torch.no_grad():
        loss = sum(
            float(cross_entropy_loss(module.eval(), b)) * n for b, n in zip(batches, sizes, strict=True)
        )
    assert entry["hessian/loss"] == pytest.approx(loss / sum(sizes), rel=1e-6)
    assert bool(hessian.last_report.blocks["model"].eigenvalues.converged.all())
    for i in (1, 2):
        assert entry[f"hessian/model/eigenvalue_{i}"] == pytest.approx(float(reference[-i]), rel=1e-5), i


def test_an_explicit_dtype_wins_over_the_half_precision_default():
    model = nn.Linear(2, 2).bfloat16()
    assert compute_dtype(model, torch.float64) is torch.float64
    assert compute_dtype(model, None) is torch.float32
    assert compute_dtype(nn.Linear(2, 2), None) is None


def test_runtime_failures_stay_warnings_after_the_setup_checks(tmp_path):
    def nan_loss(module, batch):
        return cross_entropy_loss(module, batch) * float("nan")

    hessian = lh.HessianCallback(loss_fn=nan_loss, num_batches=1, analyze_kwargs=FAST)
    with pytest.warns(UserWarning, match="failed"):
        trainer(tmp_path, [hessian], max_epochs=1, logger=False).fit(TinyModule(), loader(n=16))
    assert [h["ok"] for h in hessian.history] == [False]
