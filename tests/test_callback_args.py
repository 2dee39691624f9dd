"""HessianCallback without a Trainer: argument validation, schedule, state, reporting helpers."""

from __future__ import annotations

import io
import math
import types

import numpy as np
import pytest
import torch

import lightning_hessian as lh
from lightning_hessian.callback import HessianCallback
from lightning_hessian.reporting import density_image, raw_histogram, scalar_metrics, supports_media
from lightning_hessian.results import BlockReport, EigenResult, HessianReport, SpectralDensity, TraceResult
from lightning_hessian.schedule import Schedule

BAD_ARGUMENTS = [
    ({"every_n_epochs": 0}, "every_n_epochs"),
    ({"every_n_epochs": 1.5}, "every_n_epochs"),
    ({"every_n_epochs": True}, "every_n_epochs"),
    ({"every_n_steps": -3}, "every_n_steps"),
    ({"epochs": [0, -1]}, "epochs"),
    ({"epochs": "0,1"}, "epochs"),
    ({"epochs": [1.0]}, "epochs"),
    ({"evaluate_at_end": "yes"}, "evaluate_at_end"),
    ({"data": "test"}, "data"),
    ({"data": torch.zeros(3)}, "data"),
    ({"data": 5}, "data"),
    ({"num_batches": 0}, "num_batches"),
    ({"num_batches": None}, "num_batches"),
    ({"params": 3}, "params"),
    ({"params": []}, "params"),
    ({"blocks": "layer"}, "blocks"),
    ({"blocks": {}}, "blocks"),
    ({"blocks": {"a": 1}}, "blocks"),
    ({"top_k": -1}, "top_k"),
    ({"min_eigenvalue": 1}, "min_eigenvalue"),
    ({"trace": None}, "trace"),
    ({"density": "no"}, "density"),
    ({"loss_fn": "cross_entropy"}, "loss_fn"),
    ({"mode": "training"}, "mode"),
    ({"dtype": torch.int64}, "dtype"),
    ({"dtype": "int32"}, "dtype"),
    ({"seed": -1}, "seed"),
    ({"method": "exact"}, "method"),
    ({"dense_limit": -1}, "dense_limit"),
    ({"analyze_kwargs": {"nope": 1}}, "analyze_kwargs"),
    ({"analyze_kwargs": {"top_k": 1}}, "top_k=..."),
    ({"analyze_kwargs": [1]}, "analyze_kwargs"),
    ({"on_error": "ignore"}, "on_error"),
    ({"histograms": 1}, "histograms"),
    ({"figures": None}, "figures"),
    ({"histogram_bins": 0}, "histogram_bins"),
    ({"save_reports": "yes"}, "save_reports"),
    ({"progress_bar": 0}, "progress_bar"),
]


@pytest.mark.parametrize(("kwargs", "named"), BAD_ARGUMENTS, ids=[str(k) for k, _ in BAD_ARGUMENTS])
def test_every_bad_argument_is_rejected_naming_it(kwargs, named):
    with pytest.raises(ValueError) as info:
        HessianCallback(**kwargs)
    message = str(info.value)
    assert named in message
    assert any(hint in message.lower() for hint in ("e.g.", "pass", "use", "must be", "accepts")), message


def test_good_arguments_are_kept():
    cb = HessianCallback(
        every_n_steps=10,
        data=[(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))],
        num_batches=None,
        params=["net.*"],
        blocks={"first": "net.0.*", "last": ["net.4.weight"]},
        dtype="float64",
        analyze_kwargs={"trace_matvecs": 9, "density_steps": 8},
        on_error="raise",
    )
    assert cb.dtype is torch.float64
    assert cb.schedule.every_n_epochs is None and cb.schedule.every_n_steps == 10
    assert cb.analyze_kwargs == {"trace_matvecs": 9, "density_steps": 8}
    assert lh.HessianCallback is HessianCallback and "HessianCallback" in lh.__all__


def test_schedule_epochs_are_one_based_like_check_val_every_n_epoch():
    assert [e for e in range(9) if Schedule.create(every_n_epochs=3).epoch_due(e)] == [2, 5, 8]
    assert [e for e in range(4) if Schedule.create().epoch_due(e)] == [0, 1, 2, 3]  # default: every epoch
    explicit = Schedule.create(epochs=[0, 4])
    assert [e for e in range(6) if explicit.epoch_due(e)] == [0, 4]
    assert explicit.every_n_epochs is None
    both = Schedule.create(every_n_epochs=2, epochs=[0])
    assert [e for e in range(6) if both.epoch_due(e)] == [0, 1, 3, 5]
    steps = Schedule.create(every_n_steps=5)
    assert steps.every_n_epochs is None
    assert [s for s in range(16) if steps.step_due(s)] == [5, 10, 15]
    assert not Schedule.create(epochs=[]).epoch_due(0)  # explicit empty list: only the end


