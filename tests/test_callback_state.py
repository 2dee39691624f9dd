"""HessianCallback changes nothing the user can observe in the module (torchmetrics, counters), and each
`trainer.fit` with the same callback starts a new schedule unless it resumes a checkpoint.
"""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

import lightning_hessian as lh
from lightning_hessian.state import preserved_python_state
from tests.helpers import FAST, TinyModule, loader, trainer


class CountingModule(L.LightningModule):
    """A classifier whose training_step updates torchmetrics (tensor and list states) and counters."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=3)
        self.train_auroc = torchmetrics.AUROC(task="multiclass", num_classes=3, thresholds=None)
        self.samples = 0
        self.loss_sum = 0.0
        self.stepped = False
        self.net[0].calls = 0  # a counter on a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.net[0].calls += 1
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits.argmax(-1), y)
        self.train_auroc.update(logits.detach().softmax(-1), y)
        self.samples += len(x)
        self.loss_sum += float(loss)
        self.stepped = True
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class EpochMetrics(Callback):
    """Records, at the start of each epoch and at the end of fit, what the module and Lightning hold."""

    def __init__(self) -> None:
        self.records: list[dict[str, object]] = []

    def record(self, trainer, module) -> None:
        self.records.append(
            {
                "train_acc": trainer.callback_metrics.get("train_acc"),
                "auroc": module.train_auroc.compute() if module.train_auroc.update_count else None,
                "auroc_updates": module.train_auroc.update_count,
                "samples": module.samples,
                "loss_sum": module.loss_sum,
                "calls": module.net[0].calls,
            }
        )

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.record(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.record(trainer, pl_module)


def _fit_counting(root, callbacks):
    torch.manual_seed(0)
    module = CountingModule()
    recorder = EpochMetrics()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(root, [*callbacks, recorder], max_epochs=3, logger=False).fit(module, loader(n=48))
    return module, recorder.records


def test_metrics_and_counters_of_training_step_are_as_without_the_callback(tmp_path):
    plain, plain_records = _fit_counting(tmp_path / "plain", [])
    hessian = lh.HessianCallback(every_n_steps=4, num_batches=2, analyze_kwargs=FAST, figures=False)
    module, records = _fit_counting(tmp_path / "hessian", [hessian])
    assert [(h["step"], h["ok"]) for h in hessian.history] == [(s, True) for s in (4, 8, 12, 16, 18)]
    assert plain.samples == 3 * 48 and module.samples == plain.samples
    assert records == plain_records  # epoch metrics, list-state metric, counters, before every epoch
    assert torch.equal(module.train_acc.tp, plain.train_acc.tp)
    assert module.train_acc.update_count == plain.train_acc.update_count
    for name, value in plain.state_dict().items():
        assert torch.equal(module.state_dict()[name], value), name


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # training_step without a trainer
def test_preserved_python_state_restores_metrics_in_place_and_number_attributes():
    module = CountingModule()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    module.training_step((x, y), 0)
    acc, auroc = module.train_acc, module.train_auroc
    tp, preds = acc.tp, auroc.preds
    expected_tp, expected_preds = tp.clone(), list(preds)
    computed = acc.compute()
    with preserved_python_state(module):
        for _ in range(3):
            module.training_step((x, y), 1)
        acc.reset()  # rebinds the tensor state and clears the list state in place
        auroc.reset()
        module.extra = 5
        module.net[0].calls = "changed"
    assert acc.tp is tp and torch.equal(tp, expected_tp) and acc.update_count == 1
    assert auroc.preds is preds and len(preds) == len(expected_preds)
    assert all(a is b for a, b in zip(preds, expected_preds, strict=True))
    assert torch.equal(acc.compute(), computed)
    assert (module.samples, module.stepped, module.net[0].calls) == (8, True, 1)
    assert not hasattr(module, "extra")


def test_metric_states_made_in_inference_mode_are_restored():
    metric = torchmetrics.SumMetric()
    holder = nn.Module()
    holder.metric = metric
    with torch.inference_mode():
        metric.reset()
        metric.update(torch.tensor(2.0))
    state = metric.sum_value
    assert state.is_inference()
    with preserved_python_state(holder), torch.inference_mode():
        metric.update(torch.tensor(5.0))  # in place, into the inference tensor
    assert metric.sum_value is state and metric.compute().item() == 2.0


def _stage(root, hessian, seed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = trainer(root, [hessian], max_epochs=2, logger=False)
        torch.manual_seed(seed)
        fit.fit(TinyModule(), loader(n=16, seed=seed))
    return fit


def test_a_second_fit_starts_a_new_schedule_and_a_new_capture(tmp_path):
    hessian = lh.HessianCallback(num_batches=1, analyze_kwargs=FAST, figures=False)
    _stage(tmp_path, hessian, seed=0)
    first_fingerprint = hessian.batches_fingerprint
    assert [(h["epoch"], h["step"]) for h in hessian.history] == [(0, 2), (1, 4)]
    second = _stage(tmp_path, hessian, seed=1)  # a fine-tuning stage: a new Trainer, other data
    assert [(h["epoch"], h["step"], h["ok"]) for h in hessian.history] == [
        (0, 2, True),
        (1, 4, True),
        (0, 2, True),
        (1, 4, True),
    ]
    assert hessian.batches_fingerprint != first_fingerprint  # the second stage's own batches
    assert "hessian/model/eigenvalue_1" in second.callback_metrics


def test_resuming_a_checkpoint_with_the_same_callback_continues_its_run(tmp_path):
    hessian = lh.HessianCallback(num_batches=1, analyze_kwargs=FAST, figures=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_on_train_epoch_end=True)
    settings = {"logger": False, "enable_checkpointing": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        trainer(tmp_path, [hessian, checkpoint], max_epochs=2, **settings).fit(TinyModule(), loader(n=16))
        first = list(hessian.history)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_on_train_epoch_end=True)
        trainer(tmp_path, [hessian, checkpoint], max_epochs=3, **settings).fit(
            TinyModule(), loader(n=16), ckpt_path=tmp_path / "ckpt" / "last.ckpt"
        )
    assert [(h["epoch"], h["step"]) for h in hessian.history] == [(0, 2), (1, 4), (2, 6)]
    assert hessian.history[:2] == first


@pytest.mark.parametrize("loss_fn", [None, "given"])
def test_a_given_loss_fn_leaves_the_counters_alone_too(tmp_path, loss_fn):
    def loss(module, batch):
        return F.cross_entropy(module(batch[0]), batch[1])

    hessian = lh.HessianCallback(
        num_batches=1, analyze_kwargs=FAST, figures=False, loss_fn=None if loss_fn is None else loss
    )
    module, _ = _fit_counting(tmp_path, [hessian])
    assert module.net[0].calls == 18  # one forward per training step: 3 epochs of 6 steps


def test_a_checkpoint_loaded_by_validate_is_not_resumed_by_the_next_fit(tmp_path):
    hessian = lh.HessianCallback(every_n_epochs=2, num_batches=1, analyze_kwargs=FAST, figures=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_on_train_epoch_end=True)
    settings = {"logger": False, "enable_checkpointing": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        fit = trainer(tmp_path, [hessian, checkpoint], max_epochs=2, **settings)
        fit.fit(TinyModule(), loader(n=16))
        fit.validate(ckpt_path=tmp_path / "ckpt" / "last.ckpt", dataloaders=loader(n=16), verbose=False)
    assert [(h["epoch"], h["step"]) for h in hessian.history] == [(1, 4)]
    _stage(tmp_path, hessian, seed=1)  # a new stage, whose step 4 is a new model state
    assert [(h["epoch"], h["step"]) for h in hessian.history] == [(1, 4), (1, 4)]
