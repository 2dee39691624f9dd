"""The overhead budget, driven by a fake clock: by hand, and inside HessianCallback in a Lightning fit."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import pytest
from lightning.pytorch.callbacks import Callback

import lightning_hessian as lh
import lightning_hessian.callback as callback_module
from lightning_hessian.budget import OverheadBudget
from tests.helpers import FAST, TinyModule, loader, trainer


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def simulate(max_share, epochs=60, epoch_seconds=1.0, evaluation_seconds=0.5):
    """Train ``epochs`` epochs, an evaluation scheduled after each; return (evaluated, share)."""
    clock = FakeClock()
    budget = OverheadBudget(max_share, clock=clock)
    budget.start()
    evaluated = []
    for epoch in range(epochs):
        clock.now += epoch_seconds
        if budget.allows():
            start = clock()
            clock.now += evaluation_seconds
            budget.record(clock() - start)
            evaluated.append(epoch)
    return evaluated, budget.curvature_seconds / budget.wall_seconds, budget


@pytest.mark.parametrize("max_share", [0.05, 0.1, 0.25])
def test_the_share_of_wall_time_stays_within_the_budget_plus_one_evaluation(max_share):
    evaluated, share, budget = simulate(max_share)
    assert evaluated[0] == 0  # the first evaluation always runs: its cost is not known yet
    one_evaluation = 0.5 / budget.wall_seconds
    assert share <= max_share + one_evaluation
    assert share >= 0.5 * max_share  # postponed, not stopped: evaluations keep coming
    assert budget.overhead == pytest.approx(budget.curvature_seconds / budget.training_seconds)


def test_without_a_budget_every_evaluation_runs_and_the_overhead_is_measured():
    evaluated, share, budget = simulate(None, epochs=10)
    assert evaluated == list(range(10))
    assert share == pytest.approx(5.0 / 15.0)
    assert budget.overhead == pytest.approx(0.5)


def test_a_budget_postpones_to_the_next_scheduled_point():
    evaluated, _, _ = simulate(0.1, epochs=20)
    gaps = {b - a for a, b in zip(evaluated, evaluated[1:], strict=False)}
    assert gaps and min(gaps) > 1  # points in between were postponed
    assert len(evaluated) >= 3 and max(gaps) <= 10  # ... to the next point that fits, not dropped


def test_bad_budgets_are_refused():
    with pytest.raises(TypeError, match="`max_overhead` must be a number"):
        OverheadBudget("10%")
    with pytest.raises(ValueError, match="`max_overhead` must be a positive finite number"):
        OverheadBudget(0.0)
    with pytest.raises(ValueError, match="at most 1"):
        OverheadBudget(1.5)


def test_logging_time_counts_towards_the_last_evaluation():
    clock = FakeClock()
    budget = OverheadBudget(0.5, clock=clock)
    budget.start()
    budget.record(1.0)
    budget.extend(0.25)
    assert budget.curvature_seconds == 1.25 and budget.last_cost == 1.25


def test_a_failure_counts_its_seconds_and_keeps_the_longer_expected_cost():
    clock = FakeClock()
    budget = OverheadBudget(0.5, clock=clock)
    budget.start()
    budget.record(1.0)
    budget.record_failure(0.25)  # stopped early: the next one is still expected to take 1 s
    assert budget.curvature_seconds == 1.25 and budget.last_cost == 1.0
    budget.record_failure(2.0)
    assert budget.curvature_seconds == 3.25 and budget.last_cost == 2.0


# ------------------------------------------------------------------ inside HessianCallback, in a fit
STEP, ANALYSIS, LOGGING = 0.5, 0.75, 0.25  # fake seconds: 2 steps an epoch (1 s), evaluations of 1 s


class TimedModule(TinyModule):
    """Each training step takes ``STEP`` fake seconds (in a hook the evaluations do not run)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(dropout=0.0)
        self.clock = clock

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.clock.now += STEP


class Ledger(Callback):
    """After the HessianCallback's epoch end: (curvature seconds, wall seconds) of its budget."""

    def __init__(self, hessian: lh.HessianCallback) -> None:
        self.hessian, self.rows = hessian, []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.rows.append((self.hessian.budget.curvature_seconds, self.hessian.budget.wall_seconds))


