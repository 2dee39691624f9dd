"""Curvature against the optimizer: how far a training run is from the edge of stability.

Freeze the optimizer at its current state (learning rates, momentum coefficients, second-moment
estimates, step counts) and run it on the local quadratic model ``L(θ) ≈ ½ (θ-θ*)^T H (θ-θ*)``. Its
next steps are then linear in ``θ``; with ``D`` the per-parameter step sizes the optimizer applies to
a gradient and ``W`` its (coupled) weight decay, every mode of ``D^½ (H + W) D^½`` with eigenvalue
``a`` evolves on its own, and the run diverges exactly when the largest ``a`` passes a threshold that
depends only on the momentum. :func:`stability` returns that eigenvalue, its threshold and their ratio
``value`` (1.0 is the edge: Cohen et al. 2021, "Gradient descent on neural networks typically occurs at
the edge of stability"; Cohen et al. 2022, "Adaptive gradient methods at the edge of stability").

Derivations, for one mode ``x`` with ``a`` the eigenvalue of ``D^½ (H + W) D^½`` (so the optimizer's
step on that mode is ``a x`` before momentum):

- **SGD** (``d = g + wd θ``; ``buf = β buf + (1-τ) d``; ``θ -= η buf``, or ``θ -= η (d + β buf)``
  with Nesterov): ``D = η``. Without momentum ``x' = (1 - a) x``: stable iff ``a < 2``. With heavy-ball
  momentum ``x'' = (1 + β - (1-τ) a) x' - β x``, whose roots stay in the unit disc iff
  ``0 < (1-τ) a < 2 + 2β``: threshold ``(2 + 2β) / (1 - τ)``. With Nesterov (``τ = 0``) the recursion is
  ``[x, buf]' = [[1 - a(1+β), -β²], [a, β]] [x, buf]`` (in units of ``η``), stable iff
  ``a < (2 + 2β) / (1 + 2β)`` (Jury's test).
- **Adam** (``m = β1 m + (1-β1) d``, ``v = β2 v + (1-β2) d²``, ``θ -= η m̂ / (√v̂ + ε)`` with the next
  step's bias corrections ``m̂ = m / (1-β1^{t+1})``, ``v̂ = v / (1-β2^{t+1})``): frozen ``v``, so
  ``D = η / ((1-β1^{t+1}) (√v̂ + ε))`` (``max_exp_avg_sq`` with ``amsgrad``); the momentum is heavy ball
  with ``β = β1`` and dampening ``β1``: threshold ``(2 + 2β1) / (1 - β1)`` (38 for ``β1 = 0.9``).
  ``weight_decay`` is coupled (in ``W``) for Adam; AdamW's decoupled decay multiplies ``θ`` by
  ``1 - η wd`` each step, which only contracts, and is left out of the threshold (so ``value`` is, if
  anything, pessimistic).
- **RMSprop** (``v = α v + (1-α) d²``, ``θ -= η d / (√v + ε)``, centered: ``√(v - ḡ²)``): ``D = η /
  (√v + ε)``; threshold ``2``, or ``2 + 2μ`` with momentum ``μ`` (``buf = μ buf + d / (√v + ε)``).
- **Adagrad** (``s += d²``, ``θ -= η_t d / (√s + ε)``, ``η_t = η / (1 + t · lr_decay)`` for the next
  step): ``D = η_t / (√s + ε)``; threshold ``2``.

The learning rate is the param group's current ``lr`` (what a scheduler set). Parameter groups map to
the operator's parameters by identity; parameters the optimizer does not train have ``D = 0``. Groups
with different momentum thresholds are folded into ``D`` (each scaled by ``2 / threshold``, reported
threshold 2), an approximation for the coupled modes.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from .contractions import is_sharded, shards_of
from .lanczos import eigenvalues
from .results import EigenResult, StabilityResult

#: The optimizers whose edge of stability is derived above.
SUPPORTED = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad")


class _Rule:
    """Step sizes, coupled weight decay and threshold of one parameter under one optimizer."""

    def __init__(self, step: Tensor | float, decay: float, threshold: float) -> None:
        self.step, self.decay, self.threshold = step, decay, threshold


def _sgd(group: dict[str, Any], state: dict[str, Any], param: Tensor) -> _Rule:
    lr, beta, tau = group["lr"], group.get("momentum", 0.0), group.get("dampening", 0.0)
    if beta == 0:
        threshold = 2.0
    elif group.get("nesterov", False):
        threshold = (2 + 2 * beta) / (1 + 2 * beta)
    else:
        threshold = (2 + 2 * beta) / (1 - tau)
    return _Rule(lr, group.get("weight_decay", 0.0), threshold)


def _adam(group: dict[str, Any], state: dict[str, Any], param: Tensor, decoupled: bool) -> _Rule:
    beta1, beta2 = group["betas"]
    step = float(state["step"]) + 1.0  # the next step's bias corrections
    second = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
    denominator = (second / (1 - beta2**step)).sqrt() + group["eps"]
    decay = 0.0 if decoupled else group.get("weight_decay", 0.0)
    return _Rule(group["lr"] / (1 - beta1**step) / denominator, decay, (2 + 2 * beta1) / (1 - beta1))


def _rmsprop(group: dict[str, Any], state: dict[str, Any], param: Tensor) -> _Rule:
    average = state["square_avg"]
    if group.get("centered", False):
        average = average - state["grad_avg"] ** 2
    denominator = average.clamp_min(0).sqrt() + group["eps"]
    momentum = group.get("momentum", 0.0)
    return _Rule(group["lr"] / denominator, group.get("weight_decay", 0.0), 2.0 + 2.0 * momentum)


def _adagrad(group: dict[str, Any], state: dict[str, Any], param: Tensor) -> _Rule:
    lr = group["lr"] / (1 + float(state["step"]) * group.get("lr_decay", 0.0))
    return _Rule(lr / (state["sum"].sqrt() + group["eps"]), group.get("weight_decay", 0.0), 2.0)


def _rule(optimizer: torch.optim.Optimizer, group: dict[str, Any], param: Tensor) -> _Rule:
    name = type(optimizer).__name__
    state = optimizer.state.get(param, {})
    if name == "SGD":
        return _sgd(group, state, param)
    if name in ("Adam", "AdamW"):
        decoupled = name == "AdamW" or group.get("decoupled_weight_decay", False)
        return _adam(group, state, param, decoupled)
    if name == "RMSprop":
        return _rmsprop(group, state, param)
    return _adagrad(group, state, param)


def unsupported_reason(optimizer: Any) -> str | None:
    """Why :func:`stability` gives no value for this optimizer (``None``: it does)."""
    name = type(optimizer).__name__
    if name not in SUPPORTED:
        return f"{name} is not one of {SUPPORTED}, whose edge of stability is derived"
    if any(group.get("maximize", False) for group in optimizer.param_groups):
        return "maximize=True ascends the loss: its stability is that of -H"
    if name != "SGD" and not any(optimizer.state.get(p) for g in optimizer.param_groups for p in g["params"]):
        return f"{name} has not taken a step yet, so its step sizes (from its moment estimates) do not exist"
    return None


class _Preconditioned:
    """``x -> D^½ (H + W) D^½ x`` over the operator's parameters."""

    def __init__(self, op: Any, root_step: Tensor, decay: Tensor) -> None:
        self.op, self.root_step, self.decay = op, root_step, decay
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device
        self.shards = shards_of(op)  # sharded vectors (local rows), if any

    def __matmul__(self, x: Tensor) -> Tensor:
        scale = self.root_step if x.ndim == 1 else self.root_step[:, None]
        weights = self.decay if x.ndim == 1 else self.decay[:, None]
        scaled = scale * x
        return scale * (self.op @ scaled + weights * scaled)


