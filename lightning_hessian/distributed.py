"""Cross-rank agreement: every rank reaches every collective, and all ranks fail together.

Under ``torch.distributed`` a rank that raises while the others enter a collective leaves them waiting
forever. Every place that sums over ranks or decides on a failure (the operator's set-up and products,
the dense path's memory check, the callback's phases) goes through the two primitives here, in the
spirit of Lightning's ``strategy.reduce_boolean_decision``:

- :func:`agree_on_failure`: one small all-reduce of a failure flag (plus any numbers the caller sums
  or maximizes along the way); every rank learns whether any rank failed, and the failing ranks'
  messages when one did.
- :func:`all_reduce_or_raise`: a local computation summed over ranks, where a local failure becomes a
  NaN contribution that still joins the all-reduce, so a non-finite sum raises on every rank at once.

With ``group=None`` (a single process) both are plain local computations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import NonFiniteHessianError, RankFailedError


def all_finite(values: Tensor) -> bool:
    """Whether every entry of ``values`` is finite: one reduction and one sync where it is.

    A sum is finite only where every entry is (an infinite or NaN entry makes it infinite or NaN), so
    only a sum that overflows, or an infinite or NaN entry, takes the entrywise check.

    Example:
        >>> all_finite(torch.tensor([1.0, 2.0])), all_finite(torch.tensor([1.0, float("nan")]))
        (True, False)
    """
    if values.is_floating_point() and math.isfinite(float(values.sum())):
        return True
    return bool(torch.isfinite(values).all())


def resolve_process_group(process_group: Any = "auto") -> Any:
    """The process group products are summed over.

    Args:
        process_group: ``"auto"`` (the default group when ``torch.distributed`` is initialized with
            more than one rank, else none), a process group, or ``None`` (this process only).

    Returns:
        A process group, or ``None``.

    Example:
        >>> resolve_process_group("auto") is None  # not initialized
        True
    """
    if isinstance(process_group, str) and process_group == "auto":
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None
    return process_group


def trainer_process_group(trainer: Any) -> Any:
    """The process group a Lightning trainer's products are summed over (``None`` on one process).

    The strategy's group, else the default one. A data-parallel strategy (``ddp``, ``ddp_spawn``,
    multi-node) keeps a full copy of the parameters on every rank, so summing every rank's products
    (weighted by sample counts) gives the Hessian of the loss over the union of all ranks' batches.

    Args:
        trainer: A ``lightning.pytorch.Trainer``.

    Returns:
        A process group, or ``None``.
    """
    if trainer.world_size <= 1:
        return None
    return resolve_process_group(getattr(trainer.strategy, "process_group", None) or "auto")


def reduce_device(group: Any, device: torch.device) -> torch.device:
    """Where tensors for a collective on ``group`` must live: ``device`` for NCCL, else the CPU."""
    return device if dist.get_backend(group) == "nccl" else torch.device("cpu")


@dataclass
class Agreement:
    """What all ranks agreed on after :func:`agree_on_failure` (identical on every rank).

    Attributes:
        failed_ranks: Number of ranks that failed (1 at most under ``op="max"``).
        values: The caller's numbers, reduced over ranks.
        message: The failures of every rank as one line (``"rank 1: ValueError: ..."``), or ``""``.
        error: This rank's own error, or a :class:`RankFailedError` when only other ranks failed,
            or ``None`` when no rank failed.
    """

    failed_ranks: int
    values: list[float]
    message: str
    error: BaseException | None

    def raise_error(self) -> None:
        """Raise :attr:`error` (this rank's own, or the agreed :class:`RankFailedError`) if any."""
        if self.error is not None:
            raise self.error


def _describe(error: BaseException | None) -> str:
    return "" if error is None else f"{type(error).__name__}: {error}"


def _gathered_message(local: str, group: Any) -> str:
    messages: list[str] = [""] * dist.get_world_size(group)
    dist.all_gather_object(messages, local, group=group)
    ranks_by_text: dict[str, list[str]] = {}
    for rank, text in enumerate(messages):
        if text:
            ranks_by_text.setdefault(text, []).append(str(rank))
    return "; ".join(
        f"rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)}: {text}"
        for text, ranks in ranks_by_text.items()
    )


def agree_on_failure(
    error: BaseException | None,
    group: Any,
    *,
    device: torch.device | str = "cpu",
    values: Sequence[float] = (),
    op: str = "sum",
    what: str = "The Hessian evaluation",
) -> Agreement:
    """Agree across ranks on whether any rank failed (one small all-reduce, on every rank).

    Every rank must call it at the same point, failed or not.

    Args:
        error: This rank's failure in the phase that just ended, or ``None``.
        group: The process group, or ``None`` for a single process.
        device: The computation's device (NCCL reduces there, other backends on the CPU).
        values: Numbers to reduce along with the flag (e.g. sample counts, chunk widths).
        op: ``"sum"`` or ``"max"``: how the flag and ``values`` are reduced.
        what: What failed, for the :class:`RankFailedError` of the ranks that did not.

    Returns:
        The :class:`Agreement`, identical on every rank (but for :attr:`Agreement.error`).

    Example:
        >>> agreement = agree_on_failure(None, None, values=[3.0])
        >>> agreement.failed_ranks, agreement.values
        (0, [3.0])
    """
    local = _describe(error)
    if group is None:
        return Agreement(int(error is not None), [float(v) for v in values], local, error)
    flags = torch.tensor(
        [float(error is not None), *values],
        dtype=torch.float64,
        device=reduce_device(group, torch.device(device)),
    )
    dist.all_reduce(flags, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    failed = int(flags[0].item())
    message = _gathered_message(local, group) if failed else ""
    if failed and error is None:
        error = RankFailedError(
            f"{what} failed on {failed} other rank(s) ({message}); this rank stops too, so that no rank "
            "waits in a collective."
        )
    return Agreement(failed, [float(v) for v in flags[1:].tolist()], message, error)


def all_reduce_or_raise(
    compute: Callable[[], Tensor],
    group: Any,
    *,
    shape: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
    what: str = "A Hessian-vector product",
) -> Tensor:
    """Run a local computation and sum it over ranks; all ranks fail together.

    A local exception under a process group becomes a NaN-filled contribution that still joins the
    all-reduce, so no rank is left waiting; a non-finite sum then raises on every rank at the same
    point (the failing rank chains its own error).

    Args:
        compute: Computes this rank's contribution.
        group: The process group, or ``None`` for a single process (then ``compute()`` is returned,
            and its exceptions propagate unchanged).
        shape: The contribution's shape.
        dtype: Its dtype.
        device: Its device.
        what: What is computed, for the error message.

    Returns:
        The sum over ranks.

    Raises:
        NonFiniteHessianError: If the sum is NaN or infinite.

    Example:
        >>> all_reduce_or_raise(lambda: torch.ones(2), None, shape=(2,), dtype=torch.float32, device="cpu")
        tensor([1., 1.])
    """
    error: BaseException | None = None
    try:
        result = compute()
    except Exception as caught:
        if group is None:
            raise
        error = caught
        result = torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    if group is not None:
        buffer = result.to(reduce_device(group, torch.device(device)))
        dist.all_reduce(buffer, group=group)
        result = buffer.to(result.device)
    if not all_finite(result):
        where = "this rank" if error is not None else "the loss or another rank"
        raise NonFiniteHessianError(
            f"{what} is not finite (failure on {where}"
            f"{f': {_describe(error)}' if error is not None else ''}). Check the loss "
            "for NaN/inf at these parameters and batches."
        ) from error
    return result
