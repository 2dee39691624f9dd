"""What HessianCallback logs, where, and at which steps; read back from the event files and from
TensorBoard's own HTTP data API.
"""

from __future__ import annotations

import json
import math
import time
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader

import lightning_hessian as lh
from lightning_hessian.analysis import analyze_with
from tests.helpers import (
    FAST,
    Snapshot,
    TinyModule,
    cross_entropy_loss,
    dataset,
    events,
    loader,
    scalar_series,
    trainer,
)

BLOCKS = ("net.0", "net.1", "net.4")  # 30 and 21 parameters: iterative (dense_limit=20); 12: dense
# No warm start: each logged evaluation must equal a fresh analysis of the same state and batches.
SETTINGS = {
    "blocks": "module",
    "dense_limit": 20,
    "num_batches": 2,
    "analyze_kwargs": FAST,
    "warm_start": False,
}
EXPECTED_STEPS = [5, 8, 10, 12]  # every_n_steps=5: 5, 10; every_n_epochs=2: epoch 1 = step 8; end: 12
# Logged where Lightning logs that batch's or epoch's own metrics: one optimizer, so global step - 1.
LOGGED_STEPS = [step - 1 for step in EXPECTED_STEPS]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """3 epochs of 4 steps, TensorBoard + CSV loggers, evaluations at steps 5, 8, 10 and 12."""
    root = tmp_path_factory.mktemp("logging")
    torch.manual_seed(0)
    model = TinyModule()
    hessian = lh.HessianCallback(every_n_epochs=2, every_n_steps=5, save_reports=True, **SETTINGS)
    snapshot = Snapshot(hessian)
    loggers = [TensorBoardLogger(root / "tb"), CSVLogger(root / "csv")]
    fit = trainer(root, [hessian, snapshot], max_epochs=3, logger=loggers)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(model, loader(n=32))
    return {
        "root": root,
        "trainer": fit,
        "model": model,
        "hessian": hessian,
        "snapshot": snapshot,
        "warnings": [str(w.message) for w in caught],
        "log_dir": Path(loggers[0].log_dir),
        "csv_dir": Path(loggers[1].log_dir),
    }


def test_every_tag_is_logged_at_exactly_the_scheduled_steps(run):
    accumulator = events(run["log_dir"])
    tags = accumulator.Tags()
    for block in BLOCKS:
        for name in ("trace", "eigenvalue_1", "eigenvalue_2", "eigenvalue_3", "eigenvalue_min"):
            assert sorted(scalar_series(accumulator, f"hessian/{block}/{name}")) == LOGGED_STEPS
        assert [e.step for e in accumulator.Histograms(f"hessian/{block}/spectrum")] == LOGGED_STEPS
        assert [e.step for e in accumulator.Images(f"hessian/{block}/density")] == LOGGED_STEPS
    for name in ("loss", "num_matvecs", "seconds"):
        assert sorted(scalar_series(accumulator, f"hessian/{name}")) == LOGGED_STEPS
    assert "train_loss" in tags["scalars"]  # the module's own logging is untouched
    assert [(h["reason"], h["step"]) for h in run["hessian"].history] == [
        ("step", 5),
        ("epoch", 8),
        ("step", 10),
        ("end", 12),
    ]


def test_logged_values_equal_analyze_on_the_same_model_state_and_batches(run):
    accumulator = events(run["log_dir"])
    hessian = run["hessian"]
    assert sorted(run["snapshot"].states) == EXPECTED_STEPS
    # The cached batches are the first two training batches, in the order training saw them.
    assert [float(b[0].sum()) for b in hessian.batches] == run["model"].seen[:2]
    for step, state in run["snapshot"].states.items():
        model = TinyModule()
        model.load_state_dict(state)
        report = analyze_with(model, None, hessian.batches, hessian.settings)
        expected = report.scalars()
        expected["hessian/loss"] = report.loss
        for tag, value in expected.items():
            logged = scalar_series(accumulator, tag)[step - 1]  # TensorBoard stores float32
            assert logged == pytest.approx(value, rel=1e-5, abs=1e-6), (tag, step)
        for block in BLOCKS:
            spectra = accumulator.Histograms(f"hessian/{block}/spectrum")
            histogram = next(e for e in spectra if e.step == step - 1)
            assert histogram.histogram_value.num == pytest.approx(report.blocks[block].size)
    # Saved reports are the very reports that were logged.
    for entry in hessian.history:
        saved = lh.HessianReport.load(
            run["log_dir"] / "hessian_reports" / f"epoch={entry['epoch']}-step={entry['step']}.pt"
        )
        for tag, value in saved.scalars().items():
            assert entry[tag] == value
    final = run["trainer"].callback_metrics
    assert final["hessian/net.4/eigenvalue_1"].item() == hessian.history[-1]["hessian/net.4/eigenvalue_1"]