def step_sizes(op: Any, optimizer: torch.optim.Optimizer) -> tuple[Tensor, Tensor, float]:
    """The optimizer's per-parameter step sizes ``D``, coupled weight decay ``W`` and threshold.

    Args:
        op: A :class:`~lightning_hessian.HessianOperator` (its parameters are matched to the
            optimizer's by identity through ``op.closure.model``), or a
            :class:`~lightning_hessian.sharded.ShardedHessianOperator`, whose optimizer states are
            sharded like the parameters (their local shards are used).
        optimizer: One of :data:`SUPPORTED`.

    Returns:
        ``(D, W, threshold)``: two ``[N]`` vectors in the operator's flat order (this rank's rows of
        them for a sharded operator) and the threshold (2 when the groups' thresholds differ and were
        folded into ``D``).
    """
    params = dict(op.closure.model.named_parameters())
    space = getattr(op, "local_space", op.space)  # the local shards' shapes when sharded
    owner = {id(p): (group, p) for group in optimizer.param_groups for p in group["params"]}
    rules: dict[str, _Rule] = {}
    for name in op.space.names:
        found = owner.get(id(params[name]))
        if found is not None:
            rules[name] = _rule(optimizer, *found)
    thresholds = {rule.threshold for rule in rules.values()}
    threshold = thresholds.pop() if len(thresholds) == 1 else 2.0
    steps, decays = [], []
    for name, shape in zip(space.names, space.shapes, strict=True):
        rule = rules.get(name)
        size = int(torch.Size(shape).numel())
        if rule is None:
            steps.append(torch.zeros(size, dtype=op.dtype, device=op.device))
            decays.append(torch.zeros(size, dtype=op.dtype, device=op.device))
            continue
        local = rule.step.to_local() if hasattr(rule.step, "to_local") else rule.step  # a DTensor state
        step = torch.as_tensor(local, dtype=op.dtype, device=op.device).expand(shape).reshape(-1)
        steps.append(step * (threshold / rule.threshold))
        decays.append(torch.full((size,), float(rule.decay), dtype=op.dtype, device=op.device))
    return torch.cat(steps), torch.cat(decays), threshold


