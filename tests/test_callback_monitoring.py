"""What a default evaluation costs and spends: monitoring defaults, warm starts, the overhead budget."""

from __future__ import annotations

import logging

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_hessian as lh
import lightning_hessian.callback as callback_module
from tests.helpers import TinyModule, loader, trainer

ITERATIVE = {"dense_limit": 0, "num_batches": 2}  # the 63-parameter module through Hessian-vector products


def test_the_default_evaluation_uses_one_shared_krylov_space(tmp_path):
    hessian = lh.HessianCallback(**ITERATIVE)
    assert (hessian.settings.krylov, hessian.settings.tol, hessian.settings.trace_matvecs) == (
        "shared",
        1e-3,
        16,
    )
    trainer(tmp_path, [hessian], max_epochs=1, logger=False).fit(TinyModule(), loader())
    block = hessian.last_report.blocks["model"]
    assert block.trace.method == "krylov-aware" and block.density is not None
    assert bool(block.eigenvalues.converged.all())
    entry = hessian.history[-1]
    assert entry["ok"] and 0.0 <= entry["hessian/overhead"] < float("inf")
    assert block.ritz_vectors is None  # kept by the callback for the next evaluation, not in the report


def test_the_separate_estimators_remain_available(tmp_path):
    hessian = lh.HessianCallback(**ITERATIVE, analyze_kwargs={"krylov": "separate", "trace_matvecs": 30})
    trainer(tmp_path, [hessian], max_epochs=1, logger=False).fit(TinyModule(), loader())
    assert hessian.last_report.blocks["model"].trace.method == "hutch++"


def _recording(monkeypatch):
    calls = []
    original = callback_module.analyze_with

    def recording(*args, **kwargs):
        calls.append(dict(kwargs.get("start_vectors") or {}))
        return original(*args, **kwargs)

    monkeypatch.setattr(callback_module, "analyze_with", recording)
    return calls


def test_later_evaluations_start_from_the_previous_ritz_vectors_and_a_new_fit_starts_cold(
    tmp_path, monkeypatch
):
    calls = _recording(monkeypatch)
    hessian = lh.HessianCallback(**ITERATIVE, evaluate_at_end=False, warm_start=True)
    trainer(tmp_path, [hessian], max_epochs=3, logger=False).fit(TinyModule(), loader())
    assert [sorted(c) for c in calls] == [[], ["model"], ["model"]]
    assert calls[1]["model"].shape == (63, 3)
    trainer(tmp_path, [hessian], max_epochs=1, logger=False).fit(TinyModule(), loader())
    assert calls[3] == {}  # a new fit: cold
    assert all(entry["ok"] for entry in hessian.history)


def test_warm_start_is_off_by_default(tmp_path, monkeypatch):
    calls = _recording(monkeypatch)
    hessian = lh.HessianCallback(**ITERATIVE, evaluate_at_end=False)
    trainer(tmp_path, [hessian], max_epochs=2, logger=False).fit(TinyModule(), loader())
    assert calls == [{}, {}] and hessian.settings.keep_vectors == 0


def test_an_exhausted_budget_postpones_evaluations_with_one_info_line(tmp_path, caplog):
    hessian = lh.HessianCallback(**ITERATIVE, max_overhead=1e-9, evaluate_at_end=False)
    with caplog.at_level(logging.INFO):
        trainer(tmp_path, [hessian], max_epochs=4, logger=False).fit(TinyModule(), loader())
    assert [entry["epoch"] for entry in hessian.history] == [0]  # the first always runs
    postponed = [r for r in caplog.records if "postponed" in r.getMessage()]
    assert len(postponed) == 1 and "max_overhead=1e-09" in postponed[0].getMessage()


def test_a_generous_budget_changes_nothing(tmp_path):
    hessian = lh.HessianCallback(**ITERATIVE, max_overhead=1.0, evaluate_at_end=False)
    trainer(tmp_path, [hessian], max_epochs=3, logger=False).fit(TinyModule(), loader())
    assert [entry["epoch"] for entry in hessian.history] == [0, 1, 2]


@pytest.mark.parametrize("bad", [{"max_overhead": "10%"}, {"max_overhead": 0}, {"warm_start": 1}])
def test_bad_monitoring_arguments_are_refused(bad):
    with pytest.raises((TypeError, ValueError)):
        lh.HessianCallback(**bad)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"top_k": 0}, r"`warm_start=True`.*top_k=0 keeps none\. Pass top_k >= 1"),
        (
            {"analyze_kwargs": {"keep_vectors": 0}},
            r"'keep_vectors': 0\} keeps none\. Leave 'keep_vectors' out",
        ),
        ({"analyze_kwargs": {"krylov": "separate"}}, r"'krylov': 'separate'\} .*ignore the kept vectors"),
        ({"method": "dense"}, r"method='dense' computes every block exactly.*or warm_start=False"),
    ],
)
def test_a_warm_start_that_would_do_nothing_is_refused_at_construction(settings, match):
    with pytest.raises(ValueError, match=match):
        lh.HessianCallback(warm_start=True, **settings)
    lh.HessianCallback(warm_start=False, **settings)  # the same settings without a warm start are fine


def test_a_warm_start_whose_blocks_are_all_dense_stops_fit_before_training(tmp_path):
    module = TinyModule()  # 63 parameters, within the default dense_limit=1024
    fit = trainer(tmp_path, [lh.HessianCallback(warm_start=True)], max_epochs=1, logger=False)
    with pytest.raises(MisconfigurationException, match=r"dense_limit=1024 parameters \(the largest 63\)"):
        fit.fit(module, loader(n=16))
    assert fit.global_step == 0 and module.seen == []
    hessian = lh.HessianCallback(warm_start=True, blocks="module", dense_limit=21, num_batches=1)
    trainer(tmp_path, [hessian], max_epochs=1, logger=False).fit(TinyModule(), loader(n=16))
    methods = {name: block.method for name, block in hessian.last_report.blocks.items()}
    assert methods == {"net.0": "iterative", "net.1": "dense", "net.4": "dense"}  # one block to start


def test_the_budget_is_restarted_by_each_fit(tmp_path):
    hessian = lh.HessianCallback(**ITERATIVE, max_overhead=0.5, evaluate_at_end=False)
    trainer(tmp_path, [hessian], max_epochs=1, logger=False).fit(TinyModule(), loader())
    first = hessian.budget.started
    trainer(tmp_path, [hessian], max_epochs=1, logger=False).fit(TinyModule(), loader())
    assert hessian.budget.started > first
    assert torch.isfinite(torch.tensor(hessian.history[-1]["hessian/overhead"]))
