"""Running an FSDP2 module for its Hessian: shards set to a point, guarded forward passes, gradient shards.

The only module that touches FSDP2 (``torch.distributed.fsdp.fully_shard``) itself. A pass of
:class:`ShardedRunner` writes a point into the parameters' local shards, runs the loss through the
module's own forward (FSDP all-gathers each layer's parameters) and backward (FSDP reduce-scatters
each rank's gradient, so every rank gets its shard of the gradient summed over the ranks), reads the
gradient shards, and puts back, bit for bit, the shards, ``.grad``, buffers, modes and random
generators it found.

# NOTE [FSDP2 gradient averaging]
FSDP2 divides the reduce-scattered gradient by its ``gradient_divide_factor``: by default the number of
data-parallel ranks ``W`` (``set_gradient_divide_factor`` changes it). A pass wants the gradient of the
size-weighted mean loss over the union of all ranks' batches, ``sum_r sum_b (n_b / n) L_b`` (or the
plain sum for ``reduction="sum"``), so each batch's loss is multiplied by its weight times that factor
before ``backward``. The factor is read from FSDP's parameter groups (a private attribute, with the
mesh size as the fallback).

# NOTE [Failures inside a sharded forward]
Under DDP a failing rank still joins the all-reduce of each product. Under FSDP2 the collectives are
inside the module's forward: a rank that raises in the middle of it (an out-of-memory error, a
``loss_fn`` that raises on one rank) leaves the others waiting in the next layer's all-gather. So
every forward runs under hooks that record which FSDP modules have all-gathered; a rank that fails
completes the all-gathers of the modules it did not reach (in the order of the last complete
forward), then every rank agrees on the outcome (one small all-reduce) before any backward, resets
FSDP's per-iteration state (``FSDPModule.reset_iter_state``, torch >= 2.13) and raises together. This
covers exceptions raised in the user's code or in a layer's computation; an exception inside
FSDP's own collectives, inside backward, or with explicit forward prefetching
(``set_modules_to_forward_prefetch``) cannot be recovered this way. A NaN or infinite loss needs no
recovery: it flows through the collectives and the products' agreed checks raise on every rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .closure import LossClosure
from .distributed import agree_on_failure
from .operator.kinks import FrozenKinks


def fsdp_class() -> type | None:
    """``torch.distributed.fsdp.FSDPModule``, or ``None`` where this torch has no FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed support
        return None
    return FSDPModule


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 modules (``fully_shard`` applied) among ``model.modules()``, in registration order."""
    cls = fsdp_class()
    return [] if cls is None else [m for m in model.modules() if isinstance(m, cls)]


def root_modules(modules: Sequence[nn.Module]) -> list[nn.Module]:
    """The FSDP2 modules not inside another one: the roots whose per-iteration state can be reset."""
    inner = {id(child) for m in modules for child in m.modules() if child is not m}
    return [m for m in modules if id(m) not in inner]


def _param_groups(module: nn.Module) -> list[Any]:
    state = module._get_fsdp_state()  # private: see NOTE [FSDP2 gradient averaging]
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # torch < 2.9: one group per state
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return list(groups)


def gradient_divide_factor(modules: Sequence[nn.Module], mesh_size: int) -> float:
    """What FSDP2 divides the summed gradients by (NOTE [FSDP2 gradient averaging]).

    Args:
        modules: The FSDP2 modules.
        mesh_size: Ranks of the data-parallel mesh (the default factor).

    Returns:
        The factor shared by all parameter groups.

    Raises:
        ValueError: If the groups divide by different factors (one loss scale cannot undo both).
    """
    factors = set()
    for module in modules:
        for group in _param_groups(module):
            factor = getattr(group, "gradient_divide_factor", None)
            if factor is None:
                factor = getattr(group, "reduce_scatter_divide_factor", None)  # older torch
            factors.add(float(mesh_size) if factor is None else float(factor))
    if len(factors) > 1:
        raise ValueError(
            f"The FSDP2 modules divide their gradients by different factors {sorted(factors)} "
            "(set_gradient_divide_factor); use one factor for every module to take the Hessian."
        )
    return factors.pop() if factors else float(mesh_size)


class ShardedRunner:
    """Runs the loss of a sharded module at given local shards of its parameters.

    Args:
        closure: The loss over the local batches (its module holds the FSDP2 modules).
        params: The selected parameters (``DTensor`` parameters of the module), by name.
        group: The process group of the data-parallel mesh (``None`` on one process).
        device: Device of the parameters.
        mesh_size: Ranks in the mesh.

    Example:
        >>> runner = ShardedRunner(closure, params, group, torch.device("cpu"), 2)  # doctest: +SKIP
        >>> loss, grads = runner.run([(0, 0.5), (1, 0.5)], point)  # doctest: +SKIP
    """

    def __init__(
        self,
        closure: LossClosure,
        params: Mapping[str, nn.Parameter],
        group: Any,
        device: torch.device,
        mesh_size: int,
    ) -> None:
        self.closure = closure
        self.params = dict(params)
        self.group = group
        self.device = device
        self.modules = fsdp_modules(closure.model)
        self.roots = root_modules(self.modules)
        self.order = list(self.modules)  # forward order, learned from the last complete forward
        self.divide = gradient_divide_factor(self.modules, mesh_size)

    def local(self, name: str) -> Tensor:
        """The local shard of parameter ``name`` (a view of FSDP's storage; write it under no_grad)."""
        with torch.no_grad():
            return self.params[name].to_local()

    def shards(self) -> dict[str, Tensor]:
        """Copies of the current local shards of the selected parameters."""
        return {name: self.local(name).detach().clone() for name in self.params}

    def _reshard(self) -> None:
        """Free every unsharded copy, so that the next forward all-gathers the shards as they are now."""
        for module in self.modules:
            module.reshard()

    @contextlib.contextmanager
    def at(self, point: Mapping[str, Tensor]) -> Iterator[None]:
        """Write ``point`` (local shards by name) into the parameters; on exit put back, bit for bit,
        the values that were there (copied on entry, never recomputed).
        """
        saved = {name: self.local(name).clone() for name in point}
        try:
            with torch.no_grad():
                for name, value in point.items():
                    self.local(name).copy_(value)
            self._reshard()
            yield
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    self.local(name).copy_(value)
            self._reshard()

    def run(
        self,
        slots: Sequence[tuple[int, float]],
        point: Mapping[str, Tensor],
        gradient: bool = True,
        kinks: Callable[[int], FrozenKinks | None] | None = None,
    ) -> tuple[float, dict[str, Tensor] | None]:
        """One pass: the loss (and gradient) of the weighted local batches at ``point``.

        Every rank must call it with the same number of slots (a rank with fewer batches fills in
        weight-0 slots): each slot is one forward (and backward) through the sharded module.

        Args:
            slots: ``(local batch index, weight)`` per forward.
            point: Local shards to evaluate at, by name (the selected parameters).
            gradient: Also run backward and return the gradient shards.
            kinks: The activation-pattern mode for a forward of a local batch (recording or
                replaying, NOTE [Frozen kinks]), or ``None`` for none; closed after the forward.

        Returns:
            ``(this rank's weighted loss, gradient shards by name)``: the gradient is FSDP's
            reduce-scatter, the weighted sum over every rank's slots (NOTE [FSDP2 gradient
            averaging]); ``None`` when ``gradient=False``. A parameter without gradient gives zeros.

        Raises:
            RankFailedError: On every rank but the failing ones, when a forward failed on some rank
                (which raise their own error; NOTE [Failures inside a sharded forward]).
        """
        total = 0.0
        grads = None
        every = list(self.closure.model.parameters())
        with self.closure.context(), self.at(point):
            for p in every:
                p.grad = None  # FSDP accumulates into an existing gradient; the context restores them
            with torch.set_grad_enabled(gradient):
                for index, weight in slots:
                    mode = kinks(index) if kinks is not None else None
                    with mode if mode is not None else contextlib.nullcontext():
                        loss = self._forward(index)
                    if mode is not None:
                        mode.close(loss)
                    if weight:
                        total += weight * float(loss.detach())
                    if gradient:
                        (loss * (weight * self.divide)).backward()
            if gradient:
                grads = {
                    name: torch.zeros_like(self.local(name))
                    if p.grad is None
                    else p.grad.to_local().detach().clone()
                    for name, p in self.params.items()
                }
            for p in every:
                p.grad = None
        return total, grads

    def _forward(self, index: int) -> Tensor:
        """Batch ``index``'s loss through the sharded module; all ranks agree it succeeded."""
        entered: list[nn.Module] = []
        handles = [
            module.register_forward_pre_hook(lambda module, args: entered.append(module))
            for module in self.modules
        ]
        error: BaseException | None = None
        loss = None
        try:
            loss = self.closure.module_loss(index)
        except Exception as caught:  # noqa: BLE001 - agreed with the other ranks below
            error = caught
            self._catch_up(entered)
        finally:
            for handle in handles:
                handle.remove()
        if error is None and {id(m) for m in entered} == {id(m) for m in self.modules}:
            self.order = list(dict.fromkeys(entered))
        agreement = agree_on_failure(
            error, self.group, device=self.device, what="A forward pass of the sharded module"
        )
        if agreement.error is not None:
            self.reset()
            agreement.raise_error()
        assert loss is not None
        return loss

    def _catch_up(self, entered: Sequence[nn.Module]) -> None:
        """All-gather (and free) the modules this failed forward did not reach, in forward order,
        so that the ranks still in the forward get their collectives (best effort).
        """
        reached = {id(m) for m in entered}
        with contextlib.suppress(Exception):
            for module in self.order:
                if id(module) not in reached:
                    module.unshard()
                    module.reshard()

    def reset(self) -> None:
        """Reset FSDP's per-iteration state after a forward that did not finish (or had no backward)."""
        for root in self.roots:
            reset = getattr(root, "reset_iter_state", None)
            if reset is not None:
                with contextlib.suppress(Exception):  # a root never forwarded (not initialized)
                    reset()
        self._reshard()
