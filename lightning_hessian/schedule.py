"""When :class:`~lightning_hessian.HessianCallback` evaluates: after chosen epochs, every n optimizer
steps, and once at the end of training.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .validation import check_bool, check_int, check_optional_int


@dataclass(frozen=True)
class Schedule:
    """The evaluation schedule of :class:`~lightning_hessian.HessianCallback`.

    Attributes:
        every_n_epochs: Evaluate after epochs ``n, 2n, ...`` counted from 1 (0-based indices
            ``n-1, 2n-1, ...``), like Lightning's ``check_val_every_n_epoch``; ``None`` for never.
        epochs: Explicit 0-based epoch indices to evaluate after.
        every_n_steps: Evaluate when ``trainer.global_step`` (optimizer steps) reaches a multiple of
            ``n``; ``None`` for never.
        at_end: Evaluate once when training ends, unless that model state was just evaluated.

    Example:
        >>> schedule = Schedule.create(every_n_epochs=2)
        >>> [e for e in range(6) if schedule.epoch_due(e)]
        [1, 3, 5]
    """

    every_n_epochs: int | None = 1
    epochs: frozenset[int] = frozenset()
    every_n_steps: int | None = None
    at_end: bool = True

    @classmethod
    def create(
        cls,
        every_n_epochs: int | None = None,
        epochs: Iterable[int] | None = None,
        every_n_steps: int | None = None,
        at_end: bool = True,
    ) -> Schedule:
        """Validate the arguments and build a schedule.

        When none of ``every_n_epochs``, ``epochs`` and ``every_n_steps`` is given, the schedule
        evaluates after every epoch.

        Args:
            every_n_epochs: Positive integer or ``None``.
            epochs: Iterable of non-negative integers (0-based epoch indices) or ``None``.
            every_n_steps: Positive integer or ``None``.
            at_end: Whether to evaluate at the end of training.

        Returns:
            The schedule.

        Raises:
            TypeError: For a non-integer period or epoch, or a non-boolean ``at_end``.
            ValueError: For a non-positive period or a negative epoch.
        """
        n_epochs = check_optional_int(
            "every_n_epochs", every_n_epochs, 1, "Pass e.g. every_n_epochs=1 (after every epoch), or None."
        )
        n_steps = check_optional_int(
            "every_n_steps", every_n_steps, 1, "Pass e.g. every_n_steps=100 (optimizer steps), or None."
        )
        chosen: frozenset[int] = frozenset()
        if epochs is not None:
            if isinstance(epochs, str | bytes) or not isinstance(epochs, Iterable):
                raise TypeError(
                    "`epochs` must be a list of 0-based epoch indices (e.g. epochs=[0, 4, 9]), "
                    f"got {epochs!r}."
                )
            fix = "It holds 0-based epoch indices, e.g. epochs=[0, 4, 9]."
            chosen = frozenset(check_int(f"epochs[{i}]", e, 0, fix) for i, e in enumerate(epochs))
        check_bool("evaluate_at_end", at_end)
        if n_epochs is None and not chosen and n_steps is None and epochs is None:
            n_epochs = 1
        return cls(every_n_epochs=n_epochs, epochs=chosen, every_n_steps=n_steps, at_end=at_end)

    def epoch_due(self, epoch: int) -> bool:
        """Whether to evaluate after the 0-based epoch ``epoch``."""
        if epoch in self.epochs:
            return True
        return self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0

    def step_due(self, global_step: int) -> bool:
        """Whether to evaluate now that ``global_step`` optimizer steps have been taken."""
        return self.every_n_steps is not None and global_step > 0 and global_step % self.every_n_steps == 0

    def describe(self) -> dict[str, object]:
        """A plain, stable description (for ``state_key`` and checkpoints)."""
        return {
            "every_n_epochs": self.every_n_epochs,
            "epochs": sorted(self.epochs),
            "every_n_steps": self.every_n_steps,
            "at_end": self.at_end,
        }
