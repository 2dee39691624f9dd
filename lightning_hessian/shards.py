"""Vectors that are each rank's local shards of the parameters (FSDP2): layout, contractions, probes, QR.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter is a ``DTensor`` sharded on its
first dimension over a 1-D device mesh: rank ``r`` of ``W`` holds rows ``[r c, min(d0, (r+1) c))`` with
``c = ceil(d0 / W)`` (``torch.chunk``; the last ranks may hold fewer rows, or none). A vector over the
parameters is then held the same way: each rank keeps, for every parameter in ``named_parameters()``
order, its own rows, flattened and concatenated: ``[n_local]`` entries of the global ``[N]`` vector,
and no rank ever holds the whole vector.

- :class:`ShardLayout` (no communication, so testable on one process): which global entries a rank
  holds, and random probes drawn so that the *global* probe is the same whatever the number of ranks:
  each parameter's full ``[numel, m]`` block is drawn in turn from the seeded generator, and the rank
  keeps its rows (memory: one parameter tensor at a time, never ``N``). On CPU (torch 2.13) the
  probes are even those of an unsharded :class:`~lightning_hessian.HessianOperator` with the same
  seed, which draws all ``N`` rows in one call: both kinds consume the generator entry by entry
  (:mod:`lightning_hessian.probes`).
- :class:`ShardedVectors`: the layout on a process group: contractions ``a.T @ b`` summed over ranks,
  QR of a tall ``[n_local, s]`` block (TSQR: local QR, then QR of the stacked ``R`` factors), and
  agreement on yes/no decisions, so that every rank takes the same branch of an estimator.

Estimators reach these through :mod:`lightning_hessian.contractions`. :func:`has_sharded_parameters`
tells a sharded model (``DTensor`` parameters) apart, and :func:`refuse_sharded_parameters` stops the
paths that need whole parameters (``HessianOperator``, dense Hessians) with a message.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .distributed import reduce_device
from .probes import rademacher, standard_normal

#: Kinds of random probes: random signs (Hutchinson, SLQ) and standard normal entries (restarts, XTrace).
PROBE_KINDS = ("rademacher", "gaussian")


def dtensor_class() -> type | None:
    """``torch.distributed.tensor.DTensor``, or ``None`` where this torch has no distributed support."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed support
        return None
    return DTensor


