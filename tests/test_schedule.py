"""When HessianCallback evaluates (lightning_hessian.schedule)."""

from __future__ import annotations

import pytest

from lightning_hessian.schedule import Schedule


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


def test_describe_is_plain_and_stable():
    schedule = Schedule.create(every_n_steps=4, epochs=(3, 1), at_end=False)
    assert schedule.describe() == {
        "every_n_epochs": None,
        "epochs": [1, 3],
        "every_n_steps": 4,
        "at_end": False,
    }
    assert Schedule.create().describe() == {
        "every_n_epochs": 1,
        "epochs": [],
        "every_n_steps": None,
        "at_end": True,
    }
    assert Schedule.create(epochs=[1, 3]) == Schedule.create(epochs=(3, 1))


@pytest.mark.parametrize(
    ("kwargs", "error", "named"),
    [
        ({"every_n_epochs": 0}, ValueError, "every_n_epochs"),
        ({"every_n_steps": 2.5}, TypeError, "every_n_steps"),
        ({"epochs": "0,1"}, TypeError, "epochs"),
        ({"epochs": [True]}, TypeError, "epochs"),
        ({"epochs": [-1]}, ValueError, "epochs"),
        ({"at_end": 1}, TypeError, "evaluate_at_end"),
    ],
)
def test_bad_schedules_are_rejected_naming_the_argument(kwargs, error, named):
    with pytest.raises(error, match=named):
        Schedule.create(**kwargs)
