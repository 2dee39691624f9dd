"""Resuming from a checkpoint keeps HessianCallback's schedule and history."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_hessian as lh
from tests.helpers import (
    FAST,
    TinyModule,
    events,
    loader,
    scalar_series,
    trainer,
)


def _run(root, version, max_epochs, ckpt_path=None, **settings):
    hessian = lh.HessianCallback(num_batches=2, analyze_kwargs=FAST, figures=False, **settings)
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_on_train_epoch_end=True)
    logger = TensorBoardLogger(root, name="tb", version=version)
    fit = trainer(
        root, [hessian, checkpoint], max_epochs=max_epochs, logger=logger, enable_checkpointing=True
    )
    torch.manual_seed(version)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(TinyModule(), loader(n=32), ckpt_path=ckpt_path)
    return hessian, fit, [str(w.message) for w in caught], logger.log_dir


def test_resume_keeps_the_schedule_and_history(tmp_path):
    first, _, _, _ = _run(tmp_path, 0, max_epochs=2)
    assert [(h["epoch"], h["step"]) for h in first.history] == [(0, 4), (1, 8)]
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["callbacks"][first.state_key]["history"] == first.history
    assert saved["callbacks"][first.state_key]["fingerprint"] == first.batches_fingerprint

    second, _, caught, log_dir = _run(tmp_path, 1, max_epochs=4, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert [(h["epoch"], h["step"]) for h in second.history] == [(0, 4), (1, 8), (2, 12), (3, 16)]
    assert second.history[:2] == first.history
    # Only the new epochs were evaluated and logged by the resumed run (at the step of each epoch's own
    # metrics, the step of its last batch: 11 and 15).
    assert sorted(scalar_series(events(log_dir), "hessian/model/eigenvalue_1")) == [11, 15]
    # Its batches are the first ones after the resume (other samples): it says so.
    assert second.batches_fingerprint != first.batches_fingerprint
    assert sum("differ from those of the checkpointed run" in w for w in caught) == 1

    third, fit, _, log_dir = _run(tmp_path, 2, max_epochs=4, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert third.history == second.history  # nothing left to do: no second look at the final state
    assert fit.global_step == 16
    assert not scalar_series_or_empty(log_dir)


def scalar_series_or_empty(log_dir):
    accumulator = events(log_dir)
    tag = "hessian/model/eigenvalue_1"
    return scalar_series(accumulator, tag) if tag in accumulator.Tags()["scalars"] else {}


def test_resume_with_every_n_epochs_and_fixed_batches(tmp_path):
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
    first, _, _, _ = _run(tmp_path, 0, max_epochs=3, every_n_epochs=2, data=data)
    # Epoch index 1 (the 2nd), then the end of training (epoch 2, not scheduled).
    assert [(h["epoch"], h["reason"]) for h in first.history] == [(1, "epoch"), (2, "end")]
    second, _, caught, _ = _run(
        tmp_path, 1, max_epochs=5, ckpt_path=tmp_path / "ckpt" / "last.ckpt", every_n_epochs=2, data=data
    )
    # The end-of-training evaluation comes after the last checkpoint, so that one holds only (1, "epoch").
    assert [(h["epoch"], h["reason"]) for h in second.history] == [(1, "epoch"), (3, "epoch"), (4, "end")]
    assert second.batches_fingerprint == first.batches_fingerprint
    assert not any("differ from those" in w for w in caught)


def test_different_settings_do_not_share_state(tmp_path):
    first, _, _, _ = _run(tmp_path, 0, max_epochs=1)
    other = lh.HessianCallback(num_batches=2, top_k=2)
    assert other.state_key != first.state_key
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert other.state_key not in saved["callbacks"]


@pytest.mark.parametrize("every_n_steps", [3])
def test_resume_mid_schedule_of_steps(tmp_path, every_n_steps):
    first, _, _, _ = _run(tmp_path, 0, max_epochs=1, every_n_steps=every_n_steps, evaluate_at_end=False)
    assert [h["step"] for h in first.history] == [3]
    second, _, _, _ = _run(
        tmp_path,
        1,
        max_epochs=2,
        ckpt_path=tmp_path / "ckpt" / "last.ckpt",
        every_n_steps=every_n_steps,
        evaluate_at_end=False,
    )
    assert [h["step"] for h in second.history] == [3, 6]
