"""A stated overhead budget: the share of wall time a curvature monitor may take.

``HessianCallback(max_overhead=0.1)`` keeps the time spent on curvature at about 10% of the run's wall
time since training began: an evaluation that would push the share above the budget is postponed to
the next scheduled point (never made less accurate). The expected cost of an evaluation is the last
one's (a failed evaluation's time, when longer, since it may have stopped early), so the share can
exceed the budget by at most one evaluation (the first one, whose cost is not known yet, always runs).
Every second an evaluation takes counts, its logging and a failed evaluation's included.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .validation import check_positive_float


class OverheadBudget:
    """Track curvature seconds against wall seconds, and tell whether the next evaluation fits.

    Args:
        max_share: Largest share of wall time for curvature, in ``(0, 1]``; ``None`` for no budget
            (every evaluation runs, the overhead is still measured).
        clock: Seconds, monotonic (``time.perf_counter``; a fake one in tests).

    Raises:
        TypeError: If ``max_share`` is not a number.
        ValueError: If it is not in ``(0, 1]``.

    Example:
        >>> budget = OverheadBudget(0.1)
        >>> budget.start()
        >>> budget.allows()  # the first evaluation always runs
        True
    """

    def __init__(self, max_share: float | None, clock: Callable[[], float] = time.perf_counter) -> None:
        if max_share is not None:
            max_share = check_positive_float("max_overhead", max_share, "Pass e.g. max_overhead=0.1 (10%).")
            if max_share > 1:
                raise ValueError(f"`max_overhead` must be at most 1 (a share of wall time), got {max_share}.")
        self.max_share = max_share
        self.clock = clock
        self.start()

    def start(self) -> None:
        """Start counting (at the beginning of training)."""
        self.started = self.clock()
        self.curvature_seconds = 0.0
        self.last_cost: float | None = None

    @property
    def wall_seconds(self) -> float:
        """Wall seconds since :meth:`start`."""
        return max(0.0, self.clock() - self.started)

    @property
    def training_seconds(self) -> float:
        """Wall seconds since :meth:`start` not spent on curvature."""
        return max(0.0, self.wall_seconds - self.curvature_seconds)

    @property
    def overhead(self) -> float:
        """Curvature seconds per training second so far (``hessian/overhead``)."""
        return self.curvature_seconds / max(self.training_seconds, 1e-12)

    def allows(self) -> bool:
        """Whether an evaluation costing as much as the last one keeps the share within the budget."""
        if self.max_share is None or self.last_cost is None:
            return True
        share = (self.curvature_seconds + self.last_cost) / max(self.wall_seconds + self.last_cost, 1e-12)
        return share <= self.max_share

    def record(self, seconds: float) -> None:
        """Count one evaluation's wall seconds."""
        self.curvature_seconds += seconds
        self.last_cost = seconds

    def record_failure(self, seconds: float) -> None:
        """Count the wall seconds of an evaluation that failed before it was recorded.

        They count as curvature time, but a failure may stop early, so the expected cost of the next
        evaluation stays the last one's unless the failure took longer.
        """
        self.curvature_seconds += seconds
        self.last_cost = max(self.last_cost or 0.0, seconds)

    def extend(self, seconds: float) -> None:
        """Add more seconds to the last evaluation (e.g. its logging, measured after it)."""
        self.curvature_seconds += seconds
        self.last_cost = (self.last_cost or 0.0) + seconds
