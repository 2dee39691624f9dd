"""Errors the library raises on purpose (besides ValueError/TypeError for bad arguments)."""

from __future__ import annotations


class NonFiniteHessianError(FloatingPointError):
    """The loss or a Hessian-vector product is NaN or infinite (on this rank or another one).

    Under ``torch.distributed`` every rank raises it at the same point, so no rank is left waiting
    in a collective.
    """


class RankFailedError(RuntimeError):
    """Another rank of the process group failed, so this rank stops at the same point."""


class HessianTooLargeError(MemoryError):
    """A dense Hessian would not fit in the memory the device has free (checked before allocating)."""
