"""HessianCallback itself (lightning_hessian.callback): argument validation, the checkpoint state key,
the state round trip and the progress bar.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import tqdm
from lightning.pytorch.strategies import SingleDeviceStrategy

import lightning_hessian as lh
from lightning_hessian.callback import HessianCallback
from tests.helpers import FAST, TinyModule, loader, trainer

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
    # A value of the wrong type is a TypeError, a value of the right type out of range a ValueError.
    wrong_type = {
        "every_n_epochs": (1.5, True),
        "epochs": ("0,1", [1.0]),
        "evaluate_at_end": ("yes",),
        "data": (5,),
        "params": (3,),
        "blocks": ({"a": 1},),
        "min_eigenvalue": (1,),
        "trace": (None,),
        "density": ("no",),
        "loss_fn": ("cross_entropy",),
        "dtype": (torch.int64, "int32"),
        "analyze_kwargs": ([1],),
        "histograms": (1,),
        "figures": (None,),
        "save_reports": ("yes",),
        "progress_bar": (0,),
    }
    ((key, value),) = kwargs.items()
    is_type_error = isinstance(value, torch.Tensor) or any(
        value is bad or (type(value) is type(bad) and value == bad) for bad in wrong_type.get(key, ())
    )
    with pytest.raises(TypeError if is_type_error else ValueError) as info:
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


def _quick(**settings) -> HessianCallback:
    return HessianCallback(num_batches=1, analyze_kwargs=FAST, figures=False, **settings)


def _fit(root, callback, max_epochs=1, n=32, **kwargs):
    torch.manual_seed(0)  # the same model and the same shuffled first batch in every run
    trainer(root, [callback], max_epochs=max_epochs, logger=False, **kwargs).fit(TinyModule(), loader(n=n))


def test_state_dict_round_trip(tmp_path):
    cb = _quick(every_n_steps=3, evaluate_at_end=False)
    _fit(tmp_path, cb)
    assert [(h["step"], h["reason"], h["ok"]) for h in cb.history] == [(3, "step", True)]
    state = cb.state_dict()
    assert state["history"] == cb.history and state["last_step"] == 3 and state["num_batches"] == 1
    assert state["fingerprint"] == cb.batches_fingerprint and cb.batches_fingerprint is not None
    restored = _quick(every_n_steps=3, evaluate_at_end=False)
    restored.load_state_dict(state)
    assert restored.history == cb.history and restored.history is not cb.history
    assert restored.state_dict()["last_step"] == 3
    # The restored callback goes on from there: step 3 is not evaluated again, and the batches it
    # captures are checked against the loaded fingerprint (the same samples: no warning).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, restored, max_epochs=2)
    assert [h["step"] for h in restored.history] == [3, 6]
    assert restored.batches_fingerprint == cb.batches_fingerprint
    assert not [w for w in caught if "differ from those of the checkpointed run" in str(w.message)]
    other = _quick(every_n_steps=3, evaluate_at_end=False)
    other.load_state_dict({**state, "fingerprint": "abc"})
    with pytest.warns(UserWarning, match="differ from those of the checkpointed run"):
        _fit(tmp_path, other)


class NotGlobalZero(SingleDeviceStrategy):
    """A single-process strategy that reports itself as a rank other than zero."""

    @property
    def is_global_zero(self) -> bool:
        return False


def test_progress_bar_follows_the_trainer_and_reports_products(tmp_path, capsys, monkeypatch):
    bars = []

    class RecordingBar(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(tqdm, "tqdm", RecordingBar)  # the callback's bar (Lightning's own bars are not)
    shown = _quick()
    _fit(tmp_path, shown, n=16, enable_progress_bar=True)  # 2 steps, evaluated after epoch 0
    (bar,) = bars
    products = shown.history[-1]["hessian/num_matvecs"]
    assert bar.desc == "Hessian (epoch 0, step 2)"
    assert (bar.n, bar.total) == (products, products) and products > 0
    assert "Hessian (epoch 0, step 2)" in capsys.readouterr().out
    # No bar when the trainer shows none, when the callback is asked for none, or off rank zero.
    for callback, settings in (
        (_quick(), {}),
        (_quick(progress_bar=False), {"enable_progress_bar": True}),
        (_quick(), {"enable_progress_bar": True, "strategy": NotGlobalZero(device=torch.device("cpu"))}),
    ):
        _fit(tmp_path, callback, n=16, **settings)
        assert callback.history[-1]["ok"]
    assert len(bars) == 1
    assert "Hessian (" not in capsys.readouterr().out