def test_exact_and_slq_histograms_hold_the_spectrum(run):
    accumulator = events(run["log_dir"])
    report = run["hessian"].last_report
    exact = accumulator.Histograms("hessian/net.1/spectrum")[-1].histogram_value
    spectrum = report.blocks["net.1"].spectrum
    assert report.blocks["net.1"].method == "dense"
    assert exact.num == spectrum.numel()
    assert exact.min == pytest.approx(float(spectrum.min()), rel=1e-6, abs=1e-9)
    assert exact.max == pytest.approx(float(spectrum.max()), rel=1e-6, abs=1e-9)
    slq = accumulator.Histograms("hessian/net.0/spectrum")[-1].histogram_value
    assert report.blocks["net.0"].method == "iterative"
    assert sum(slq.bucket) == pytest.approx(30.0)
    assert slq.sum == pytest.approx(30 * report.blocks["net.0"].density.mean, rel=1e-6)


def test_csv_logger_gets_the_scalars_and_no_warning_about_media(run):
    # The CSVLogger now gets the figures and histograms as files (tests/test_report_files.py).
    assert not [w for w in run["warnings"] if "cannot store histograms" in w], run["warnings"]
    rows = (run["csv_dir"] / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    column, step_column = header.index("hessian/net.4/eigenvalue_1"), header.index("step")
    steps = sorted(int(r.split(",")[step_column]) for r in rows[1:] if r.split(",")[column])
    assert steps == LOGGED_STEPS


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_tensorboard_http_api_serves_the_scalars_and_the_histogram(run):
    from tensorboard import program

    board = program.TensorBoard()
    board.configure(
        argv=[None, "--logdir", str(run["root"] / "tb"), "--host", "127.0.0.1", "--port", "0"]
        + ["--load_fast=false", "--reload_interval", "1"]
    )
    url = board.launch().rstrip("/")
    run_name = run["log_dir"].relative_to(run["root"] / "tb").as_posix()
    query = urllib.parse.urlencode({"run": run_name, "tag": "hessian/net.4/eigenvalue_1"})
    deadline = time.monotonic() + 60
    while True:
        try:
            scalars = _get(f"{url}/data/plugin/scalars/scalars?{query}")
            if len(scalars) == len(LOGGED_STEPS):
                break
        except Exception:  # noqa: BLE001 - not loaded yet
            pass
        assert time.monotonic() < deadline, "TensorBoard did not serve the scalars within 60 s"
        time.sleep(0.5)
    assert [step for _, step, _ in scalars] == LOGGED_STEPS
    logged = {h["step"] - 1: h["hessian/net.4/eigenvalue_1"] for h in run["hessian"].history}
    for _, step, value in scalars:
        assert value == pytest.approx(logged[step], rel=1e-6)
    query = urllib.parse.urlencode({"run": run_name, "tag": "hessian/net.1/spectrum"})
    histograms = _get(f"{url}/data/plugin/histograms/histograms?{query}")
    assert [step for _, step, _ in histograms] == LOGGED_STEPS
    buckets = histograms[-1][2]
    assert sum(count for _, _, count in buckets) == pytest.approx(12.0)
    images = _get(f"{url}/data/plugin/images/tags")
    assert "hessian/net.1/density" in images[run_name]


def test_no_logger_warns_once_and_feeds_checkpoint_and_early_stopping(tmp_path):
    torch.manual_seed(0)
    hessian = lh.HessianCallback(num_batches=2, loss_fn=cross_entropy_loss, analyze_kwargs=FAST)
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt",
        monitor="hessian/model/eigenvalue_1",
        mode="min",
        save_on_train_epoch_end=True,
    )
    stopping = EarlyStopping(
        monitor="hessian/model/eigenvalue_1", mode="min", patience=5, check_on_train_epoch_end=True
    )
    fit = trainer(
        tmp_path, [hessian, checkpoint, stopping], max_epochs=3, logger=False, enable_checkpointing=True
    )
    with pytest.warns(UserWarning, match="no logger") as caught:
        fit.fit(TinyModule(), loader(n=32), loader(n=16, shuffle=False))
    assert sum("no logger" in str(w.message) for w in caught) == 1
    assert [h["epoch"] for h in hessian.history] == [0, 1, 2]  # end of training: epoch 2 just evaluated
    values = [h["hessian/model/eigenvalue_1"] for h in hessian.history]
    assert checkpoint.best_model_score.item() == pytest.approx(min(values))
    assert Path(checkpoint.best_model_path).exists()
    assert fit.callback_metrics["hessian/model/eigenvalue_1"].item() == values[-1]
    assert math.isfinite(fit.callback_metrics["hessian/model/trace"].item())