def test_state_key_distinguishes_settings_and_is_stable():
    assert HessianCallback().state_key == HessianCallback().state_key
    keys = {
        HessianCallback().state_key,
        HessianCallback(every_n_epochs=2).state_key,
        HessianCallback(every_n_steps=2).state_key,
        HessianCallback(blocks="module").state_key,
        HessianCallback(top_k=5).state_key,
        HessianCallback(data="val").state_key,
        HessianCallback(mode="train").state_key,
        HessianCallback(seed=1).state_key,
        HessianCallback(num_batches=2).state_key,
        HessianCallback(params="net.*").state_key,
    }
    assert len(keys) == 10
    data = [torch.zeros(1)]
    assert HessianCallback(data=data).state_key == HessianCallback(data=list(data)).state_key
    assert "HessianCallback" in HessianCallback().state_key


def test_state_dict_round_trip():
    cb = HessianCallback()
    cb.history = [{"epoch": 0, "step": 3, "reason": "epoch", "ok": True, "hessian/loss": 1.0}]
    cb._last_step, cb._fingerprint = 3, "abc"
    restored = HessianCallback()
    restored.load_state_dict(cb.state_dict())
    assert restored.history == cb.history and restored.history is not cb.history
    assert restored._last_step == 3 and restored._loaded_fingerprint == "abc"


def test_progress_bar_follows_the_trainer_and_reports_products(capsys):
    cb = HessianCallback()
    quiet = types.SimpleNamespace(
        progress_bar_callback=None, is_global_zero=True, current_epoch=0, global_step=0
    )
    with cb._progress(quiet, 0) as update:
        assert update is None
    shown = types.SimpleNamespace(
        progress_bar_callback=object(), is_global_zero=True, current_epoch=2, global_step=7
    )
    with cb._progress(shown, 2) as update:
        update(10, 40)
        update(40, 40)
        assert (update.bar.n, update.bar.total) == (40, 40)
    assert "Hessian (epoch 2, step 7)" in capsys.readouterr().out
    with HessianCallback(progress_bar=False)._progress(shown, 2) as update:
        assert update is None
    not_zero = types.SimpleNamespace(**{**vars(shown), "is_global_zero": False})
    with cb._progress(not_zero, 2) as update:
        assert update is None


def _report() -> HessianReport:
    spectrum = torch.tensor([-0.5, 0.0, 0.25, 2.0], dtype=torch.float64)
    exact = BlockReport(
        name="a",
        size=4,
        method="dense",
        eigenvalues=EigenResult(
            spectrum.flip(0)[:2], None, torch.ones(2, dtype=torch.bool), torch.zeros(2), 0
        ),
        min_eigenvalue=EigenResult(spectrum[:1], None, torch.ones(1, dtype=torch.bool), torch.zeros(1), 0),
        trace=TraceResult(1.75, 0.0, 4, "exact"),
        spectrum=spectrum,
    )
    nodes = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    slq = BlockReport(
        name="b",
        size=100,
        method="iterative",
        eigenvalues=EigenResult(
            torch.tensor([3.0]), None, torch.ones(1, dtype=torch.bool), torch.zeros(1), 9
        ),
        density=SpectralDensity(nodes, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), 8, 2),
    )
    return HessianReport(blocks={"a": exact, "b": slq}, loss=0.7, num_samples=8, num_matvecs=13, seconds=0.5)


def test_scalar_metrics_follow_the_contract():
    metrics = scalar_metrics(_report())
    assert metrics == {
        "hessian/a/trace": 1.75,
        "hessian/a/eigenvalue_1": 2.0,
        "hessian/a/eigenvalue_2": 0.25,
        "hessian/a/eigenvalue_min": -0.5,
        "hessian/b/eigenvalue_1": 3.0,
        "hessian/loss": 0.7,
        "hessian/num_matvecs": 13.0,
        "hessian/seconds": 0.5,
    }


def test_raw_histogram_counts_eigenvalues_and_keeps_moments():
    block = _report().blocks["b"]
    raw = raw_histogram(block.density, block.size, bins=6)
    assert len(raw["bucket_limits"]) == len(raw["bucket_counts"]) == 6
    assert math.isclose(sum(raw["bucket_counts"]), 100.0)
    assert raw["num"] == 100.0 and raw["min"] == 0.0 and raw["max"] == 3.0
    assert math.isclose(raw["sum"], 100 * (0.3 + 0.6))
    assert math.isclose(raw["sum_squares"], 100 * (0.3 + 1.8))
    assert raw["bucket_counts"][0] == pytest.approx(50.0) and raw["bucket_counts"][-1] == pytest.approx(20.0)


def test_density_image_renders_an_rgb_plot_without_pyplot_state():
    import matplotlib

    for block in _report().blocks.values():
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
    from lightning_hessian.reporting import save_report

    path = save_report(_report(), tmp_path / "sub" / "r.pt")
    loaded = torch.load(path, weights_only=False)
    assert loaded.scalars() == _report().scalars()
    buffer = io.BytesIO()
    torch.save(loaded, buffer)
