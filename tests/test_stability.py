"""lh.stability against the optimizers themselves: on a quadratic loss, the real ``torch.optim``
optimizer, frozen at its state, diverges exactly where ``.value`` crosses 1.

Each case builds an optimizer at a learning rate ``lr0``, reads ``value`` there and predicts the
critical learning rate ``lr0 / value`` (every step size is proportional to the learning rate). A
bisection on the learning rate, running the real optimizer on ``½ θᵀAθ`` from a small start, finds
where it starts to diverge; the two agree to 1%. Adaptive optimizers are frozen by a second-moment
decay of ``1 - 1e-12`` (RMSprop, Adam) or a large accumulated sum (Adagrad), with their moment
estimates preset, so their step sizes stay put while the bisection runs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import lightning_hessian as lh

STEPS = 1500
GROWTH = 10.0
FROZEN = 1 - 1e-12  # a second-moment decay that leaves the estimate unchanged over the run


class Quadratic(nn.Module):
    """Two parameter tensors; the loss is ``½ θᵀAθ`` over ``θ = [first, second]`` (A positive definite:
    a negative eigenvalue grows under any learning rate, which is no edge of stability)."""

    def __init__(self, start: torch.Tensor) -> None:
        super().__init__()
        self.first = nn.Parameter(start[:3].clone())
        self.second = nn.Parameter(start[3:].clone())


def _matrix() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(7, 7, generator=generator, dtype=torch.float64))
    spectrum = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.05], dtype=torch.float64)
    return basis @ torch.diag(spectrum) @ basis.T


MATRIX = _matrix()
START = 1e-4 * torch.randn(7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
SECOND_MOMENT = torch.linspace(0.5, 2.0, 7, dtype=torch.float64) ** 2  # v̂ or Adagrad's sum


def _loss(model: Quadratic, batch: torch.Tensor) -> torch.Tensor:
    theta = torch.cat([model.first, model.second])
    return 0.5 * theta @ batch @ theta


def _operator(model: Quadratic, **kwargs) -> lh.HessianOperator:
    return lh.HessianOperator(model, _loss, [MATRIX], batch_size_fn=lambda batch: 1, **kwargs)


def _preset(optimizer: torch.optim.Optimizer, model: Quadratic) -> None:
    """Moment estimates as if after many steps (the frozen part of the optimizer's state)."""
    name = type(optimizer).__name__
    moments = {"first": SECOND_MOMENT[:3], "second": SECOND_MOMENT[3:]}
    for param_name, param in model.named_parameters():
        moment, zeros = moments[param_name].clone(), torch.zeros_like(param)
        group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
        if name in ("Adam", "AdamW"):
            step = 1e6
            correction = 1 - group["betas"][1] ** (step + 1)  # v̂ = v / correction
            state = {"step": torch.tensor(step), "exp_avg": zeros, "exp_avg_sq": moment * correction}
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = moment * correction
        elif name == "RMSprop":
            state = {"step": torch.tensor(1e6), "square_avg": moment}
            if group["momentum"] > 0:
                state["momentum_buffer"] = zeros
            if group["centered"]:
                state["grad_avg"] = torch.full_like(param, 0.3)
                state["square_avg"] = moment + 0.09  # centered variance v - ḡ² stays the preset
        elif name == "Adagrad":
            state = {"step": torch.tensor(1e6), "sum": moment * 1e4}
        else:
            continue
        optimizer.state[param] = state


Factory = Callable[[Quadratic, float], torch.optim.Optimizer]


def _diverges(make: Factory, lr: float) -> bool:
    model = Quadratic(START).double()
    optimizer = make(model, lr)
    _preset(optimizer, model)
    params = [model.first, model.second]
    for _ in range(STEPS):
        theta = torch.cat([p.detach() for p in params])
        gradient = MATRIX @ theta
        model.first.grad, model.second.grad = gradient[:3].clone(), gradient[3:].clone()
        optimizer.step()
        if torch.cat([p.detach() for p in params]).norm() > GROWTH * START.norm():
            return True
    return False


def _critical_lr(make: Factory, guess: float) -> float:
    low, high = guess / 1.5, guess * 1.5
    assert not _diverges(make, low) and _diverges(make, high), "the bracket must hold the edge"
    for _ in range(9):
        middle = math.sqrt(low * high)
        low, high = (low, middle) if _diverges(make, middle) else (middle, high)
    return math.sqrt(low * high)


def _predicted_lr(make: Factory, lr0: float) -> tuple[float, lh.StabilityResult]:
    model = Quadratic(START).double()
    optimizer = make(model, lr0)
    _preset(optimizer, model)
    result = lh.stability(_operator(model), optimizer, tol=1e-10)
    assert result is not None and result.converged
    return lr0 / result.value, result


CASES: dict[str, tuple[Factory, float]] = {
    "sgd": (lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr), 2.0),
    "sgd-momentum": (lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9), 3.8),
    "sgd-dampening": (
        lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, dampening=0.5),
        7.6,
    ),
    "sgd-nesterov": (
        lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, nesterov=True),
        3.8 / 2.8,
    ),
    "sgd-weight-decay": (
        lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.5, weight_decay=0.3),
        3.0,
    ),
    "sgd-groups": (
        lambda m, lr: torch.optim.SGD([{"params": [m.first], "lr": 3 * lr}, {"params": [m.second]}], lr=lr),
        2.0,
    ),
    "adam": (lambda m, lr: torch.optim.Adam(m.parameters(), lr=lr, betas=(0.9, FROZEN)), 38.0),
    "adam-coupled-decay": (
        lambda m, lr: torch.optim.Adam(m.parameters(), lr=lr, betas=(0.8, FROZEN), weight_decay=0.5),
        18.0,
    ),
    "adam-amsgrad-eps": (
        lambda m, lr: torch.optim.Adam(m.parameters(), lr=lr, betas=(0.5, FROZEN), eps=0.3, amsgrad=True),
        6.0,
    ),
    "adamw": (
        lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, FROZEN), weight_decay=0),
        38.0,
    ),
    "rmsprop": (lambda m, lr: torch.optim.RMSprop(m.parameters(), lr=lr, alpha=FROZEN), 2.0),
    "rmsprop-momentum-centered": (
        lambda m, lr: torch.optim.RMSprop(m.parameters(), lr=lr, alpha=FROZEN, momentum=0.5, centered=True),
        3.0,
    ),
    "adagrad": (lambda m, lr: torch.optim.Adagrad(m.parameters(), lr=lr, eps=1e-3), 2.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_value_one_is_where_the_frozen_optimizer_starts_to_diverge(case: str) -> None:
    make, threshold = CASES[case]
    predicted, result = _predicted_lr(make, 0.01)
    assert result.threshold == pytest.approx(threshold)
    assert result.eigenvalue == pytest.approx(result.value * result.threshold)
    measured = _critical_lr(make, predicted)
    assert measured == pytest.approx(predicted, rel=0.01), (case, measured, predicted)


def test_sgd_eigenvalue_is_learning_rate_times_sharpness() -> None:
    model = Quadratic(START).double()
    result = lh.stability(_operator(model), torch.optim.SGD(model.parameters(), lr=0.1), tol=1e-10)
    assert result.eigenvalue == pytest.approx(0.1 * 5.0, rel=1e-8)
    assert result.value == pytest.approx(0.25, rel=1e-8)
    assert result.optimizer == "SGD" and not result.adaptive and result.num_matvecs > 0


def test_adam_preconditioned_eigenvalue_matches_the_dense_computation() -> None:
    model = Quadratic(START).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    model.first.grad, model.second.grad = (
        torch.ones(3, dtype=torch.float64),
        torch.ones(4, dtype=torch.float64),
    )
    optimizer.step()  # a real step, so the state is PyTorch's own
    state = [optimizer.state[p] for p in (model.first, model.second)]
    v_hat = torch.cat([s["exp_avg_sq"] for s in state]) / (1 - 0.999**2)
    step = 0.01 / (1 - 0.9**2) / (v_hat.sqrt() + 1e-8)
    expected = torch.linalg.eigvalsh(step.sqrt()[:, None] * MATRIX * step.sqrt()[None, :]).max()
    result = lh.stability(_operator(model), optimizer, tol=1e-10)
    assert result.adaptive and result.threshold == pytest.approx(38.0)
    assert result.eigenvalue == pytest.approx(float(expected), rel=1e-8)


def test_parameters_outside_the_selection_are_ignored() -> None:
    model = Quadratic(START).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    result = lh.stability(_operator(model, params="second"), optimizer, tol=1e-10)
    expected = torch.linalg.eigvalsh(MATRIX[3:, 3:]).max()
    assert result.eigenvalue == pytest.approx(0.1 * float(expected), rel=1e-8)


def test_parameters_the_optimizer_does_not_train_have_no_step() -> None:
    model = Quadratic(START).double()
    optimizer = torch.optim.SGD([model.second], lr=0.1)
    result = lh.stability(_operator(model), optimizer, tol=1e-10)
    expected = torch.linalg.eigvalsh(MATRIX[3:, 3:]).max()
    assert result.eigenvalue == pytest.approx(0.1 * float(expected), rel=1e-8)


def test_a_scheduler_s_current_learning_rate_is_used() -> None:
    model = Quadratic(START).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    optimizer.step()
    scheduler.step()
    result = lh.stability(_operator(model), optimizer, tol=1e-10)
    assert result.eigenvalue == pytest.approx(0.05 * 5.0, rel=1e-8)


def test_unsupported_optimizer_warns_once_and_gives_no_value() -> None:
    model = Quadratic(START).double()
    with pytest.warns(UserWarning, match="LBFGS is not one of") as record:
        assert lh.stability(_operator(model), torch.optim.LBFGS(model.parameters())) is None
    assert len(record) == 1


def test_adaptive_optimizer_before_its_first_step_warns() -> None:
    model = Quadratic(START).double()
    with pytest.warns(UserWarning, match="has not taken a step yet"):
        assert lh.stability(_operator(model), torch.optim.Adam(model.parameters())) is None


def test_maximize_is_refused_with_its_reason() -> None:
    model = Quadratic(START).double()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert (
            lh.stability(_operator(model), torch.optim.SGD(model.parameters(), lr=0.1, maximize=True)) is None
        )
    assert "maximize=True" in str(record[0].message)


def test_non_optimizer_gets_a_type_error() -> None:
    model = Quadratic(START).double()
    with pytest.raises(TypeError, match="`optimizer` must be a torch.optim.Optimizer"):
        lh.stability(_operator(model), "sgd")  # type: ignore[arg-type]