class DictBatches(TinyModule):
    """Takes dict batches: on_after_batch_transfer turns them into (x, y) tuples."""

    def __init__(self) -> None:
        super().__init__()
        self.transferred = 0

    def on_after_batch_transfer(self, batch, dataloader_idx):
        self.transferred += 1
        return (batch["x"], batch["y"]) if isinstance(batch, dict) else batch


def test_user_batches_go_through_the_transfer_hooks_and_val_data_is_taken_from_the_start(tmp_path):
    torch.manual_seed(0)
    fixed = [{"x": torch.randn(8, 4), "y": torch.randint(0, 3, (8,))} for _ in range(3)]
    given = lh.HessianCallback(data=fixed, num_batches=2, analyze_kwargs=FAST, figures=False)
    val = lh.HessianCallback(data="val", num_batches=2, blocks="module", analyze_kwargs=FAST, figures=False)
    model = DictBatches()
    samples = [{"x": x, "y": y} for x, y in dataset(16)]
    train = DataLoader(samples, batch_size=8, shuffle=True)
    val_loader = loader(n=24, batch_size=8, shuffle=False, seed=3)
    trainer(tmp_path, [given, val], max_epochs=1, logger=False).fit(model, train, val_loader)
    assert len(given.batches) == 2 and all(isinstance(b, tuple) for b in given.batches)
    for (x, y), raw in zip(given.batches, fixed, strict=False):
        assert torch.equal(x, raw["x"]) and torch.equal(y, raw["y"])
    expected_val = [b for _, b in zip(range(2), val_loader, strict=False)]
    assert [torch.equal(a[0], b[0]) for a, b in zip(val.batches, expected_val, strict=True)] == [True, True]
    assert given.history[-1]["ok"] and val.history[-1]["ok"]
    assert given.batches_fingerprint is not None and given.batches_fingerprint != val.batches_fingerprint


def test_steps_count_optimizer_steps_and_early_evaluations_use_the_batches_so_far(tmp_path):
    hessian = lh.HessianCallback(every_n_steps=1, num_batches=3, analyze_kwargs=FAST, figures=False)
    fit = trainer(tmp_path, [hessian], max_epochs=1, logger=False, accumulate_grad_batches=2)
    with pytest.warns(UserWarning, match="on the 2 training batch"):
        fit.fit(TinyModule(), loader(n=32))
    # 4 batches, 2 per optimizer step: steps 1 and 2; the end (step 2) was just evaluated.
    assert [(h["step"], h["num_batches"]) for h in hessian.history] == [(1, 2), (2, 3)]
    assert len(hessian.batches) == 3
