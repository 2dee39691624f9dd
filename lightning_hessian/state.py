"""Context managers that let the library run a user's module and leave no trace on it.

Each one saves one kind of state on entry and restores it on exit: random generators, training
flags, buffers and ``.grad``, the module's own parameter objects (:class:`TensorSlots`), BatchNorm's
running statistics in train mode, ``self.log`` of a LightningModule, torchmetrics states and number
attributes of submodules; and :func:`differentiable_context` sets up autograd so that every
differentiation mode works whatever the caller holds (inference mode, autocast, fused attention).
"""

from __future__ import annotations

import contextlib
import numbers
import random
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torchmetrics import Metric


@contextlib.contextmanager
def silenced_logging(module: nn.Module) -> Iterator[None]:
    """Temporarily replace ``module.log`` and ``module.log_dict`` with no-ops."""
    saved = {name: module.__dict__.get(name) for name in ("log", "log_dict")}
    module.__dict__["log"] = module.__dict__["log_dict"] = lambda *args, **kwargs: None
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = value


@contextlib.contextmanager
def preserved_rng_state(devices: Sequence[torch.device] = ()) -> Iterator[None]:
    """Restore Python's, NumPy's (if imported) and torch's CPU/CUDA generators on exit."""
    python_state = random.getstate()
    numpy_random = _numpy_random()
    numpy_state = numpy_random.get_state() if numpy_random is not None else None
    cuda_devices = [d for d in devices if d.type == "cuda"]
    with torch.random.fork_rng(devices=cuda_devices, enabled=True):
        try:
            yield
        finally:
            random.setstate(python_state)
            if numpy_random is not None:
                numpy_random.set_state(numpy_state)


def _numpy_random() -> Any:
    numpy = sys.modules.get("numpy")
    return getattr(numpy, "random", None)


@contextlib.contextmanager
def preserved_module_state(module: nn.Module) -> Iterator[None]:
    """Restore training flags, buffers (values and identity) and ``.grad`` of every submodule."""
    flags = [(m, m.training) for m in module.modules()]
    buffers = [(b, b.detach().clone()) for b in module.buffers() if b is not None]
    grads = [(p, p.grad) for p in module.parameters()]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for buffer, saved in buffers:
                if not torch.equal(buffer, saved):
                    buffer.copy_(saved)
        for p, grad in grads:
            p.grad = grad


class TensorSlots:
    """Every parameter and buffer slot of a module by name, to swap tensors in and put them back.

    What ``torch.func.functional_call`` does on every call (walk the module, find the slots of each
    name, untie tied tensors) done once, so that a loss evaluation costs what the module's own forward
    costs. A name given a tensor fills every slot that holds the same tensor as that name (tied
    parameters, registered under several names, all take it); :meth:`swapped` puts the module's own
    objects back on exit, whatever the forward did to those slots.

    # NOTE [Swapping tensors into module slots]
    Assigning into ``module._parameters``/``module._buffers`` is what ``functional_call`` does too
    (``NamedMemberAccessor.swap_tensor``); modules that cache their parameters, such as ``nn.LSTM``'s
    flat weights, check their slots' identity in forward for that reason. Slots are looked up when the
    closure is made: a module whose structure changes afterwards needs a new closure.

    Args:
        module: The module whose slots to index.

    Example:
        >>> lin = nn.Linear(2, 1)
        >>> slots = TensorSlots(lin)
        >>> with slots.swapped({"weight": torch.zeros(1, 2)}):
        ...     lin(torch.ones(1, 2)) - lin.bias
        tensor([[0.]], grad_fn=<SubBackward0>)
        >>> isinstance(lin.weight, nn.Parameter)
        True
    """

    def __init__(self, module: nn.Module) -> None:
        self._slots: dict[str, list[tuple[dict[str, Any], str]]] = {}
        #: The names ``named_parameters()`` and ``named_buffers()`` give (one per tensor), in order.
        self.names: dict[str, list[str]] = {"_parameters": [], "_buffers": []}
        first_name: dict[int, str] = {}
        named = (
            ("_parameters", module.named_parameters(remove_duplicate=False)),
            ("_buffers", module.named_buffers(remove_duplicate=False)),
        )
        for kind, members in named:
            for name, tensor in members:
                owner_name, _, key = name.rpartition(".")
                owner = module.get_submodule(owner_name)
                canonical = first_name.setdefault(id(tensor), name)
                if canonical == name:
                    self.names[kind].append(name)
                slots = self._slots.setdefault(canonical, [])
                slots.append((getattr(owner, kind), key))
                self._slots[name] = slots  # an alias shares its tensor's slot list

    def current(self, kind: str) -> dict[str, Tensor]:
        """The tensors in the module's parameter (``"_parameters"``) or buffer (``"_buffers"``) slots
        now, by name: ``dict(module.named_parameters())`` or ``dict(module.named_buffers())`` without
        walking the module.
        """
        current = {}
        for name in self.names[kind]:
            members, key = self._slots[name][0]
            current[name] = members[key]
        return current

    @contextlib.contextmanager
    def swapped(self, tensors: dict[str, Tensor]) -> Iterator[None]:
        """Put ``tensors`` (by parameter or buffer name) in their slots; the originals back on exit.

        Raises:
            KeyError: If a name is neither a parameter nor a buffer of the module.
        """
        saved: list[tuple[dict[str, Any], str, Any]] = []
        try:
            for name, tensor in tensors.items():
                slots = self._slots.get(name)
                if slots is None:
                    raise KeyError(f"{name!r} is neither a parameter nor a buffer of the module.")
                for members, key in slots:
                    saved.append((members, key, members[key]))
                    members[key] = tensor
            yield
        finally:
            for members, key, original in reversed(saved):
                members[key] = original