def _uniform_over_ranks(op: Any, step: Tensor, decay: Tensor) -> tuple[bool, float, float]:
    """Whether every rank's rows of ``D`` and ``W`` hold one value each, and those values."""
    shards = shards_of(op)
    local = torch.tensor(
        [
            float(step.max()) if step.numel() else -math.inf,
            -float(step.min()) if step.numel() else -math.inf,
            float(decay.max()) if decay.numel() else -math.inf,
            -float(decay.min()) if decay.numel() else -math.inf,
        ],
        dtype=torch.float64,
    )
    # the max over ranks (identical on every rank) through one sum: each rank fills its own row
    world, rank = shards.layout.world, shards.layout.rank
    table = torch.full((world, 4), 0.0, dtype=torch.float64)
    table[rank] = local
    table = shards.reduce_sum(table)
    step_max, step_min = float(table[:, 0].max()), -float(table[:, 1].max())
    decay_max, decay_min = float(table[:, 2].max()), -float(table[:, 3].max())
    return step_max == step_min and decay_max == decay_min, step_max, decay_max


def stability(
    op: Any,
    optimizer: torch.optim.Optimizer,
    *,
    tol: float = 1e-4,
    max_matvecs: int | None = None,
    seed: int = 0,
    top: EigenResult | None = None,
) -> StabilityResult | None:
    """How far an optimizer, frozen at its current state, is from diverging on the local quadratic.

    See the module docstring for the derivation of each optimizer's threshold.

    Args:
        op: The Hessian operator (:class:`~lightning_hessian.HessianOperator`) at the current
            parameters; only its parameters count.
        optimizer: ``torch.optim.SGD``, ``Adam``, ``AdamW``, ``RMSprop`` or ``Adagrad``, after at least
            one step for the adaptive ones.
        tol: Relative residual tolerance of the eigenvalue.
        max_matvecs: Product budget (default: that of :func:`lightning_hessian.eigenvalues`).
        seed: Seed of the Lanczos start vector.
        top: The operator's top eigenvalue, if already computed (e.g. ``report.blocks[B].eigenvalues``):
            where the optimizer applies one step size and one weight decay to every parameter of the
            operator (SGD with one learning rate), the result is read from it without any product.

    Returns:
        A :class:`StabilityResult`, or ``None`` (with one warning saying why) for an optimizer whose
        edge is not derived.

    Example:
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # doctest: +SKIP
        >>> lh.stability(lh.HessianOperator(model, loss_fn, data), optimizer).value  # doctest: +SKIP
        0.97
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"`optimizer` must be a torch.optim.Optimizer (the one that trains the model), got "
            f"{type(optimizer).__name__}."
        )
    reason = unsupported_reason(optimizer)
    if reason is not None:
        warnings.warn(f"No stability value: {reason}.", UserWarning, stacklevel=2)
        return None
    step, decay, threshold = step_sizes(op, optimizer)
    if is_sharded(op):
        uniform, first_step, first_decay = _uniform_over_ranks(op, step, decay)
    else:
        uniform = bool((step == step[0]).all() and (decay == decay[0]).all())
        first_step, first_decay = (float(step[0]), float(decay[0])) if uniform else (0.0, 0.0)
    if uniform and top is not None and top.values.numel() and top.which == "largest":
        eigenvalue = first_step * (float(top.values[0]) + first_decay)
        converged, matvecs = bool(top.converged.reshape(-1)[0]), 0
    else:
        preconditioned = _Preconditioned(op, step.clamp_min(0).sqrt(), decay)
        result = eigenvalues(preconditioned, 1, "largest", tol=tol, max_matvecs=max_matvecs, seed=seed)
        eigenvalue, converged, matvecs = float(result.values[0]), result.all_converged, result.num_matvecs
    return StabilityResult(
        value=eigenvalue / threshold,
        eigenvalue=eigenvalue,
        threshold=threshold,
        optimizer=type(optimizer).__name__,
        adaptive=type(optimizer).__name__ != "SGD",
        converged=converged,
        num_matvecs=matvecs,
    )
