"""The vectors kept between evaluations: on the device, else on the CPU, else dropped with one info
message that says what the drop costs (a cold start, or an eigenvector overlap not logged).

``available_memory`` is replaced by a fake that answers the free bytes of each call in turn: this machine
has only a CPU, so the block's device and the CPU fallback are told apart by the order of the calls.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

import lightning_hessian as lh
from lightning_hessian import warm_start
from lightning_hessian.warm_start import KEEP_SHARE, RitzVectorStore
from tests.helpers import FAST, TinyModule, loader, trainer

BLOCK = torch.ones(100, 3)  # 1,200 bytes
SIZE = BLOCK.numel() * BLOCK.element_size()


def _free_memory(monkeypatch, *answers: int | None) -> list[torch.device]:
    """Make ``available_memory`` answer ``answers`` in turn (the last one from then on); return the
    devices it is asked about."""
    asked: list[torch.device] = []

    def available(device: torch.device) -> int | None:
        asked.append(torch.device(device))
        return answers[min(len(asked), len(answers)) - 1]

    monkeypatch.setattr(warm_start, "available_memory", available)
    return asked


def test_vectors_stay_on_their_device_when_it_has_room(monkeypatch):
    asked = _free_memory(monkeypatch, int(SIZE / KEEP_SHARE))  # exactly the share
    messages: list[str] = []
    store = RitzVectorStore(messages.append)
    store.keep({"model": BLOCK, "frozen": None})
    assert asked == [BLOCK.device]  # the CPU is not asked
    assert list(store.vectors) == ["model"] and torch.equal(store.vectors["model"], BLOCK)
    assert messages == []


def test_a_full_device_moves_the_vectors_to_the_cpu(monkeypatch):
    asked = _free_memory(monkeypatch, int(SIZE / KEEP_SHARE) - 1, 10 * SIZE)
    messages: list[str] = []
    store = RitzVectorStore(messages.append)
    store.keep({"model": BLOCK})
    assert asked == [BLOCK.device, torch.device("cpu")]
    assert store.vectors["model"].device == torch.device("cpu")
    assert torch.equal(store.vectors["model"], BLOCK) and messages == []


def test_unknown_free_memory_keeps_the_vectors(monkeypatch):
    asked = _free_memory(monkeypatch, None)
    store = RitzVectorStore(pytest.fail)
    store.keep({"model": BLOCK})
    assert asked == [BLOCK.device] and "model" in store.vectors


def test_a_full_cpu_drops_the_vectors_with_one_message_stating_the_consequence(monkeypatch):
    asked = _free_memory(monkeypatch, 0)
    messages: list[str] = []
    store = RitzVectorStore(messages.append, "top eigenvectors", "no overlap for {block}")
    store.keep({"model": torch.ones(100, 3)})
    store.vectors["stale"] = BLOCK  # what the previous evaluation kept is replaced, not merged
    store.keep({"model": BLOCK, "head": BLOCK})
    assert store.vectors == {}
    assert asked == [BLOCK.device, torch.device("cpu")] * 3
    assert messages == [
        "HessianCallback: no memory to keep the top eigenvectors of block 'model' (0 MiB) between "
        "evaluations on the device or the CPU; no overlap for model. Later drops are not reported."
    ]
    _free_memory(monkeypatch, None)  # memory again: kept again
    store.keep({"model": BLOCK})
    assert list(store.vectors) == ["model"] and len(messages) == 1


def test_the_default_store_says_a_drop_means_a_cold_start(monkeypatch):
    _free_memory(monkeypatch, 0)
    messages: list[str] = []
    RitzVectorStore(messages.append).keep({"model": BLOCK})
    assert len(messages) == 1 and "Ritz vectors of block 'model'" in messages[0]
    assert "the evaluation after a drop starts cold" in messages[0]


@pytest.mark.parametrize(
    ("warm", "expected"),
    [
        (
            False,
            [
                "top eigenvectors (eigenvector_overlap=True) of block 'model'",
                "hessian/model/eigenvector_overlap",
            ],
        ),
        (True, ["Ritz vectors (warm_start=True) of block 'model'", "starts cold"]),
    ],
)
def test_the_callback_says_what_a_drop_costs_for_each_store(tmp_path, monkeypatch, caplog, warm, expected):
    _free_memory(monkeypatch, 0)
    hessian = lh.HessianCallback(
        num_batches=1,
        dense_limit=0,
        warm_start=warm,
        evaluate_at_end=False,
        figures=False,
        analyze_kwargs=FAST,
    )
    with caplog.at_level(logging.INFO), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [hessian], max_epochs=2, logger=False).fit(TinyModule(), loader(n=16))
    assert [entry["ok"] for entry in hessian.history] == [True, True]
    dropped = [r.getMessage() for r in caplog.records if "no memory to keep" in r.getMessage()]
    said = [m for m in dropped if expected[0] in m]
    assert len(said) == 1 and expected[1] in said[0]
    if not warm:
        assert len(dropped) == 1 and "cold" not in dropped[0]
    assert "hessian/model/eigenvector_overlap" not in hessian.history[1]  # nothing to compare with
