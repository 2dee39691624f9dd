"""Reports where people look: the uncertainty next to each value, ``epoch`` and Lightning's own step
in every logger, and histograms and figures in W&B (offline), MLflow (a local file store) and files
next to a CSVLogger's ``metrics.csv``. Every run writes to ``tmp_path`` only; nothing goes to a network.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import os
import struct
import time
import urllib.parse
import warnings
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger

import lightning_hessian
import lightning_hessian as lh
from lightning_hessian import lightning_internals
from lightning_hessian.lightning_internals import LightningAPIError, check_private_apis
from lightning_hessian.reporting import media_kind, media_path
from lightning_hessian.results import BlockReport, EigenResult, TraceResult
from tests.helpers import FAST, TinyModule, loader, trainer

# TinyModule's blocks: net.0 (30 parameters) and net.4 (21) iterative, net.1 (12, BatchNorm) dense.
BLOCKS = {"net.0": 30, "net.1": 12, "net.4": 21}
SETTINGS = {"blocks": "module", "dense_limit": 20, "num_batches": 2, "analyze_kwargs": FAST}


# --------------------------------------------------------------------------- the uncertainty scalars


def _eigen(values, flags):
    return EigenResult(torch.tensor(values), None, torch.tensor(flags), torch.zeros(len(values)), 5)


def test_trace_stderr_and_the_converged_fraction_are_logged_next_to_the_values():
    iterative = BlockReport(
        "conv",
        100,
        "iterative",
        eigenvalues=_eigen([5.0, 4.0, 3.0], [True, False, True]),
        min_eigenvalue=EigenResult(
            torch.tensor([-1.0]), None, torch.tensor([False]), torch.ones(1), 9, which="smallest"
        ),
        trace=TraceResult(12.0, 0.75, 99, "hutch++"),
    )
    dense = BlockReport(
        "fc",
        4,
        "dense",
        eigenvalues=_eigen([2.0], [False]),  # a dense block is exact whatever the flags say
        trace=TraceResult(3.0, 0.0, 4, "exact"),
    )
    only_min = BlockReport("bn", 6, "iterative", min_eigenvalue=_eigen([-0.5], [True]))
    report = lh.HessianReport(blocks={"conv": iterative, "fc": dense, "bn": only_min}, loss=0.5)
    scalars = report.scalars()
    assert scalars["hessian/conv/trace_stderr"] == 0.75
    assert scalars["hessian/conv/eigenvalues_converged"] == 0.5  # 2 of the top 3, not the minimum
    assert scalars["hessian/fc/trace_stderr"] == 0.0
    assert scalars["hessian/fc/eigenvalues_converged"] == 1.0
    assert scalars["hessian/bn/eigenvalues_converged"] == 1.0
    assert "hessian/bn/trace_stderr" not in scalars
    assert list(scalars)[:7] == [
        "hessian/conv/trace",
        "hessian/conv/trace_stderr",
        "hessian/conv/eigenvalue_1",
        "hessian/conv/eigenvalue_2",
        "hessian/conv/eigenvalue_3",
        "hessian/conv/eigenvalue_min",
        "hessian/conv/eigenvalues_converged",
    ]


def test_an_unknown_stderr_is_logged_as_nan_but_does_not_fail_the_evaluation():
    block = BlockReport("b", 5, "iterative", trace=TraceResult(2.0, float("nan"), 1, "hutchinson"))
    report = lh.HessianReport(blocks={"b": block}, loss=0.1)
    assert math.isnan(report.scalars()["hessian/b/trace_stderr"])
    assert report.non_finite() == []
    block.trace.value = float("inf")
    assert report.non_finite() == ["hessian/b/trace"]


def test_analyze_reports_a_real_stderr_and_convergence(tmp_path):
    torch.manual_seed(0)
    report = lh.analyze(
        TinyModule(), None, list(loader(n=16)), top_k=2, blocks="module", dense_limit=20, **FAST
    )
    scalars = report.scalars()
    assert scalars["hessian/net.1/trace_stderr"] == 0.0  # dense: exact
    assert scalars["hessian/net.1/eigenvalues_converged"] == 1.0
    assert scalars["hessian/net.0/trace_stderr"] >= 0.0
    flags = torch.cat(
        [report.blocks["net.0"].eigenvalues.converged, report.blocks["net.0"].min_eigenvalue.converged]
    )
    assert scalars["hessian/net.0/eigenvalues_converged"] == pytest.approx(float(flags.double().mean()))


# --------------------------------------------------------------------------- steps and epochs in metrics.csv


class EpochMean(TinyModule):
    """Also logs an epoch-level metric (``on_epoch=True``), the row the epoch's evaluation must share."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("mean_loss", loss, on_step=False, on_epoch=True)
        return loss


