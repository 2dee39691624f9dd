"""Gradient differences with kinks frozen at θ (NOTE [Frozen kinks] in ``operator/kinks.py``).

Each model puts the first sample's pre-activations within 1e-9 of a kink (a ReLU's zero, a hardtanh
bound, a near-tie in a pooling window), so that the gradients at ``θ ± h v`` cross kinks in float64
as well as in float32: the tests check that the patterns there do differ from those at ``θ``, that
unfrozen differences are then far off, and that frozen ones match the exact products.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.overrides import _get_current_function_mode_stack
from torch.utils.checkpoint import checkpoint

import lightning_hessian as lh
from lightning_hessian.operator import FORWARD, REVERSE, selection
from lightning_hessian.operator.differences import FINITE_DIFFERENCE, RICHARDSON, difference_step
from lightning_hessian.operator.kinks import FrozenKinks, KinkPatterns, _recomputes_forward
from tests.helpers import cross_entropy_loss

DOUBLE = torch.float64
TINY = 1e-9
_NEAR_ZERO = ("relu", "relu_inplace", "tensor_relu_", "leaky_relu", "leaky_relu_inplace", "threshold")


def _unpooled(z: torch.Tensor) -> torch.Tensor:
    pooled, indices = F.max_pool2d(z.view(-1, 1, 4, 4), 2, return_indices=True)
    return F.max_unpool2d(pooled, indices, 2)


ACTIVATIONS = {
    "relu": (nn.ReLU(), 16),
    "relu_inplace": (nn.ReLU(inplace=True), 16),
    "tensor_relu_": (lambda z: z.relu_(), 16),
    "leaky_relu": (nn.LeakyReLU(0.1), 16),
    "leaky_relu_inplace": (nn.LeakyReLU(0.1, inplace=True), 16),
    "threshold": (nn.Threshold(0.0, -0.5), 16),
    "hardtanh": (nn.Hardtanh(), 16),
    "hardtanh_inplace": (nn.Hardtanh(inplace=True), 16),
    "relu6": (nn.ReLU6(), 16),
    "max_pool1d": (lambda z: F.max_pool1d(z.view(-1, 2, 8), 2), 8),
    "max_pool2d_return_indices": (_unpooled, 16),
    "adaptive_max_pool2d": (lambda z: F.adaptive_max_pool2d(z.view(-1, 1, 4, 4), 2), 4),
    "max_pool3d": (lambda z: F.max_pool3d(z.view(-1, 1, 2, 2, 4), 2), 2),
}


class NearKinks(nn.Module):
    """``Linear(4, 16) -> kinked function -> Linear(width, 3)``, sample 0 at the kinks."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.activation, width = ACTIVATIONS[kind]
        self.inner, self.outer = nn.Linear(4, 16), nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outer(self.activation(self.inner(x)).flatten(1))


def _targets(kind: str) -> torch.Tensor:
    """Sample 0's pre-activations: within 1e-9 of a kink of ``kind`` on every unit."""
    g = torch.Generator().manual_seed(3)
    wiggle = TINY * torch.randn(16, generator=g, dtype=DOUBLE)
    if kind in _NEAR_ZERO:
        return wiggle
    if kind in ("hardtanh", "hardtanh_inplace", "relu6"):
        low, high = (0.0, 6.0) if kind == "relu6" else (-1.0, 1.0)
        return torch.where(torch.arange(16) % 2 == 0, low, high) + wiggle
    return 0.5 + wiggle  # pooling: every window nearly tied


