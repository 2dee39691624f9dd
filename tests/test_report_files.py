"""Saved reports hold plain data: ``torch.load(path, weights_only=True)`` reads them, and
``HessianReport.load`` rebuilds the dataclasses without running code from the file. Old files (pickled
report dataclasses) still load; a file that needs any other class is refused unless the caller says
it trusts it, and then loads with a warning that names the risk.
"""

from __future__ import annotations

import pathlib
import pickle
import warnings

import numpy as np
import pytest
import torch

import lightning_hessian as lh
from lightning_hessian.reporting import save_report
from lightning_hessian.results import BlockReport, EigenResult, HessianReport, SpectralDensity, TraceResult
from tests.helpers import FAST, TinyModule, loader, sample_report, trainer

PLAIN = (dict, list, str, int, float, bool, type(None), torch.Tensor)


def _walk(value, where="report"):
    """Every (path, value) of nested plain data."""
    yield where, value
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str), (where, key)
            yield from _walk(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _walk(item, f"{where}[{i}]")


def assert_same_report(a: HessianReport, b: HessianReport) -> None:
    assert type(a) is type(b) is HessianReport
    assert list(a.blocks) == list(b.blocks)
    assert (a.loss, a.num_samples, a.num_matvecs, a.seconds) == (
        b.loss,
        b.num_samples,
        b.num_matvecs,
        b.seconds,
    )
    for name in a.blocks:
        x, y = a.blocks[name], b.blocks[name]
        for field in ("name", "size", "method", "num_matvecs", "seconds"):
            assert getattr(x, field) == getattr(y, field), (name, field)
        for field, cls in (
            ("eigenvalues", EigenResult),
            ("min_eigenvalue", EigenResult),
            ("trace", TraceResult),
            ("density", SpectralDensity),
        ):
            u, v = getattr(x, field), getattr(y, field)
            assert (u is None) == (v is None), (name, field)
            if u is None:
                continue
            assert type(u) is type(v) is cls
            for key, value in vars(u).items():
                other = getattr(v, key)
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, other) and value.dtype == other.dtype, (name, field, key)
                else:
                    assert value == other, (name, field, key)
        for field in ("stability", "gradient_geometry", "eigenvector_overlap"):
            assert getattr(x, field) == getattr(y, field), (name, field)
        assert (x.landscape is None) == (y.landscape is None), name
        if x.landscape is not None:
            assert x.landscape.curvatures == y.landscape.curvatures
            assert x.landscape.slopes == y.landscape.slopes and x.landscape.loss == y.landscape.loss
            for key in x.landscape.losses:
                assert torch.equal(x.landscape.losses[key], y.landscape.losses[key]), key
                assert torch.equal(x.landscape.offsets[key], y.landscape.offsets[key]), key
        if x.spectrum is None:
            assert y.spectrum is None
        else:
            assert torch.equal(x.spectrum, y.spectrum) and x.spectrum.dtype == y.spectrum.dtype


def test_a_saved_report_is_plain_data_that_loads_with_weights_only(tmp_path):
    report = sample_report()
    path = save_report(report, tmp_path / "sub" / "r.pt")
    data = torch.load(path, weights_only=True)  # the old format raised UnpicklingError here
    # Version 2 added the training-dynamics fields of BlockReport; version-1 files still load.
    assert (data["format"], data["version"]) == ("lightning_hessian.HessianReport", 2)
    for where, value in _walk(data):
        assert isinstance(value, PLAIN), (where, type(value))
    assert_same_report(HessianReport.load(path), report)
    assert_same_report(HessianReport.from_dict(report.to_dict()), report)
    assert_same_report(HessianReport.load(report.save(tmp_path / "again.pt")), report)


def test_to_dict_moves_tensors_to_the_cpu_and_keeps_nan_and_dtypes():
    report = sample_report()
    report.loss = float("nan")
    report.blocks["a"].eigenvalues.vectors = torch.eye(4, 2, dtype=torch.float32, requires_grad=True)
    data = report.to_dict()
    vectors = data["blocks"]["a"]["eigenvalues"]["vectors"]
    assert not vectors.requires_grad and vectors.device.type == "cpu" and vectors.dtype == torch.float32
    back = HessianReport.from_dict(data)
    assert back.loss != back.loss  # NaN survives
    assert back.blocks["b"].density.nodes.dtype == torch.float64
    assert back.blocks["b"].density.num_probes == 2 and back.blocks["a"].trace.method == "exact"


def _dynamics_report() -> HessianReport:
    report = sample_report()
    block = report.blocks["a"]
    block.stability = lh.StabilityResult(0.9, 1.8, 2.0, "SGD", False, True, 0)
    block.gradient_geometry = lh.GradientGeometry(0.5, 0.75, 1.25, 1.5, 4, 2.0)
    block.eigenvector_overlap = 0.875
    offsets = torch.linspace(-1, 1, 5, dtype=torch.float64)
    block.landscape = lh.Landscape(
        {"v1": offsets}, {"v1": offsets**2}, {"v1": 2.0}, {"v1": 0.0}, loss=0.0, num_forward=5
    )
    return report