def _rows(log_dir: Path) -> list[dict[str, str]]:
    with open(log_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_csv_rows_carry_the_epoch_and_the_step_of_lightnings_own_metrics(tmp_path):
    torch.manual_seed(0)
    # every_n_steps=3 evaluates at global steps 3 and 6, every epoch at 4 and 8 (4 batches an epoch).
    hessian = lh.HessianCallback(every_n_steps=3, every_n_epochs=1, figures=False, **SETTINGS)
    logger = CSVLogger(tmp_path)
    fit = trainer(tmp_path, [hessian], max_epochs=2, logger=logger)
    fit.fit(EpochMean(), loader(n=32), loader(n=16, shuffle=False))
    assert [(h["reason"], h["epoch"], h["step"]) for h in hessian.history] == [
        ("step", 0, 3),
        ("epoch", 0, 4),
        ("step", 1, 6),
        ("epoch", 1, 8),
    ]
    rows = _rows(Path(logger.log_dir))
    hessian_rows = [r for r in rows if r["hessian/loss"]]
    assert len(hessian_rows) == 4
    for entry, row in zip(hessian.history, hessian_rows, strict=True):
        assert row["epoch"] == str(entry["epoch"])  # the epoch column, as Lightning fills it
        assert float(row["hessian/net.0/eigenvalue_1"]) == pytest.approx(entry["hessian/net.0/eigenvalue_1"])
        assert row["hessian/net.1/eigenvalues_converged"] == "1.0"
        if entry["reason"] == "epoch":
            # the same step as the epoch's on_epoch=True metric and its validation loss
            (epoch_row,) = [r for r in rows if r["mean_loss"] and r["epoch"] == row["epoch"]]
            (val_row,) = [r for r in rows if r["val_loss"] and r["epoch"] == row["epoch"]]
            assert row["step"] == epoch_row["step"] == val_row["step"]
        else:
            # the same step as the training loss of the batch whose optimizer step it evaluated
            (batch_row,) = [r for r in rows if r["train_loss"] and r["step"] == row["step"]]
            assert batch_row["epoch"] == row["epoch"]
    assert [int(r["step"]) for r in hessian_rows] == [2, 3, 5, 7]


def test_only_lightning_internals_touches_batches_that_stepped():
    package = Path(lightning_hessian.__file__).parent
    offenders = []
    for path in package.rglob("*.py"):
        if path.name == Path(lightning_internals.__file__).name:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "_batches_that_stepped":
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders


def test_a_lightning_without_batches_that_stepped_is_named(monkeypatch):
    check_private_apis()
    monkeypatch.setattr(lightning_internals, "_sets_batches_that_stepped", lambda: False)
    with pytest.raises(LightningAPIError, match="_batches_that_stepped"):
        check_private_apis()


# --------------------------------------------------------------------------- media per logger


def test_media_kind_and_paths(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    assert media_kind(TensorBoardLogger(tmp_path)) == "tensorboard"
    assert media_kind(CSVLogger(tmp_path)) == "files"
    assert media_path("hessian", "figures", "net.0", 7) == "hessian_figures/net.0/step=7.png"
    assert media_path("hessian", "spectra", "a/b c", 0) == "hessian_spectra/a_b_c/step=0.json"
    assert media_path("h", "figures", "..", 1) == "h_figures/__/step=1.png"  # never a parent folder


class ScalarsOnly(Logger):
    """A logger that takes scalars only."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int, dict]] = []

    @property
    def name(self) -> str:
        return "scalars-only"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.append((step, dict(metrics)))


def _fit(root: Path, logger, **settings) -> lh.HessianCallback:
    """One epoch of 4 steps; one evaluation, logged at step 3 (epoch 0).

    SLQ densities of 4 steps (4 probes x 4 steps < 21 parameters: more overflows the block Krylov basis
    of a small block in density.py, a separate bug).
    """
    torch.manual_seed(0)
    slq = {"analyze_kwargs": {**FAST, "density_steps": 4}}
    hessian = lh.HessianCallback(every_n_epochs=1, **{**SETTINGS, **slq, **settings})
    trainer(root, [hessian], max_epochs=1, logger=logger).fit(TinyModule(), loader(n=32))
    assert [(h["ok"], h["step"]) for h in hessian.history] == [(True, 4)]
    return hessian


def test_a_logger_without_media_gets_scalars_and_epoch_and_one_warning(tmp_path):
    logger = ScalarsOnly()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hessian = _fit(tmp_path, logger)
    messages = [str(w.message) for w in caught if "cannot store histograms" in str(w.message)]
    assert len(messages) == 1 and "ScalarsOnly" in messages[0]
    (step, metrics), *_ = [(s, m) for s, m in logger.logged if "hessian/loss" in m]
    assert step == 3 and metrics["epoch"] == 0
    assert "epoch" not in hessian.history[0] or hessian.history[0]["epoch"] == 0  # the history keeps its int


def _png(path: Path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0
    return image


def _check_histogram(data: dict, block: str, hessian: lh.HessianCallback) -> None:
    report = hessian.last_report.blocks[block]
    assert data["block"] == block and data["size"] == BLOCKS[block]
    assert sum(data["bucket_counts"]) == pytest.approx(BLOCKS[block])
    assert len(data["bucket_limits"]) == len(data["bucket_counts"]) == 64
    if report.method == "dense":
        assert data["exact"] is True
        assert data["eigenvalues"] == pytest.approx(report.spectrum.tolist())
    else:
        assert data["exact"] is False and "eigenvalues" not in data
        assert data["sum"] == pytest.approx(BLOCKS[block] * report.density.mean)


def test_csv_logger_gets_figures_as_png_and_histograms_as_json(tmp_path):
    logger = CSVLogger(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hessian = _fit(tmp_path, logger)
    assert not [w for w in caught if "cannot store histograms" in str(w.message)]
    folder = Path(logger.log_dir)
    for block in BLOCKS:
        _png(folder / "hessian_figures" / block / "step=3.png")
        data = json.loads((folder / "hessian_spectra" / block / "step=3.json").read_text())
        assert data["step"] == 3
        _check_histogram(data, block, hessian)
    assert sorted(p.name for p in (folder / "hessian_figures").iterdir()) == sorted(BLOCKS)


def test_histograms_and_figures_can_be_turned_off_for_files(tmp_path):
    logger = CSVLogger(tmp_path)
    _fit(tmp_path, logger, histograms=False)
    folder = Path(logger.log_dir)
    assert not (folder / "hessian_spectra").exists()
    assert (folder / "hessian_figures" / "net.0" / "step=3.png").exists()


# --------------------------------------------------------------------------- Weights & Biases, offline


def _wandb_records(path: Path):
    """The records of a ``.wandb`` file: a 7-byte header, then LevelDB-style log chunks in 32 KiB blocks
    (checksum 4, length 2, type 1: full, first, middle, last), each record a protobuf ``Record``."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if length == 0 and kind == 0:
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_holds_scalars_histograms_and_figures(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb)")
    from lightning.pytorch.loggers import WandbLogger

    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp_path),
        "WANDB_CACHE_DIR": str(tmp_path / "cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "config"),
        "WANDB_DATA_DIR": str(tmp_path / "data"),
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
    }.items():
        monkeypatch.setenv(name, value)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="lightning-hessian-test")
    try:
        hessian = _fit(tmp_path, logger)
    finally:
        wandb.finish()
    rows: list[dict] = []
    deadline = time.monotonic() + 30  # wandb's writer process may still be flushing under load
    while time.monotonic() < deadline:
        files = sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
        rows = []
        try:
            records = list(_wandb_records(files[0])) if len(files) == 1 else []
        except Exception:  # noqa: BLE001 - a file still being written parses partially
            records = []
        for record in records:
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item
                    }
                )
        if any("hessian/loss" in r for r in rows):
            break
        time.sleep(0.5)
    (row,) = [r for r in rows if "hessian/loss" in r]
    (run_file,) = files
    assert row["trainer/global_step"] == 3 and row["epoch"] == 0
    entry = hessian.history[0]
    assert row["hessian/net.0/eigenvalue_1"] == pytest.approx(entry["hessian/net.0/eigenvalue_1"])
    assert row["hessian/net.0/trace_stderr"] == pytest.approx(entry["hessian/net.0/trace_stderr"])
    for block, size in BLOCKS.items():
        assert row[f"hessian/{block}/spectrum/_type"] == "histogram"
        counts = row[f"hessian/{block}/spectrum/values"]
        assert (
            sum(counts) == pytest.approx(size)
            and len(row[f"hessian/{block}/spectrum/bins"]) == len(counts) + 1
        )
        assert row[f"hessian/{block}/density/_type"] == "image-file"
        _png(run_file.parent / "files" / row[f"hessian/{block}/density/path"])