def problem(kind: str):
    torch.manual_seed(0)
    model = NearKinks(kind).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, generator=g, dtype=DOUBLE)
    with torch.no_grad():
        model.inner.bias += _targets(kind) - model.inner(x[:1])[0]
    return model, [(x, torch.randint(0, 3, (6,), generator=g))]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _patterns(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> KinkPatterns:
    with FrozenKinks() as recording:
        functional_call(model, params, (x,))
    return recording.patterns


def _unfrozen(op: lh.HessianOperator) -> lh.HessianOperator:
    op._kernels.kinks.off = "switched off by the test"
    return op


@pytest.mark.parametrize("kind", list(ACTIVATIONS))
def test_frozen_differences_match_exact_products_where_the_steps_cross_kinks(kind):
    model, data = problem(kind)
    exact = lh.HessianOperator(model, cross_entropy_loss, data, hvp=REVERSE)
    v = torch.randn(exact.shape[0], dtype=DOUBLE, generator=torch.Generator().manual_seed(0))
    expected = exact @ v
    # The patterns at θ ± h v are not those at θ: without freezing the steps cross kinks.
    theta = dict(model.named_parameters())
    parts = exact.space.unflatten(v.unsqueeze(0))
    lengths = [1 + float(p.detach().norm()) for p in theta.values()]
    step = difference_step(DOUBLE, lengths, [float(parts[n].norm()) for n in theta])
    at = _patterns(model, theta, data[0][0])
    for sign in (1, -1):
        moved = {n: p.detach() + sign * step * parts[n][0] for n, p in theta.items()}
        there = _patterns(model, moved, data[0][0])
        assert at.keys == there.keys
        assert any(not torch.equal(a, b) for a, b in zip(at.values, there.values, strict=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unfrozen differences' spread is reported
        unfrozen = _unfrozen(lh.HessianOperator(model, cross_entropy_loss, data, hvp=FINITE_DIFFERENCE)) @ v
    assert _relative(unfrozen, expected) > 1e-2
    for method, bound in ((FINITE_DIFFERENCE, 1e-7), (RICHARDSON, 1e-9)):
        op = lh.HessianOperator(model, cross_entropy_loss, data, hvp=method)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no spread to report, no fallback
            assert _relative(op @ v, expected) < bound, method
    exact32 = lh.HessianOperator(model, cross_entropy_loss, data, dtype=torch.float32, hvp=REVERSE)
    op32 = lh.HessianOperator(model, cross_entropy_loss, data, dtype=torch.float32, hvp=FINITE_DIFFERENCE)
    assert _relative(op32 @ v.float(), exact32 @ v.float()) < 1e-3


@pytest.mark.parametrize("kind", ["relu_inplace", "hardtanh", "max_pool2d_return_indices"])
def test_replay_at_theta_is_the_native_forward_and_gradient(kind):
    model, [(x, y)] = problem(kind)
    params = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    native = F.cross_entropy(functional_call(model, params, (x,)), y)
    patterns = _patterns(model, params, x)
    with FrozenKinks(patterns) as replay:
        frozen = F.cross_entropy(functional_call(model, params, (x,)), y)
        replay.close()
    assert replay.mismatch is None and torch.equal(frozen, native)
    for a, b in zip(
        torch.autograd.grad(frozen, list(params.values())),
        torch.autograd.grad(native, list(params.values())),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_patterns_are_factors_bool_masks_int8_codes_and_int64_indices(dtype):
    x = torch.randn(2, 3, 4, 4, dtype=dtype)
    with FrozenKinks() as recording:
        F.relu(x)
        F.leaky_relu(x, 0.1)
        F.threshold(x, 0.5, -1.0)
        F.hardtanh(x)
        F.max_pool2d(x, 2)
    kinds = [dtype, dtype, torch.bool, torch.int8, torch.int64]
    assert [p.dtype for p in recording.patterns.values] == kinds
    size = x.element_size()
    assert recording.patterns.nbytes == 2 * size * x.numel() + 2 * x.numel() + 8 * x.numel() // 4
    relu, leaky = recording.patterns.values[:2]
    assert torch.equal(relu, (x > 0).to(dtype))  # multiplied in: relu's value at θ, to the bit
    assert torch.equal(leaky, torch.where(x > 0, 1.0, torch.tensor(0.1, dtype=dtype)))
    assert torch.equal(x * relu, F.relu(x)) and torch.equal(x * leaky, F.leaky_relu(x, 0.1))


def test_a_relu_transformer_encoder_layer_goes_through_the_mode_and_is_frozen():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, activation="relu").double()
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(24, 3)).double().eval()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(5, 3, 8, generator=g, dtype=DOUBLE), torch.randint(0, 3, (5,), generator=g))]
    with torch.no_grad(), FrozenKinks() as recording:  # eval mode, no grad: the fused path is off
        model(data[0][0])
    assert len(recording.patterns) == 1 and recording.patterns.keys[0][0] is F.relu
    exact = lh.HessianOperator(model, cross_entropy_loss, data, dtype=torch.float32, hvp=REVERSE)
    op = lh.HessianOperator(model, cross_entropy_loss, data, dtype=torch.float32, hvp=FINITE_DIFFERENCE)
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(0))
    assert _relative(op @ v, exact @ v) < 1e-3


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.max_pool2d(F.relu(self.bn(self.conv(x))), 2).flatten(1))


