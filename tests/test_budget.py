"""The overhead budget, driven by a fake clock."""

from __future__ import annotations

import pytest

from lightning_hessian.budget import OverheadBudget


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
