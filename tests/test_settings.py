"""One settings object for analyze() and HessianCallback: the same rules, the same errors."""

from __future__ import annotations

import inspect

import pytest
import torch

import lightning_hessian as lh
from lightning_hessian.settings import AnalysisSettings


def test_the_settings_are_exactly_analyzes_keyword_arguments():
    keywords = [
        name
        for name, parameter in inspect.signature(lh.analyze).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
        and name not in ("process_group", "progress", "optimizer")
    ]
    assert list(AnalysisSettings.names()) == keywords
    defaults = {n: inspect.signature(lh.analyze).parameters[n].default for n in keywords}
    assert {n: getattr(AnalysisSettings(), n) for n in keywords} == defaults


def test_the_callback_fills_the_same_settings():
    callback = lh.HessianCallback(
        top_k=5, dtype="float64", analyze_kwargs={"trace_matvecs": 9, "hvp": "auto"}
    )
    monitoring = {"krylov": "shared", "tol": 1e-3}  # the callback's affordable defaults
    monitoring["gradient_geometry"] = True  # the callback logs the training dynamics by default
    assert callback.settings == AnalysisSettings(top_k=5, dtype=torch.float64, trace_matvecs=9, **monitoring)
    assert callback.top_k == 5 and callback.dtype is torch.float64


@pytest.mark.parametrize(
    ("values", "error", "named"),
    [
        ({"top_k": -1}, ValueError, "top_k"),
        ({"top_k": "3"}, TypeError, "top_k"),
        ({"trace": 1}, TypeError, "trace"),
        ({"method": "exact"}, ValueError, "method"),
        ({"trace_method": "magic"}, ValueError, "trace_method"),
        ({"tol": 0}, ValueError, "tol"),
        ({"max_matvecs": 0}, ValueError, "max_matvecs"),
        ({"density_probes": 0}, ValueError, "density_probes"),
        ({"hvp": "double-backward"}, ValueError, "hvp"),
        ({"blocks": "layer"}, ValueError, "blocks"),
        ({"blocks": 3}, TypeError, "blocks"),
        ({"batch_size_fn": 3}, TypeError, "batch_size_fn"),
        ({"nope": 1}, ValueError, "unknown keys ['nope']"),
    ],
)
def test_bad_settings_are_refused_by_every_entry_point_alike(values, error, named):
    with pytest.raises(error) as direct:
        AnalysisSettings.create("analyze_kwargs", **values)
    assert named in str(direct.value)
    own = set(inspect.signature(lh.HessianCallback.__init__).parameters)
    as_callback = values if set(values) <= own else {"analyze_kwargs": values}
    with pytest.raises(error) as through_callback:
        lh.HessianCallback(**as_callback)
    assert named in str(through_callback.value)
