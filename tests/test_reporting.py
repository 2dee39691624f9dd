"""Logging a report (lightning_hessian.reporting): the logged names, histograms, density figures,
which loggers take media, saved reports, and that only rank zero writes.
"""

from __future__ import annotations

import io
import math
import types

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_hessian as lh
from lightning_hessian.reporting import (
    ReportLogger,
    density_image,
    raw_histogram,
    save_report,
    scalar_metrics,
    supports_media,
)
from lightning_hessian.results import BlockReport
from tests.helpers import sample_report


def test_scalar_metrics_follow_the_contract():
    metrics = scalar_metrics(sample_report())
    assert metrics == {
        "hessian/a/trace": 1.75,
        "hessian/a/trace_stderr": 0.0,
        "hessian/a/eigenvalue_1": 2.0,
        "hessian/a/eigenvalue_2": 0.25,
        "hessian/a/eigenvalue_min": -0.5,
        "hessian/a/eigenvalues_converged": 1.0,
        "hessian/b/eigenvalue_1": 3.0,
        "hessian/b/eigenvalues_converged": 1.0,
        "hessian/loss": 0.7,
        "hessian/num_matvecs": 13.0,
        "hessian/seconds": 0.5,
    }


def test_raw_histogram_counts_eigenvalues_and_keeps_moments():
    block = sample_report().blocks["b"]
    raw = raw_histogram(block.density, block.size, bins=6)
    assert len(raw["bucket_limits"]) == len(raw["bucket_counts"]) == 6
    assert math.isclose(sum(raw["bucket_counts"]), 100.0)
    assert raw["num"] == 100.0 and raw["min"] == 0.0 and raw["max"] == 3.0
    assert math.isclose(raw["sum"], 100 * (0.3 + 0.6))
    assert math.isclose(raw["sum_squares"], 100 * (0.3 + 1.8))
    assert raw["bucket_counts"][0] == pytest.approx(50.0) and raw["bucket_counts"][-1] == pytest.approx(20.0)


def test_density_image_renders_an_rgb_plot_without_pyplot_state():
    import matplotlib

    for block in sample_report().blocks.values():
        image = density_image(block, step=3)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0
    assert density_image(BlockReport(name="c", size=3, method="iterative")) is None
    pyplot = __import__("sys").modules.get("matplotlib.pyplot")
    assert pyplot is None or not pyplot.get_fignums()
    assert matplotlib.get_backend() is not None


def test_supports_media_tells_tensorboard_from_csv(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    assert supports_media(TensorBoardLogger(tmp_path))
    assert not supports_media(CSVLogger(tmp_path))


def test_report_round_trips_through_torch_save(tmp_path):
    path = save_report(sample_report(), tmp_path / "sub" / "r.pt")
    loaded = lh.HessianReport.load(path)
    assert loaded.scalars() == sample_report().scalars()
    assert torch.load(path, weights_only=True)["format"] == "lightning_hessian.HessianReport"  # plain data
    buffer = io.BytesIO()
    torch.save(loaded.to_dict(), buffer)


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    from lightning.pytorch.utilities import rank_zero_only

    report = lh.HessianReport(loss=0.5, num_matvecs=3, seconds=0.1)
    logger = TensorBoardLogger(tmp_path)
    fake = types.SimpleNamespace(callback_metrics={}, loggers=[logger])
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    ReportLogger().log(fake, report, step=4)
    save_report(report, tmp_path / "r.pt")
    assert fake.callback_metrics["hessian/loss"].item() == 0.5  # every rank sees the metrics
    assert not list(tmp_path.rglob("events.out.tfevents*")) and not (tmp_path / "r.pt").exists()
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    ReportLogger().log(fake, report, step=4)
    logger.experiment.flush()
    assert list(tmp_path.rglob("events.out.tfevents*"))