def test_training_dynamics_fields_are_saved_as_plain_data(tmp_path):
    report = _dynamics_report()
    path = save_report(report, tmp_path / "r.pt")
    for where, value in _walk(torch.load(path, weights_only=True)):
        assert isinstance(value, PLAIN), (where, type(value))
    loaded = HessianReport.load(path)
    assert_same_report(loaded, report)
    assert loaded.blocks["a"].landscape.quadratic_model("v1").tolist() == (
        offsets := [1.0, 0.25, 0.0, 0.25, 1.0]
    )
    assert offsets == loaded.blocks["a"].landscape.losses["v1"].tolist()


def test_a_version_1_file_without_the_dynamics_fields_still_loads(tmp_path):
    data = sample_report().to_dict()
    data["version"] = 1
    for block in data["blocks"].values():
        for field in ("stability", "gradient_geometry", "eigenvector_overlap", "landscape"):
            del block[field]
    torch.save(data, tmp_path / "v1.pt")
    assert_same_report(HessianReport.load(tmp_path / "v1.pt"), sample_report())


def test_the_callback_saves_reports_that_load_with_weights_only(tmp_path):
    hessian = lh.HessianCallback(
        num_batches=2, save_reports=True, analyze_kwargs=FAST, histograms=False, figures=False
    )
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path)
    trainer(tmp_path, [hessian], max_epochs=2, logger=logger).fit(TinyModule(), loader(n=32))
    files = sorted((pathlib.Path(logger.log_dir) / "hessian_reports").glob("*.pt"))
    assert [f.name for f in files] == ["epoch=0-step=4.pt", "epoch=1-step=8.pt"]
    for entry, path in zip(hessian.history, files, strict=True):
        assert torch.load(path, weights_only=True)["format"] == "lightning_hessian.HessianReport"
        report = HessianReport.load(path)
        for name, value in report.scalars().items():
            assert entry[name] == value, name
    assert_same_report(HessianReport.load(files[-1]), hessian.last_report)


needs_safe_globals = pytest.mark.skipif(
    not hasattr(torch.serialization, "safe_globals"),
    reason="torch.serialization.safe_globals is new in torch 2.5 (older torch: old files need trusted=True)",
)


@needs_safe_globals
def test_an_old_file_of_pickled_report_dataclasses_still_loads_without_running_code(tmp_path):
    report = sample_report()
    path = tmp_path / "old.pt"
    torch.save(report, path)  # the old format: the dataclasses themselves, pickled
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # plain torch refuses the classes
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: only the report's own classes were built
        loaded = HessianReport.load(path)
    assert_same_report(loaded, report)


def test_an_old_file_with_other_classes_needs_trusted_and_then_warns(tmp_path):
    report = sample_report()
    report.seconds = np.float64(0.5)  # a foreign class in the pickle, as an old file may hold
    path = tmp_path / "old.pt"
    torch.save(report, path)
    with pytest.raises(pickle.UnpicklingError, match=r"numpy.*arbitrary code.*trusted=True"):
        HessianReport.load(path)
    with pytest.warns(UserWarning, match=r"trusted=True.*fully unpickling.*runs any code the file contains"):
        loaded = HessianReport.load(path, trusted=True)
    assert loaded.seconds == 0.5 and type(loaded.seconds) is float
    assert loaded.scalars() == sample_report().scalars()


class Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_a_file_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    data = sample_report().to_dict()
    data["loss"] = Payload(marker)
    path = tmp_path / "evil.pt"
    torch.save(data, path)
    with pytest.raises(pickle.UnpicklingError, match="arbitrary code"):
        HessianReport.load(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("format"), "Not a saved HessianReport"),
        (lambda d: d.update(version=99), "layout version 99"),
        (
            lambda d: d["blocks"]["a"].update(colour="red"),
            r"report.blocks\['a'\] \(BlockReport\) has unknown fields \['colour'\]",
        ),
        (lambda d: d["blocks"]["a"].pop("size"), r"lacks \['size'\]"),
        (
            lambda d: d["blocks"]["a"]["trace"].update(value="big"),
            r"report.blocks\['a'\].trace.value must be float",
        ),
        (
            lambda d: d["blocks"]["b"].update(spectrum=[1.0, 2.0]),
            r"spectrum must be Tensor or None, got list",
        ),
        (lambda d: d.update(num_samples=True), r"report.num_samples must be int"),
    ],
)
def test_from_dict_names_what_is_wrong(change, message):
    data = sample_report().to_dict()
    change(data)
    with pytest.raises(ValueError, match=message):
        HessianReport.from_dict(data)


def test_load_of_something_else_says_so(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match="Not a saved HessianReport"):
        HessianReport.load(path)


def test_hand_built_report_round_trips():
    report = lh.HessianReport(
        blocks={
            "fc": BlockReport(
                "fc",
                10,
                "iterative",
                eigenvalues=EigenResult(
                    torch.tensor([5.0, 4.0]), None, torch.tensor([True, False]), torch.ones(2), 7, tol=1e-3
                ),
            )
        },
        loss=1.5,
        num_samples=4,
    )
    back = HessianReport.from_dict(report.to_dict())
    assert_same_report(back, report)
    assert back.blocks["fc"].eigenvalues.tol == 1e-3