@contextlib.contextmanager
def batch_norm_without_running_stats(module: nn.Module) -> Iterator[None]:
    """In train mode, make BatchNorm use batch statistics without updating running statistics."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.track_running_stats for m in norms]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, flag in zip(norms, saved, strict=True):
            m.track_running_stats = flag


@contextlib.contextmanager
def differentiable_context(device: torch.device, math_attention: bool = True) -> Iterator[None]:
    """Grad on, inference mode off, autocast off, and the attention kernel that every AD mode supports.

    The fused CPU/GPU kernels behind ``scaled_dot_product_attention`` have no double-backward or
    forward-mode formulas; the math backend is composite and differentiates any number of times.
    ``math_attention=False`` leaves the attention kernel alone (for first-order gradients).
    """
    # Only what differs from the wanted state is entered: this runs around every product.
    contexts: list[contextlib.AbstractContextManager[Any]] = []
    if torch.is_inference_mode_enabled():
        contexts.append(torch.inference_mode(False))
    if not torch.is_grad_enabled():
        contexts.append(torch.enable_grad())
    for device_type in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device_type):
            contexts.append(torch.autocast(device_type, enabled=False))
    if math_attention:
        contexts.append(sdpa_kernel([SDPBackend.MATH]))
    if not contexts:
        yield
        return
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


@contextlib.contextmanager
def preserved_python_state(module: nn.Module) -> Iterator[None]:
    """Restore every torchmetrics ``Metric`` and the number attributes of every other submodule on exit.

    Running a LightningModule's ``training_step`` outside training updates what it updates: its
    metrics accumulate, its counters count. On exit every ``Metric`` among ``module.modules()`` holds
    its states' values (in the same tensor and list objects) and all its other attributes
    (update count, cached results) as on entry; every other submodule's attributes that held a Python
    number (``int``, ``float``, ``bool``, any ``numbers.Number``) hold it again, and number attributes
    added meanwhile are removed. Nothing else is restored: containers mutated in place (a list that
    ``training_step`` appends to), tensors that are neither parameters, buffers nor metric states, and
    effects outside the module.

    Args:
        module: The module whose submodules to restore.

    Example:
        >>> counter = nn.Linear(1, 1)
        >>> counter.calls = 0
        >>> with preserved_python_state(counter):
        ...     counter.calls += 1
        >>> counter.calls
        0
    """
    metrics = [_MetricSnapshot(m) for m in module.modules() if isinstance(m, Metric)]
    others = [m for m in module.modules() if not isinstance(m, Metric)]
    numbers_before = [(m, _number_attributes(m)) for m in others]
    try:
        yield
    finally:
        for m, saved in numbers_before:
            attributes = vars(m)
            for name in set(_number_attributes(m)) - set(saved):
                del attributes[name]
            for name, value in saved.items():
                if attributes.get(name, _MISSING) is not value:
                    attributes[name] = value
        for snapshot in metrics:
            snapshot.restore()


_MISSING = object()


def _number_attributes(module: nn.Module) -> dict[str, Any]:
    return {name: value for name, value in vars(module).items() if isinstance(value, numbers.Number)}


class _MetricSnapshot:
    """A metric's attribute bindings and copies of its state values (tensor and list states)."""

    def __init__(self, metric: Metric) -> None:
        self.metric = metric
        self.attributes = dict(vars(metric))
        self.values: dict[str, Tensor | list[Any]] = {}
        for name, value in metric.metric_state.items():
            self.values[name] = value.detach().clone() if isinstance(value, Tensor) else list(value)

    def restore(self) -> None:
        attributes = vars(self.metric)
        for name in set(attributes) - set(self.attributes):
            del attributes[name]
        attributes.update(self.attributes)
        for name, saved in self.values.items():
            state = attributes[name]
            if isinstance(state, list):
                state[:] = saved
            elif state.shape == saved.shape and state.dtype == saved.dtype:
                # A state created under inference mode (e.g. reset during validation) can only be
                # written in inference mode.
                with torch.no_grad(), torch.inference_mode(state.is_inference()):
                    state.copy_(saved)
            else:
                attributes[name] = saved