def test_top_eigenvalues_of_a_relu_cnn_from_frozen_differences_match_the_exact_ones():
    torch.manual_seed(0)
    model = SmallCNN().double().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 2, 6, 6, generator=g, dtype=DOUBLE), torch.randint(0, 3, (16,), generator=g))]
    with torch.no_grad():  # one pixel of sample 0 within 1e-9 of the ReLU's kink in every channel
        model.bn.bias -= model.bn(model.conv(data[0][0][:1]))[0, :, 2, 3] - TINY
    exact = lh.eigenvalues(lh.HessianOperator(model, cross_entropy_loss, data, hvp=REVERSE), 3, tol=1e-10)
    op = lh.HessianOperator(model, cross_entropy_loss, data, hvp=FINITE_DIFFERENCE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = lh.eigenvalues(op, 3, tol=1e-10)
    torch.testing.assert_close(found.values, exact.values, rtol=1e-8, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = _unfrozen(lh.HessianOperator(model, cross_entropy_loss, data, hvp=FINITE_DIFFERENCE))
        unfrozen = lh.eigenvalues(op, 3, tol=1e-10)
    assert float(((unfrozen.values - exact.values).abs() / exact.values).max()) > 1e-2


def test_the_referee_now_judges_float32_products_of_a_relu_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 3))
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(64, 10, generator=g), torch.randint(0, 3, (64,), generator=g))]
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=g)
    op = lh.HessianOperator(model, cross_entropy_loss, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op @ v
    assert op.choice.vector in (REVERSE, FORWARD)
    assert op.choice.referee[op.choice.vector].startswith("agrees")
    selection._MEMORY.clear()  # unfrozen, the referee's steps cross kinks and it abstains, as before
    op = _unfrozen(lh.HessianOperator(model, cross_entropy_loss, data))
    op @ v
    assert op.choice.referee[op.choice.vector].startswith("unverified")


# --------------------------------------------------------------------------- where freezing stops


class BranchOnBias(nn.Module):
    """Applies a second ReLU only where ``inner.bias[0] > 0``: 0 at θ, so ``θ ± h v`` takes both branches."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.outer = nn.Linear(4, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.relu(self.inner(x))
        if float(self.inner.bias.detach()[0]) > 0:
            z = F.relu(z - 0.1)
        return self.outer(z)


def test_control_flow_that_changes_the_kinked_calls_falls_back_to_unfrozen_differences_with_one_warning():
    torch.manual_seed(0)
    model = BranchOnBias().double()
    with torch.no_grad():
        model.inner.bias[0] = 0.0
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 4, generator=g, dtype=DOUBLE), torch.randint(0, 3, (6,), generator=g))]
    op = lh.HessianOperator(model, cross_entropy_loss, data, hvp=FINITE_DIFFERENCE)
    V = torch.ones(op.shape[0], 2, dtype=DOUBLE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        products = op @ V
        op @ V
    messages = [str(w.message) for w in caught if "cannot freeze" in str(w.message)]
    assert len(messages) == 1 and "beyond the 1 made at θ" in messages[0]
    assert op._kernels.kinks.off is not None
    expected = _unfrozen(lh.HessianOperator(model, cross_entropy_loss, data, hvp=FINITE_DIFFERENCE)) @ V
    assert torch.equal(products, expected)  # every batch and vector again, unfrozen: no mixture


class Checkpointed(nn.Module):
    """The middle of ``Linear -> [Linear -> leaky ReLU] -> Linear`` recomputed in backward."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.inner, self.middle, self.outer = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def segment(z: torch.Tensor) -> torch.Tensor:
            return F.leaky_relu(self.middle(z), 0.1)

        return self.outer(checkpoint(segment, self.inner(x), use_reentrant=self.reentrant))


def test_activation_checkpointing_falls_back_to_unfrozen_differences():
    torch.manual_seed(0)
    model = Checkpointed(reentrant=False).double()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 4, generator=g, dtype=DOUBLE), torch.randint(0, 3, (6,), generator=g))]
    op = lh.HessianOperator(model, cross_entropy_loss, data, hvp=FINITE_DIFFERENCE)
    v = torch.randn(op.shape[0], dtype=DOUBLE, generator=g)
    with pytest.warns(RuntimeWarning, match=r"cannot freeze.*checkpointing.*runs the forward again"):
        product = op @ v
    assert op._kernels.kinks.off is not None
    unfrozen = _unfrozen(lh.HessianOperator(model, cross_entropy_loss, data, hvp=FINITE_DIFFERENCE))
    assert torch.equal(product, unfrozen @ v)
    # The reentrant form (whose backward cannot run under torch.autograd.grad, but can under the
    # sharded operator's .backward()) is found in the graph when the patterns are recorded.
    reentrant = Checkpointed(reentrant=True).double()
    assert _recomputes_forward(cross_entropy_loss(reentrant, data[0]))
    assert not _recomputes_forward(cross_entropy_loss(model, data[0]))


