"""``ShardedHessianOperator``: the Hessian of an FSDP2-sharded module, on vectors that are local shards.

Under FSDP2 (``fully_shard``, e.g. in a LightningModule's ``configure_model`` under Lightning's
``ModelParallelStrategy``) each rank holds a shard of every parameter, so a vector over the parameters
is held the same way (:mod:`lightning_hessian.shards`): ``op @ v`` takes this rank's ``[n_local]`` rows
and returns this rank's rows of ``H v``. Every rank calls every method at the same point (they are
collectives), and every scalar an estimator derives is summed over the ranks, so all ranks run the
same estimator in lockstep and get the same numbers.

Products are central differences of gradients through the sharded module itself (its forward
all-gathers each layer, its backward reduce-scatters the gradient):
``H v ≈ (g(θ + h v) - g(θ - h v)) / (2h)``, with ``g`` the gradient of the size-weighted mean loss
over the union of every rank's batches (NOTE [FSDP2 gradient averaging] in :mod:`.fsdp`). Exact
second derivatives would need double backward through FSDP's collectives, which FSDP2 does not
support. The step ``h`` is that of ``hvp="finite-difference"``
(:func:`lightning_hessian.operator.differences.difference_step`, with global norms); products are
accurate to about ``u^(2/3)`` relative (``u`` the unit roundoff: about 1e-10 in float64, 1e-4 to
1e-5 in float32) on smooth losses. The forwards at ``θ ± h v`` replay the ReLU and max-pool patterns
recorded in the pass at ``θ`` that builds the operator (NOTE [Frozen kinks] in
:mod:`lightning_hessian.operator.kinks`), so that ReLU networks get the Hessian of the exact methods,
not the gradient jumps of kinks crossed within the step; every rank agrees on each product's replay.

About 580 lines, 140 of them docstrings: the sharded operator mirrors the public surface of
:class:`~lightning_hessian.HessianOperator` (products, loss, gradient, per-batch sharpness, restrict),
and keeps the replay of frozen kinks (about 90 lines), whose every decision is a collective taken
between its own passes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .batches import BatchSizeFn
from .closure import LossClosure, LossFn
from .distributed import agree_on_failure, all_finite, all_reduce_or_raise
from .errors import NonFiniteHessianError
from .fsdp import ShardedRunner, fsdp_modules
from .memory import available_memory
from .operator.differences import FINITE_DIFFERENCE, difference_step
from .operator.kinks import (
    PATTERN_MEMORY_SHARE,
    FrozenKinks,
    KinkPatterns,
    compiled_submodules,
    warn_unfrozen,
)
from .operator.selection import MatrixMethod, MethodChoice
from .parameters import ParameterSpace, Patterns, select_parameters
from .shards import ShardedVectors, ShardLayout, dtensor_class
from .validation import check_choice

#: ``hvp=`` values a sharded operator takes: products are always gradient differences.
SHARDED_HVP = ("auto", "finite-difference")


def _check_sharding(selected: dict[str, nn.Parameter]) -> Any:
    """The 1-D device mesh every selected parameter is sharded on (dimension 0); raise otherwise."""
    dtensor = dtensor_class()
    meshes = []
    for name, p in selected.items():
        if dtensor is None or not isinstance(p, dtensor):
            raise ValueError(
                f"Parameter {name!r} is not sharded while others are: under FSDP2 apply fully_shard "
                "to a module that holds every trained parameter (e.g. the root), or select the sharded "
                "ones with `params=`."
            )
        placements = [type(pl).__name__ + str(getattr(pl, "dim", "")) for pl in p.placements]
        if p.device_mesh.ndim != 1 or placements != ["Shard0"]:
            raise ValueError(
                f"Parameter {name!r} is placed as {p.placements} on a {p.device_mesh.ndim}-D mesh; the "
                "sharded Hessian supports FSDP2's data-parallel sharding only (Shard(0) on a 1-D mesh: "
                "ModelParallelStrategy(data_parallel_size=W, tensor_parallel_size=1), no HSDP or "
                "tensor parallelism)."
            )
        meshes.append(p.device_mesh)
    if any(mesh != meshes[0] for mesh in meshes):
        raise ValueError("The selected parameters are sharded on different device meshes; use one mesh.")
    return meshes[0]


class ShardedHessianOperator:
    """The Hessian of the loss of an FSDP2-sharded module w.r.t. its parameters, on local-shard vectors.

    ``L`` is the size-weighted mean of the batch losses over every rank's batches
    (``reduction="mean"``) or their sum (``"sum"``): the same Hessian a
    :class:`~lightning_hessian.HessianOperator` gives under DDP, from gradient differences (see the
    module docstring). ``op @ v`` multiplies this rank's rows ``[n_local]`` (or ``[n_local, m]``) of
    global vectors and returns this rank's rows of the products; every method is a collective. The
    operator is taken at the parameters' values when it is constructed (their local shards are
    copied); each product writes ``θ ± h v`` into the module's shards and puts back, bit for bit, what
    was there, with ``.grad``, buffers, modes and random generators.

    Args:
        model: A module whose selected parameters FSDP2 shards (``fully_shard``) on a 1-D mesh.
        loss_fn: ``loss_fn(module, batch) -> scalar``; ``None`` uses a LightningModule's
            ``training_step``.
        data: This rank's batches.
        params: Glob pattern(s) on parameter names; default all trainable parameters.
        mode: ``"eval"`` (default) or ``"train"``.
        dtype: Must be ``None`` or the parameters' dtype (the sharded module computes in its own).
        batch_size_fn: ``batch -> number of samples``.
        hvp: ``"auto"`` or ``"finite-difference"``: both are gradient differences.
        process_group: Not used: sums run over the parameters' device mesh (accepted so that the
            arguments match :class:`~lightning_hessian.HessianOperator`'s).
        reduction: ``"mean"`` or ``"sum"`` (see :class:`~lightning_hessian.HessianOperator`).

    Raises:
        ValueError: For parameters not sharded by FSDP2 on one 1-D mesh, another ``dtype``, an exact
            ``hvp``, or a loss that does not depend on the parameters (agreed by every rank).
        RankFailedError: On every rank but the failing ones, when building failed on some rank.

    Example:
        >>> op = ShardedHessianOperator(fsdp_model, loss_fn, local_batches)  # doctest: +SKIP
        >>> v = op.shards.random("rademacher", 1, generator, op.dtype)[:, 0]  # doctest: +SKIP
        >>> hv = op @ v  # this rank's rows of H v  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None = None,
        data: Iterable[Any] | None = None,
        *,
        params: Patterns = None,
        mode: str = "eval",
        dtype: torch.dtype | None = None,
        batch_size_fn: BatchSizeFn | None = None,
        hvp: str = "auto",
        process_group: Any = "auto",
        reduction: str = "mean",
    ) -> None:
        check_choice(
            "hvp",
            hvp,
            SHARDED_HVP,
            "A sharded module's products are gradient differences (FSDP2 has no double backward): "
            f"use one of {SHARDED_HVP}.",
        )
        if data is None:
            raise ValueError("`data` is required: an iterable of this rank's batches.")
        selected = select_parameters(model, params)
        mesh = _check_sharding(selected)
        group = mesh.get_group() if mesh.size() > 1 else None
        first = next(iter(selected.values()))
        device = first.device
        error: BaseException | None = None
        closure = None
        try:
            dtypes = {p.dtype for p in selected.values()}
            if len(dtypes) > 1 or (dtype is not None and dtype not in dtypes):
                raise ValueError(
                    f"The sharded parameters are {sorted(map(str, dtypes))}; a sharded module computes "
                    f"in its parameters' dtype, so `dtype` must be None or that dtype, got {dtype}. "
                    "Train with float32 parameters (e.g. Trainer(precision='bf16-mixed') or '32-true')."
                )
            if not fsdp_modules(model):
                raise ValueError(
                    f"{type(model).__name__} has DTensor parameters but no FSDP2 module; the sharded "
                    "Hessian runs the module through FSDP2's fully_shard."
                )
            closure = LossClosure(
                model, loss_fn, data, mode=mode, dtype=None, batch_size_fn=batch_size_fn, reduction=reduction
            )
        except Exception as caught:
            if group is None:
                raise
            error = caught
        counts = agree_on_failure(
            error,
            group,
            device=device,
            values=[0 if closure is None else closure.num_samples],
            what="Building the sharded Hessian operator",
        )
        counts.raise_error()
        assert closure is not None
        most = agree_on_failure(None, group, device=device, values=[len(closure.batches)], op="max")
        self._build(closure, selected, mesh, group, int(counts.values[0]), int(most.values[0]))

    def _build(
        self,
        closure: LossClosure,
        selected: dict[str, nn.Parameter],
        mesh: Any,
        group: Any,
        num_samples: int,
        slots: int,
    ) -> None:
        self.closure = closure
        self.num_samples = num_samples
        self.num_matvecs = 0
        self._slots = slots  # forwards per pass on every rank: the most batches any rank holds
        self._mesh = mesh
        self._group = group
        rank = mesh.get_local_rank() if mesh.size() > 1 else 0
        self.space = ParameterSpace(tuple(selected), tuple(p.shape for p in selected.values()))
        shapes = dict(zip(self.space.names, self.space.shapes, strict=True))
        self.layout = ShardLayout(shapes, rank, mesh.size())
        device = next(iter(selected.values())).device
        self.shards = ShardedVectors(self.layout, group, device)
        self._runner = ShardedRunner(closure, selected, group, device, mesh.size())
        self._theta = self._runner.shards()
        for item in self.layout.slices:
            if tuple(self._theta[item.name].shape) != tuple(item.local_shape):
                raise ValueError(
                    f"Parameter {item.name!r}: local shard {tuple(self._theta[item.name].shape)} on rank "
                    f"{rank}, expected rows [{item.start}, {item.stop}) of {tuple(item.shape)} (FSDP2's "
                    "dimension-0 chunks)."
                )
        self.local_space = ParameterSpace.from_tensors(self._theta)
        squares = torch.stack([t.double().pow(2).sum() for t in self._theta.values()])
        self._lengths = (1 + self.shards.reduce_sum(squares).sqrt()).tolist()
        self._names = self.space.names
        self._warn_mixed_precision()
        compiled = compiled_submodules(closure.model)
        self._kinks_off: str | None = f"compiled modules {compiled}" if compiled else None
        self._patterns: dict[int, KinkPatterns] | None = None  # kept, else recorded for each product
        recordings: dict[int, FrozenKinks] = {}
        recorder = self._recorder(recordings) if self._kinks_off is None else None
        loss, grads = self._runner.run(self._all_slots(), self._theta, kinks=recorder)
        assert grads is not None
        if recorder is not None:
            self._keep_patterns(recordings)
        self._loss = loss
        self._gradient = torch.cat([grads[n].reshape(-1) for n in self._names])
        used = torch.tensor([float(bool(g.any())) for g in grads.values()], dtype=torch.float64)
        self._used = dict(zip(self._names, (self.shards.reduce_sum(used) > 0).tolist(), strict=True))

    def _warn_mixed_precision(self) -> None:
        for module in self._runner.modules:
            policy = getattr(module._get_fsdp_state(), "_mp_policy", None)
            low = getattr(policy, "param_dtype", None)
            if low is not None and low != self.dtype:
                warnings.warn(
                    f"FSDP2 computes in {low} (MixedPrecisionPolicy) while the parameters are {self.dtype}: "
                    "gradient differences then carry that precision's rounding (about 1e-2 relative in "
                    "bfloat16).",
                    UserWarning,
                    stacklevel=4,
                )
                return

    def _all_slots(self) -> list[tuple[int, float]]:
        """Every local batch with its weight, padded with weight-0 forwards to the agreed count."""
        slots = [(i, self.closure.weight(i, self.num_samples)) for i in range(self.num_batches)]
        return slots + [(0, 0.0)] * (self._slots - len(slots))

    # ---------------------------------------------------------------------------------- protocol
    @property
    def shape(self) -> tuple[int, int]:
        """``(N, N)`` with ``N`` the number of selected parameters (global, over all shards)."""
        n = self.space.numel
        return (n, n)

    @property
    def local_size(self) -> int:
        """Rows of a vector on this rank (``n_local``)."""
        return self.layout.local_size

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the products (the parameters')."""
        return next(iter(self._theta.values())).dtype

    @property
    def device(self) -> torch.device:
        """Device of the local shards."""
        return next(iter(self._theta.values())).device

    @property
    def num_batches(self) -> int:
        """Number of local batches."""
        return len(self.closure.batches)

    @property
    def depends_on_parameters(self) -> bool:
        """Whether the loss has a gradient w.r.t. any of these parameters on any rank."""
        return any(self._used[n] for n in self._names)

    @property
    def choice(self) -> MethodChoice:
        """The product method: always gradient differences (FSDP2 has no double backward)."""
        return MethodChoice(FINITE_DIFFERENCE, MatrixMethod(FINITE_DIFFERENCE))

    @property
    def parameters(self) -> dict[str, Tensor]:
        """Copies of the local shards the Hessian is taken at."""
        return {n: self._theta[n] for n in self._names}

    def __repr__(self) -> str:
        return (
            f"ShardedHessianOperator(N={self.shape[0]}, local={self.local_size}, batches={self.num_batches}, "
            f"samples={self.num_samples}, dtype={self.dtype}, method=finite-difference)"
        )

    def inner(self, a: Tensor, b: Tensor) -> Tensor:
        """``a.T @ b`` of global vectors from this rank's rows ``a`` ``[n_local, m]``, ``b``
        ``[n_local, p]``: the local contraction summed over the ranks (a collective).

        Example:
            >>> gram = op.inner(basis, basis)  # [m, m], the same on every rank  # doctest: +SKIP
        """
        return self.shards.inner(a, b)

    def restrict(self, names: Iterable[str]) -> ShardedHessianOperator:
        """The operator of a diagonal block: the Hessian w.r.t. a subset of the parameters.

        It shares this operator's batches, point and cached gradient; its products still run a full
        forward and backward.

        Args:
            names: Parameter names (a subset of ``op.space.names``).

        Returns:
            A :class:`ShardedHessianOperator` over those parameters, in this operator's flat order.

        Raises:
            ValueError: If a name is not one of this operator's parameters.
        """
        wanted = set(names)
        unknown = sorted(wanted - set(self._names))
        if unknown or not wanted:
            raise ValueError(f"Unknown or empty parameter names for a block: {unknown or list(wanted)}.")
        block = ShardedHessianOperator.__new__(ShardedHessianOperator)
        block.__dict__.update(self.__dict__)
        keep = [n for n in self._names if n in wanted]
        block.num_matvecs = 0
        block._names = tuple(keep)
        index = [self._names.index(n) for n in keep]
        block.space = ParameterSpace(tuple(keep), tuple(self.space.shapes[i] for i in index))
        block.layout = ShardLayout(
            dict(zip(block.space.names, block.space.shapes, strict=True)), self.layout.rank, self.layout.world
        )
        block.shards = ShardedVectors(block.layout, self._group, self.device)
        block.local_space = ParameterSpace.from_tensors({n: self._theta[n] for n in keep})
        block._lengths = [self._lengths[i] for i in index]
        parts = self.layout.split(self._gradient)
        block._gradient = torch.cat([parts[n].reshape(-1) for n in keep])
        return block

    def release_graphs(self) -> None:
        """Nothing to free: products keep no graph."""

    # ---------------------------------------------------------------------------------- values
    def loss(self, displacement: Tensor | None = None) -> float:
        """The loss over all batches and ranks at the operator's parameters (plus ``displacement``).

        Args:
            displacement: Optional ``[n_local]`` rows of a step: the loss is then taken at
                ``θ + displacement`` (one forward per batch).

        Raises:
            NonFiniteHessianError: If it is NaN or infinite (on every rank).
            ValueError: If ``displacement`` is not of shape ``[n_local]``.
        """
        if displacement is None:
            local = self._loss
        else:
            if displacement.shape != (self.local_size,):
                raise ValueError(
                    f"`displacement` must have shape [{self.local_size}] (this rank's rows), got "
                    f"{tuple(displacement.shape)}."
                )
            point = self._point(displacement.to(device=self.device, dtype=self.dtype), 1.0)
            local, _ = self._runner.run(self._all_slots(), point, gradient=False)
        return float(
            all_reduce_or_raise(
                lambda: torch.tensor([local], dtype=torch.float64, device=self.device),
                self._group,
                shape=(1,),
                dtype=torch.float64,
                device=self.device,
                what="The loss",
            )
        )

    def gradient(self) -> Tensor:
        """This rank's rows ``[n_local]`` of the gradient of the loss over all batches and ranks.

        Raises:
            NonFiniteHessianError: If it is NaN or infinite (on any rank).
        """
        self._check_finite(self._gradient, "The gradient")
        return self._gradient.clone()

    def _point(self, direction: Tensor, step: float) -> dict[str, Tensor]:
        """``θ + step * direction`` on every selected tensor (``direction`` in this block's layout)."""
        point = dict(self._theta)
        for name, part in self.layout.split(direction).items():
            point[name] = torch.add(self._theta[name], part, alpha=step)
        return point

    def _check_finite(self, local: Tensor, what: str) -> None:
        """Raise :class:`NonFiniteHessianError` on every rank when ``local`` is not finite on any."""
        bad = not all_finite(local)
        agreed = agree_on_failure(None, self._group, device=self.device, values=[float(bad)])
        if agreed.values[0] > 0:
            where = "this rank" if bad else "another rank"
            raise NonFiniteHessianError(
                f"{what} is not finite (first seen on {where}). Check the loss for NaN/inf at these "
                "parameters and batches."
            )

    # ---------------------------------------------------------------------------------- products
    def __matmul__(self, other: Tensor) -> Tensor:
        """``H @ v`` for this rank's rows ``[n_local]`` of ``v``, or ``[n_local, m]`` of ``V``.

        Raises:
            ValueError: If the shape does not match ``n_local``.
            NonFiniteHessianError: If a product is not finite (on any rank).
        """
        if not isinstance(other, Tensor):
            return NotImplemented
        n = self.local_size
        if other.ndim not in (1, 2) or other.shape[0] != n:
            raise ValueError(
                f"Expected this rank's rows of a vector, [{n}] or [{n}, m], got {tuple(other.shape)}."
            )
        with torch.inference_mode(False):
            other = other.to(device=self.device, dtype=self.dtype)
            if other.ndim == 1:
                return self._product(other)
            out = torch.empty_like(other)
            for j in range(other.shape[1]):
                out[:, j] = self._product(other[:, j].contiguous())
            return out

    def _product(self, vector: Tensor) -> Tensor:
        """One product from a central difference of two gradient passes (every rank, in lockstep)."""
        parts = self.layout.split(vector)
        squares = torch.stack([p.double().pow(2).sum() for p in parts.values()])
        norms = self.shards.reduce_sum(squares).sqrt().tolist()
        self.num_matvecs += 1
        if not any(norms):
            return torch.zeros_like(vector)
        if not all(math.isfinite(x) for x in norms):
            raise NonFiniteHessianError("A Hessian-vector product's direction is not finite (on some rank).")
        step = difference_step(self.dtype, self._lengths, norms)
        plus, minus = self._gradients_along(self._all_slots(), vector, step)
        product = torch.cat([(plus[n] - minus[n]).reshape(-1) for n in self._names]) / (2 * step)
        self._check_finite(product, "A Hessian-vector product")
        return product

    def batch_sharpness(self) -> tuple[float, int]:
        """The sum over every rank's batches ``b`` of ``g_bᵀ H_b g_b / ||g_b||²``, and their number.

        Under FSDP2 a backward always sums the gradients of all ranks, so each batch gets passes of
        its own in which the other ranks contribute weight 0: ``W B`` gradients and as many products
        (three passes per batch, one forward per rank each).

        Returns:
            ``(sum over batches, number of batches)``, the same on every rank.

        Raises:
            NonFiniteHessianError: If a gradient or product is not finite (on any rank).
        """
        world = self.layout.world
        counts = torch.zeros(world, dtype=torch.float64)
        counts[self.layout.rank] = self.num_batches
        counts = self.shards.reduce_sum(counts)
        total, batches = 0.0, 0
        for owner in range(world):
            for index in range(int(counts[owner])):
                mine = owner == self.layout.rank
                slots = [(index, 1.0) if mine else (0, 0.0)]
                _, grads = self._runner.run(slots, self._theta)
                assert grads is not None
                g = torch.cat([grads[n].reshape(-1) for n in self._names])
                self._check_finite(g, "A batch gradient")
                squared = float(self.shards.reduce_sum(g.double().pow(2).sum()))
                batches += 1
                if squared <= 0:
                    continue
                parts = self.layout.split(g)
                norms = self.shards.reduce_sum(torch.stack([p.double().pow(2).sum() for p in parts.values()]))
                step = difference_step(self.dtype, self._lengths, norms.sqrt().tolist())
                plus, minus = self._gradients_along(slots, g, step)
                hg = torch.cat([(plus[n] - minus[n]).reshape(-1) for n in self._names]) / (2 * step)
                self._check_finite(hg, "A batch Hessian-vector product")
                total += float(self.shards.reduce_sum((g * hg).double().sum())) / squared
        return total, batches

    # ---------------------------------------------------------------------------------- frozen kinks
    def _gradients_along(
        self, slots: list[tuple[int, float]], direction: Tensor, step: float
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The gradient shards at ``θ ± step direction``, with the patterns at ``θ`` replayed (NOTE
        [Frozen kinks]); both again, unfrozen, where any rank's replay did not match.
        """
        while True:
            patterns = self._replayable(slots)
            modes: list[FrozenKinks] = []
            replay = None if patterns is None else self._replayer(patterns, modes)
            _, plus = self._runner.run(slots, self._point(direction, step), kinks=replay)
            _, minus = self._runner.run(slots, self._point(direction, -step), kinks=replay)
            assert plus is not None and minus is not None
            if replay is None or not self._any_mismatch(modes):
                return plus, minus

    def _recorder(self, recordings: dict[int, FrozenKinks]) -> Any:
        """Modes that record each local batch's first forward (the padding forwards run unrecorded)."""

        def mode(index: int) -> FrozenKinks | None:
            if index in recordings:
                return None
            recordings[index] = FrozenKinks()
            return recordings[index]

        return mode

    @staticmethod
    def _replayer(patterns: dict[int, KinkPatterns], modes: list[FrozenKinks]) -> Any:
        def mode(index: int) -> FrozenKinks | None:
            if not len(patterns.get(index, ())):
                return None
            modes.append(FrozenKinks(patterns[index]))
            return modes[-1]

        return mode

    def _keep_patterns(self, recordings: dict[int, FrozenKinks]) -> None:
        """Keep the patterns recorded at ``θ`` while they fit in memory; every rank takes the same
        decision (a recording that cannot be replayed anywhere, or none at all, switches freezing off).
        """
        reasons = [m.mismatch for m in recordings.values() if m.mismatch is not None]
        patterns = {i: m.patterns for i, m in recordings.items()}
        free = available_memory(self.device)
        nbytes = sum(p.nbytes for p in patterns.values())
        local = [float(bool(reasons)), float(sum(len(p) for p in patterns.values()))]
        local.append(float(free is not None and nbytes > PATTERN_MEMORY_SHARE * free))
        unreplayable, count, too_big = agree_on_failure(
            None, self._group, device=self.device, values=local
        ).values
        if unreplayable:
            self._switch_off(reasons[0] if reasons else "another rank's recording cannot be replayed")
        elif not count:
            self._kinks_off = "no kinked call"
        elif not too_big:
            self._patterns = patterns

    def _replayable(self, slots: list[tuple[int, float]]) -> dict[int, KinkPatterns] | None:
        """The patterns to replay: the kept ones, or ones recorded now in a forward pass at ``θ``."""
        if self._kinks_off is not None or self._patterns is not None:
            return self._patterns if self._kinks_off is None else None
        recordings: dict[int, FrozenKinks] = {}
        self._runner.run(slots, self._theta, gradient=False, kinks=self._recorder(recordings))
        return {i: m.patterns for i, m in recordings.items()}

    def _any_mismatch(self, modes: list[FrozenKinks]) -> bool:
        """Whether any rank's replay did not match its recording (then freezing is off, on every rank)."""
        reason = next((m.mismatch for m in modes if m.mismatch is not None), None)
        agreed = agree_on_failure(None, self._group, device=self.device, values=[float(reason is not None)])
        if not agreed.values[0]:
            return False
        self._switch_off(reason or "another rank's forward did not follow its recording")
        return True

    def _switch_off(self, reason: str) -> None:
        self._kinks_off, self._patterns = reason, None
        warn_unfrozen(reason, "This sharded operator's", stacklevel=6)

    def to_dense(self) -> Tensor:
        """Refused: a dense ``[N, N]`` Hessian of a sharded model is not computed.

        Raises:
            ValueError: Always, naming the iterative alternatives.
        """
        raise ValueError(
            "The dense Hessian of a sharded model is not computed: it is an N x N matrix on every rank "
            f"(N = {self.shape[0]}), which defeats the sharding. Use the iterative estimators "
            "(lh.eigenvalues, lh.trace, lh.spectral_density; lh.analyze with method='auto' or "
            "'iterative'), which work on each rank's shards."
        )