def has_sharded_parameters(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (FSDP2's ``fully_shard``, tensor parallelism).

    Example:
        >>> has_sharded_parameters(nn.Linear(2, 2))
        False
    """
    dtensor = dtensor_class()
    return dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters())


def refuse_sharded_parameters(model: nn.Module, what: str) -> None:
    """Refuse a sharded model where every parameter must be whole on this process.

    Args:
        model: The module.
        what: What needs whole parameters (for the message).

    Raises:
        ValueError: If a parameter is a ``DTensor``, naming the sharded alternatives.
    """
    if has_sharded_parameters(model):
        raise ValueError(
            f"{what} needs every parameter whole on this process, but {type(model).__name__}'s "
            "parameters are sharded (DTensor, e.g. FSDP2's fully_shard). Use lh.analyze (method="
            "'iterative') or lh.ShardedHessianOperator, whose vectors are each rank's shards; dense "
            "Hessians of a sharded model are not computed (an N x N matrix on every rank)."
        )


@dataclass(frozen=True)
class ShardSlice:
    """One parameter's rows on one rank.

    Attributes:
        name: Parameter name.
        shape: The parameter's global shape.
        start: First global row (dimension 0) held here.
        stop: One past the last row held here (``start == stop`` for an empty shard).
        offset: Where the parameter starts in the local vector.
    """

    name: str
    shape: torch.Size
    start: int
    stop: int
    offset: int

    @property
    def row_numel(self) -> int:
        """Entries per row (dimension 0) of the parameter."""
        return int(math.prod(self.shape[1:]))

    @property
    def numel(self) -> int:
        """Entries of the whole parameter."""
        return int(math.prod(self.shape))

    @property
    def local_numel(self) -> int:
        """Entries held here."""
        return (self.stop - self.start) * self.row_numel

    @property
    def local_shape(self) -> torch.Size:
        """Shape of the local shard."""
        return torch.Size((self.stop - self.start, *self.shape[1:]))


def shard_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of dimension 0 that rank ``rank`` of ``world`` holds (``torch.chunk``).

    Args:
        rows: Size of dimension 0.
        rank: The rank in the mesh.
        world: Ranks in the mesh.

    Returns:
        ``(start, stop)``; empty (``start == stop``) on ranks beyond the last chunk.

    Example:
        >>> [shard_rows(3, r, 2) for r in range(2)]
        [(0, 2), (2, 3)]
    """
    chunk = -(-rows // world) if rows else 0
    start = min(rows, rank * chunk)
    return start, min(rows, start + chunk)


class ShardLayout:
    """Which entries of the global parameter vector one rank holds (FSDP2's dimension-0 sharding).

    Args:
        shapes: Global shape of each parameter, in flat order.
        rank: This rank in the mesh.
        world: Ranks in the mesh.

    Raises:
        ValueError: If ``rank`` is not in ``[0, world)``.

    Example:
        >>> layout = ShardLayout({"w": torch.Size([3, 2]), "b": torch.Size([3])}, rank=1, world=2)
        >>> layout.local_size, layout.global_size, layout.global_indices().tolist()
        (3, 9, [4, 5, 8])
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]], rank: int, world: int) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"`rank` must be in [0, {world}), got {rank}.")
        self.rank, self.world = rank, world
        slices, offset = [], 0
        for name, shape in shapes.items():
            size = torch.Size(shape)
            if len(size) == 0:
                raise ValueError(f"Parameter {name!r} is a scalar; FSDP2 shards tensors of dimension >= 1.")
            start, stop = shard_rows(size[0], rank, world)
            item = ShardSlice(name, size, start, stop, offset)
            slices.append(item)
            offset += item.local_numel
        self.slices: tuple[ShardSlice, ...] = tuple(slices)
        self.local_size = offset
        self.global_size = sum(item.numel for item in self.slices)
        self._shapes = {item.name: item.shape for item in self.slices}

    def local_sizes(self) -> list[int]:
        """The local size of every rank of the mesh, in rank order (computed, not communicated)."""
        if self.world == 1:
            return [self.local_size]
        return [ShardLayout(self._shapes, r, self.world).local_size for r in range(self.world)]

    @property
    def names(self) -> tuple[str, ...]:
        """Parameter names in flat order."""
        return tuple(item.name for item in self.slices)

    def split(self, vector: Tensor) -> dict[str, Tensor]:
        """The local vector ``[n_local]`` (or ``[n_local, m]``) as local-shard-shaped views per parameter."""
        out = {}
        for item in self.slices:
            part = vector[item.offset : item.offset + item.local_numel]
            out[item.name] = part.reshape(item.local_shape) if vector.ndim == 1 else part
        return out

    def global_indices(self) -> Tensor:
        """``[n_local]`` global flat index of every local entry (int64)."""
        pieces, base = [], 0
        for item in self.slices:
            first = base + item.start * item.row_numel
            pieces.append(torch.arange(first, first + item.local_numel))
            base += item.numel
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)

    def random(
        self, kind: str, m: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        """This rank's rows of ``m`` random global probes, the same global probes for any ``world``.

        Each parameter's full ``[numel, m]`` block is drawn in turn (in flat order) and the rank keeps
        its rows, so every rank advances the generator alike and the probes of one rank of ``W`` are
        rows of those of one process.

        Args:
            kind: ``"rademacher"`` (random signs) or ``"gaussian"`` (standard normal).
            m: Probes (columns).
            generator: The seeded generator (on ``device``), advanced by ``N m`` draws on every rank.
            dtype: Element type.
            device: Device.

        Returns:
            ``[n_local, m]``.

        Raises:
            ValueError: For an unknown ``kind``.
        """
        if kind not in PROBE_KINDS:
            raise ValueError(f"`kind` must be one of {PROBE_KINDS}, got {kind!r}.")
        out = torch.empty(self.local_size, m, dtype=dtype, device=device)
        for item in self.slices:
            if kind == "rademacher":
                full = rademacher(item.numel, m, generator, dtype, device)
            else:
                full = standard_normal(item.numel, m, generator, dtype, device)
            first = item.start * item.row_numel
            out[item.offset : item.offset + item.local_numel] = full[first : first + item.local_numel]
        return out

    def unit_columns(self, start: int, stop: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """This rank's rows of the identity columns ``[start, stop)`` of the global ``[N, N]`` identity."""
        index = self.global_indices().to(device)
        wanted = torch.arange(start, stop, device=device)
        return (index[:, None] == wanted[None, :]).to(dtype)


class ShardedVectors:
    """A :class:`ShardLayout` on a process group: contractions over ``N`` summed over the ranks.

    Every method is a collective: every rank of ``group`` must call it at the same point.

    Args:
        layout: This rank's layout.
        group: The mesh's process group (``None``: a single process).
        device: Device of the vectors.

    Example:
        >>> vectors = ShardedVectors(ShardLayout({"w": torch.Size([4])}, 0, 1), None, torch.device("cpu"))
        >>> vectors.inner(torch.ones(4, 1), torch.ones(4, 2))
        tensor([[4., 4.]])
    """

    def __init__(self, layout: ShardLayout, group: Any, device: torch.device) -> None:
        self.layout, self.group, self.device = layout, group, torch.device(device)

    @property
    def local_size(self) -> int:
        """Entries of a vector held on this rank."""
        return self.layout.local_size

    def reduce_sum(self, local: Tensor) -> Tensor:
        """The sum over ranks of a small local tensor (same dtype and device)."""
        if self.group is None:
            return local
        buffer = local.detach().to(reduce_device(self.group, self.device)).contiguous()
        dist.all_reduce(buffer, group=self.group)
        return buffer.to(local.device)

    def inner(self, a: Tensor, b: Tensor) -> Tensor:
        """``a.T @ b`` of the global vectors: ``[m, p]`` for ``a`` ``[n_local, m]``, ``b`` ``[n_local, p]``
        (a 1-D ``b`` gives ``[m]``).
        """
        return self.reduce_sum(a.T @ b)

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (the same answer on all of them)."""
        local = torch.tensor([0.0 if flag else 1.0], dtype=torch.float64, device=self.device)
        return float(self.reduce_sum(local)) == 0.0

    def random(self, kind: str, m: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
        """``[n_local, m]`` rows of random global probes (see :meth:`ShardLayout.random`)."""
        return self.layout.random(kind, m, generator, dtype, self.device)

    def unit_columns(self, start: int, stop: int, dtype: torch.dtype) -> Tensor:
        """``[n_local, stop - start]``: this rank's rows of the global identity columns ``[start, stop)``."""
        return self.layout.unit_columns(start, stop, dtype, self.device)

    def qr(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Reduced QR of the global ``[N, s]`` matrix whose rows ``y`` ``[n_local, s]`` this rank holds.

        TSQR: each rank factors its rows (``k_r = min(n_r, s)`` columns), the ``[k_r, s]`` factors of
        all ranks are stacked (one all-reduce; every rank knows every ``n_r`` from the layout) and
        factored again; ``Q``'s local rows are the local ``Q`` times this rank's rows of the second
        ``Q``. Both factors have orthonormal columns, so ``Q`` does too, also for rank-deficient ``y``
        (``R`` then has tiny diagonal entries), as with Householder QR on one process. Every rank gets
        the same ``R``.

        Returns:
            ``(q [n_local, k], r [k, s])`` with ``k = min(N, s)``, ``q.T @ q = I`` over the ranks and
            ``y = q @ r``.
        """
        s = y.shape[1]
        counts = [min(n, s) for n in self.layout.local_sizes()]
        first = sum(counts[: self.layout.rank])
        stacked = torch.zeros(sum(counts), s, dtype=y.dtype, device=y.device)
        q_local, r_local = torch.linalg.qr(y, mode="reduced")  # [n, k_r], [k_r, s]
        stacked[first : first + r_local.shape[0]] = r_local
        q2, r = torch.linalg.qr(self.reduce_sum(stacked), mode="reduced")
        return q_local @ q2[first : first + q_local.shape[1]], r
