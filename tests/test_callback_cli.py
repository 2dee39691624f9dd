"""HessianCallback configured from YAML through LightningCLI (examples/hessian_cli.yaml)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import lightning_hessian as lh
from tests.helpers import events

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytest.importorskip("jsonargparse")
pytest.importorskip("sklearn")


def _load_cli_module():
    spec = importlib.util.spec_from_file_location("digits_cli", EXAMPLES / "cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lightning_cli_runs_the_example_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # cli.py adds examples/ to it
    cli = _load_cli_module().main(
        [
            "fit",
            "--config",
            str(EXAMPLES / "hessian_cli.yaml"),
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--data.num_samples=160",
            "--data.batch_size=16",
        ]
    )
    (hessian,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, lh.HessianCallback)]
    assert hessian.blocks == "module" and hessian.top_k == 3 and hessian.num_batches == 2
    assert hessian.analyze_kwargs == {"trace_matvecs": 60, "density_steps": 32}
    assert hessian.data == "train" and hessian.schedule.every_n_epochs == 1
    # The cache holds the first num_batches=2 of the epoch's 3 training batches, evaluated once.
    assert len(hessian.batches) == 2
    assert [(h["epoch"], h["ok"]) for h in hessian.history] == [(0, True)]
    accumulator = events(cli.trainer.logger.log_dir)
    for block in ("conv1", "conv2", "fc"):
        assert f"hessian/{block}/eigenvalue_1" in accumulator.Tags()["scalars"]
        assert f"hessian/{block}/spectrum" in accumulator.Tags()["histograms"]
    saved = (Path(cli.trainer.log_dir) / "config.yaml").read_text()
    assert "lightning_hessian.HessianCallback" in saved