class FailsWhenFrozen(nn.Module):
    """Raises in a replayed forward (``fail="frozen"``) or in every forward after the first two."""

    def __init__(self, fail: str) -> None:
        super().__init__()
        self.fail, self.calls = fail, 0
        self.inner, self.outer = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        replaying = any(
            isinstance(m, FrozenKinks) and not m.recording for m in _get_current_function_mode_stack()
        )
        if (self.fail == "frozen" and replaying) or (self.fail == "always" and self.calls > 2):
            raise ValueError("no forward here")
        return self.outer(F.relu(self.inner(x)))


def test_a_frozen_pass_that_raises_falls_back_and_an_error_of_the_module_is_raised():
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g))]
    torch.manual_seed(0)
    op = lh.HessianOperator(FailsWhenFrozen("frozen"), cross_entropy_loss, data, hvp=FINITE_DIFFERENCE)
    v = torch.randn(op.shape[0], generator=g)
    with pytest.warns(RuntimeWarning, match="cannot freeze.*frozen pass raised ValueError: no forward here"):
        op @ v
    torch.manual_seed(0)
    op = lh.HessianOperator(FailsWhenFrozen("always"), cross_entropy_loss, data, hvp=FINITE_DIFFERENCE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="no forward here"):
            op @ v
    assert op._kernels.kinks.off is None


@pytest.fixture
def fresh_dynamo():
    """Compiled graphs of this test must not change what later tests compile (and the other way)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_a_compiled_module_keeps_unfrozen_differences(fresh_dynamo):
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    compiled = torch.compile(eager, backend="aot_eager")
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g))]
    op = lh.HessianOperator(compiled, cross_entropy_loss, data, hvp=FINITE_DIFFERENCE)
    v = torch.randn(op.shape[0], generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the spread of unfrozen differences
        product = op @ v
    assert op._kernels.kinks.off == "compiled modules ['']" and not op._kernels.kinks._patterns
    expected = _unfrozen(lh.HessianOperator(eager, cross_entropy_loss, data, hvp=FINITE_DIFFERENCE))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(product, expected @ v, rtol=1e-5, atol=1e-6)


def test_frozen_differences_leave_parameters_buffers_and_grads_untouched():
    torch.manual_seed(0)
    model = SmallCNN().double().train()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    grads = {n: (p.grad, p.grad.clone()) for n, p in model.named_parameters()}
    data = [(torch.randn(4, 2, 6, 6, dtype=DOUBLE), torch.randint(0, 3, (4,)))]
    op = lh.HessianOperator(model, cross_entropy_loss, data, hvp=FINITE_DIFFERENCE)
    op @ torch.randn(op.shape[0], 2, dtype=DOUBLE)
    assert model.training
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    for name, p in model.named_parameters():
        assert p.grad is grads[name][0] and torch.equal(p.grad, grads[name][1]), name