def fit_with_fake_clock(tmp_path, monkeypatch, caplog, max_epochs, fail=None, **settings):
    """Fit with every duration fake; ``fail=(epoch, phase)`` makes that evaluation's analysis or
    logging raise after its fake seconds. Returns the callback, the ledger rows and the info lines."""
    clock = FakeClock()
    original = callback_module.analyze_with

    def analyze_with(module, *args, **kwargs):
        clock.now += ANALYSIS
        if fail == (module.trainer.current_epoch, "analysis"):
            raise RuntimeError("simulated analysis failure")
        return original(module, *args, **kwargs)

    monkeypatch.setattr(callback_module, "analyze_with", analyze_with)
    hessian = lh.HessianCallback(
        num_batches=1, max_overhead=0.25, top_k=1, figures=False, analyze_kwargs=FAST, **settings
    )
    hessian.budget.clock = clock
    log = hessian._log

    def timed_log(trainer, report, epoch, step, reason, extra):
        clock.now += LOGGING
        if fail == (epoch, "logging"):
            raise RuntimeError("simulated logging failure")
        return log(trainer, report, epoch, step, reason, extra)

    hessian._log = timed_log
    ledger = Ledger(hessian)
    clock.now += 50.0  # before fit: not the run's wall time (the timer starts when fit starts)
    with caplog.at_level(logging.INFO), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = trainer(tmp_path, [hessian, ledger], max_epochs=max_epochs, logger=False)
        fit.fit(TimedModule(clock), loader(n=16))
    budget_lines = [r.getMessage() for r in caplog.records if "max_overhead=0.25" in r.getMessage()]
    return hessian, ledger.rows, budget_lines


def test_the_budget_in_a_fit_evaluates_exactly_the_epochs_that_fit(tmp_path, monkeypatch, caplog):
    # The timer starts with fit. Epoch 0 ends at 1 s and always evaluates (nothing known yet). Each
    # later epoch end evaluates when (curvature + 1 s) / (wall + 1 s) <= 0.25: at 7 s (epoch 5), at
    # 11 s (epoch 8); the end of training, at 13 s, would make it 4/14 and is skipped.
    hessian, rows, lines = fit_with_fake_clock(tmp_path, monkeypatch, caplog, max_epochs=10)
    assert [(e["epoch"], e["reason"], e["ok"]) for e in hessian.history] == [
        (0, "epoch", True),
        (5, "epoch", True),
        (8, "epoch", True),
    ]
    assert [wall for _, wall in rows] == [2, 3, 4, 5, 6, 8, 9, 10, 12, 13]
    assert [curvature for curvature, _ in rows] == [1, 1, 1, 1, 1, 2, 2, 2, 3, 3]  # logging counted
    assert all(curvature / wall <= 0.25 + 1.0 / wall for curvature, wall in rows)  # budget + one
    # hessian/overhead: curvature per training second, measured before the evaluation's logging
    overheads = [e["hessian/overhead"] for e in hessian.history]
    assert overheads == pytest.approx([0.75 / 1, 1.75 / 6, 2.75 / 9], rel=1e-12)
    assert len(lines) == 2
    assert lines[0].startswith("HessianCallback: the evaluation at epoch 1, step 4 is postponed")
    assert "end of training (epoch 9, step 20) is skipped" in lines[1]
    assert "the last evaluation was at step 18" in lines[1] and "max_overhead (or None)" in lines[1]
    assert hessian.budget.curvature_seconds == 3.0 and hessian.budget.wall_seconds == 13.0


@pytest.mark.parametrize(("max_epochs", "ends"), [(5, False), (6, True)])
def test_the_end_of_training_is_evaluated_when_it_fits_the_budget(
    tmp_path, monkeypatch, caplog, max_epochs, ends
):
    # One scheduled evaluation (epoch 0: 1 s of 2); the end comes at `max_epochs` + 1 seconds.
    hessian, _, lines = fit_with_fake_clock(tmp_path, monkeypatch, caplog, max_epochs=max_epochs, epochs=[0])
    reasons = [e["reason"] for e in hessian.history]
    assert reasons == (["epoch", "end"] if ends else ["epoch"])  # 2/8 <= 0.25 < 2/7
    assert [("is skipped" in line) for line in lines] == ([] if ends else [True])


@pytest.mark.parametrize(("phase", "curvature"), [("analysis", 2.75), ("logging", 3.0)])
def test_a_failed_evaluation_counts_and_the_next_waits_as_long(
    tmp_path, monkeypatch, caplog, phase, curvature
):
    # The evaluation at epoch 5 fails after its analysis' 0.75 s, or in its logging (after 1 s). Its
    # seconds count, and the next is still expected to take 1 s: epoch 8 evaluates, not epoch 7.
    hessian, rows, _ = fit_with_fake_clock(tmp_path, monkeypatch, caplog, max_epochs=10, fail=(5, phase))
    assert [(e["epoch"], e["ok"]) for e in hessian.history] == [(0, True), (5, False), (8, True)]
    assert f"simulated {phase} failure" in hessian.history[1]["error"]
    assert hessian.budget.curvature_seconds == curvature
    assert all(c / wall <= 0.25 + 1.0 / wall for c, wall in rows)