# --------------------------------------------------------------------------- MLflow, local file store


def test_mlflow_file_store_holds_scalars_and_artifacts(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install mlflow-skinny)")
    from lightning.pytorch.loggers import MLFlowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 wants opting in to a file store
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    logger = MLFlowLogger(experiment_name="hessian", tracking_uri=(tmp_path / "mlruns").as_uri())
    hessian = _fit(tmp_path, logger)
    import mlflow

    if hasattr(mlflow, "flush_async_logging"):
        mlflow.flush_async_logging()
    client, run_id = logger.experiment, logger.run_id
    history = client.get_metric_history(run_id, "hessian/net.0/eigenvalue_1")
    assert [(m.step, m.value) for m in history] == [
        (3, pytest.approx(hessian.history[0]["hessian/net.0/eigenvalue_1"]))
    ]
    assert 3 in [m.step for m in client.get_metric_history(run_id, "hessian/net.1/eigenvalues_converged")]
    assert (3, 0.0) in [(m.step, m.value) for m in client.get_metric_history(run_id, "epoch")]
    root = Path(urllib.parse.urlparse(client.get_run(run_id).info.artifact_uri).path)
    for block in BLOCKS:
        _png(root / media_path("hessian", "figures", block, 3))
        _check_histogram(
            json.loads((root / media_path("hessian", "spectra", block, 3)).read_text()), block, hessian
        )
    listed = {a.path for a in client.list_artifacts(run_id, "hessian_figures/net.0")}
    assert listed == {"hessian_figures/net.0/step=3.png"}
    assert os.path.commonpath([root, tmp_path]) == str(tmp_path)  # written under tmp_path only
