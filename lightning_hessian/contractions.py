"""Where two vectors meet: every contraction over ``N``, norm, random probe and QR of the estimators.

The estimators (:mod:`.krylov`, :mod:`.lanczos`, :mod:`.shared_space`, :mod:`.trace`, :mod:`.density`,
and the training dynamics) never contract two ``N``-vectors, take a norm, draw a random ``N``-vector or
factor an ``[N, s]`` block themselves: they call these helpers with their operator. For an ordinary
operator each helper is the plain expression (``a.T @ b``, ``x.norm()``, ``rademacher(N, m)``,
``torch.linalg.qr``), exactly what the estimators computed before. An operator whose vectors are each
rank's local shards (:class:`~lightning_hessian.sharded.ShardedHessianOperator`) carries a ``shards``
attribute (a :class:`~lightning_hessian.shards.ShardedVectors`); the helpers then contract the local
rows and sum over the ranks, draw each rank's rows of the same global probes, and factor by TSQR, so
the estimators run unchanged on vectors that no rank holds whole. Wrappers of an operator (progress
counting, preconditioning) pass the attribute on.

Example:
    >>> from lightning_hessian.linear_operator import MatrixOperator
    >>> op = MatrixOperator(torch.eye(3))
    >>> inner(op, torch.ones(3, 1), torch.ones(3, 2)), local_rows(op)
    (tensor([[3., 3.]]), 3)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .linear_operator import operator_size
from .probes import rademacher, standard_normal


def shards_of(op: Any) -> Any:
    """The operator's :class:`~lightning_hessian.shards.ShardedVectors`, or ``None`` (whole vectors)."""
    return getattr(op, "shards", None)


def is_sharded(op: Any) -> bool:
    """Whether the operator's vectors are local shards (each rank holds some rows of every vector)."""
    return shards_of(op) is not None


def local_rows(op: Any) -> int:
    """Rows of a vector on this process: ``N``, or the local shard size of a sharded operator."""
    shards = shards_of(op)
    return operator_size(op) if shards is None else shards.local_size


def inner(op: Any, a: Tensor, b: Tensor) -> Tensor:
    """``a.T @ b`` over all ``N`` rows (``a`` ``[n, m]``; ``b`` ``[n, p]`` or ``[n]``)."""
    shards = shards_of(op)
    return a.T @ b if shards is None else shards.inner(a, b)


def dot(op: Any, a: Tensor, b: Tensor) -> Tensor:
    """``torch.dot(a, b)`` of two vectors over all ``N`` rows (a 0-dim tensor)."""
    shards = shards_of(op)
    return torch.dot(a, b) if shards is None else shards.reduce_sum(torch.dot(a, b))


def column_dots(op: Any, a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(0)``: the inner product of each column of ``a`` with the same column of ``b``."""
    shards = shards_of(op)
    return (a * b).sum(0) if shards is None else shards.reduce_sum((a * b).sum(0))


def column_sums(op: Any, x: Tensor) -> Tensor:
    """``x.sum(0)``: the sum of each column of ``x`` ``[n, m]`` over all ``N`` rows."""
    shards = shards_of(op)
    return x.sum(0) if shards is None else shards.reduce_sum(x.sum(0))


def total(op: Any, x: Tensor) -> Tensor:
    """``x.sum()``: the sum of all entries of ``x`` ``[n, ...]`` over all ``N`` rows (a 0-dim tensor)."""
    shards = shards_of(op)
    return x.sum() if shards is None else shards.reduce_sum(x.sum())


def norm(op: Any, x: Tensor) -> Tensor:
    """``x.norm()`` over all ``N`` rows (all entries for a matrix; a 0-dim tensor)."""
    shards = shards_of(op)
    return x.norm() if shards is None else shards.reduce_sum(x.pow(2).sum()).sqrt()


def column_norms(op: Any, x: Tensor, keepdim: bool = False) -> Tensor:
    """``x.norm(dim=0, keepdim=keepdim)``: the norm of each column of ``x`` ``[n, m]``."""
    shards = shards_of(op)
    if shards is None:
        return x.norm(dim=0, keepdim=keepdim)
    return shards.reduce_sum(x.pow(2).sum(0, keepdim=keepdim)).sqrt()


def random_signs(
    op: Any, n: int, m: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``rademacher(n, m, ...)``: ``m`` random-sign probes (this rank's rows of them when sharded)."""
    shards = shards_of(op)
    if shards is None:
        return rademacher(n, m, generator, dtype, device)
    return shards.random("rademacher", m, generator, dtype)


def random_normal(
    op: Any, n: int, m: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``standard_normal(n, m, ...)``: ``m`` normal probes (this rank's rows of them when sharded)."""
    shards = shards_of(op)
    if shards is None:
        return standard_normal(n, m, generator, dtype, device)
    return shards.random("gaussian", m, generator, dtype)


def orthonormalize(op: Any, y: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.qr(y, mode="reduced")`` of an ``[N, s]`` block: ``(Q, R)``."""
    shards = shards_of(op)
    if shards is None:
        q, r = torch.linalg.qr(y, mode="reduced")
        return q, r
    return shards.qr(y)


def all_ranks(op: Any, flag: bool) -> bool:
    """``flag`` where it holds on every rank of a sharded operator (the same answer everywhere)."""
    shards = shards_of(op)
    return flag if shards is None else shards.all_true(flag)
