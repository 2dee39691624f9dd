"""Loss closure: ``(module, loss_fn, batches) -> loss(params)`` via ``torch.func.functional_call``.

The closure never mutates the module: parameters are swapped in functionally, mode changes and
BatchNorm running statistics are undone, and every random-number generator is restored.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import fields, is_dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

LossFn = Callable[[nn.Module, Any], Tensor]
BatchSizeFn = Callable[[Any], int]
MODES = ("eval", "train")
_TRAIN_MODE_SEED = 0x1E55


def validate_mode(mode: str) -> str:
    """Check ``mode`` and return it.

    Raises:
        ValueError: If ``mode`` is not ``"eval"`` or ``"train"``.
    """
    if mode not in MODES:
        raise ValueError(
            f"`mode={mode!r}` is not supported. Use 'eval' (dropout off, BatchNorm running stats) "
            "or 'train' (BatchNorm batch statistics; running stats are left untouched)."
        )
    return mode


def _first_tensor(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        items: Iterable[Any] = batch.values()
    elif is_dataclass(batch) and not isinstance(batch, type):
        items = (getattr(batch, f.name) for f in fields(batch))
    elif isinstance(batch, list | tuple):
        items = batch
    else:
        return None
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def infer_batch_size(batch: Any) -> int:
    """Number of samples in a batch: the first dimension of the first tensor found in it.

    Args:
        batch: A tensor, or a (nested) tuple, list, dict or dataclass holding tensors.

    Returns:
        The batch size.

    Raises:
        ValueError: If the batch holds no tensor with a first dimension.

    Example:
        >>> infer_batch_size((torch.zeros(8, 3), torch.zeros(8)))
        8
    """
    tensor = _first_tensor(batch)
    if tensor is None or tensor.ndim == 0:
        raise ValueError(
            f"Cannot infer the size of a batch of type {type(batch).__name__}: it holds no tensor "
            "with a batch dimension. Pass `batch_size_fn=lambda batch: <number of samples>`."
        )
    return int(tensor.shape[0])


def _map_tensors(batch: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)({k: _map_tensors(v, fn) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_map_tensors(v, fn) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(_map_tensors(v, fn) for v in batch)
    return batch


def prepare_batch(batch: Any, dtype: torch.dtype | None = None) -> Any:
    """Make a batch usable for differentiation: floating tensors cast to ``dtype``, and tensors
    created under ``torch.inference_mode`` copied into normal tensors (autograd cannot save those).

    Args:
        batch: A tensor or nested container of tensors.
        dtype: Floating dtype to cast floating tensors to, or ``None`` to keep them.

    Returns:
        The batch with the same structure.
    """

    def convert(t: Tensor) -> Tensor:
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        if t.is_inference():
            with torch.inference_mode(False):
                t = t.clone()
        return t

    with torch.inference_mode(False):
        return _map_tensors(batch, convert)


def lightning_training_step_loss(module: nn.Module, batch: Any, batch_idx: int = 0) -> Tensor:
    """Loss of a LightningModule's own ``training_step``, with its ``self.log`` calls silenced.

    Args:
        module: A LightningModule (anything with ``training_step``).
        batch: The batch.
        batch_idx: Passed through to ``training_step``.

    Returns:
        The loss tensor (``training_step``'s return value, or its ``"loss"`` entry).

    Raises:
        TypeError: If ``training_step`` returns neither a tensor nor a dict with ``"loss"``.
    """
    with silenced_logging(module):
        out = module.training_step(batch, batch_idx)
    if isinstance(out, Mapping):
        if "loss" not in out:
            raise TypeError(
                "`training_step` returned a dict without a 'loss' entry; return the loss or pass `loss_fn=`."
            )
        out = out["loss"]
    if not isinstance(out, Tensor):
        raise TypeError(f"`training_step` returned {type(out).__name__}, not a loss tensor; pass `loss_fn=`.")
    return out


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


def resolve_loss_fn(model: nn.Module, loss_fn: LossFn | None) -> LossFn:
    """Return ``loss_fn``, or the LightningModule's ``training_step`` when it is ``None``.

    Raises:
        TypeError: If ``loss_fn`` is missing and the model has no usable ``training_step``, or the
            module uses manual optimization.
    """
    if loss_fn is not None:
        if not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable as loss_fn(module, batch), got {loss_fn!r}.")
        return loss_fn
    if not callable(getattr(model, "training_step", None)):
        raise TypeError(
            f"`loss_fn` is required for a {type(model).__name__}: pass "
            "loss_fn=lambda module, batch: F.cross_entropy(module(batch[0]), batch[1])."
        )
    if getattr(model, "automatic_optimization", True) is False:
        raise TypeError(
            f"{type(model).__name__} uses manual optimization, so its training_step does not return "
            "the loss: pass `loss_fn=lambda module, batch: ...` computing the loss."
        )
    return lightning_training_step_loss


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
    import sys

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


@contextlib.contextmanager
def preserved_tensor_slots(module: nn.Module) -> Iterator[None]:
    """Put every submodule's own parameter and buffer objects back on exit.

    ``functional_call`` in torch 2.13 leaves the swapped-in tensors on the module for parameters that
    are tied (one tensor registered under two names); restoring the slots keeps the module's identity.
    """
    slots = [(m, dict(m._parameters), dict(m._buffers)) for m in module.modules()]
    try:
        yield
    finally:
        for m, parameters, buffers in slots:
            for name, tensor in parameters.items():
                if m._parameters.get(name) is not tensor:
                    m._parameters[name] = tensor
            for name, tensor in buffers.items():
                if m._buffers.get(name) is not tensor:
                    m._buffers[name] = tensor


@contextlib.contextmanager
def _batch_norm_without_running_stats(module: nn.Module) -> Iterator[None]:
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
def differentiable_context(device: torch.device) -> Iterator[None]:
    """Grad on, inference mode off, autocast off, and the attention kernel that every AD mode supports.

    The fused CPU/GPU kernels behind ``scaled_dot_product_attention`` have no double-backward or
    forward-mode formulas; the math backend is composite and differentiates any number of times.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if device.type == "cuda" or torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        yield


class _LossModule(nn.Module):
    """Wraps ``loss_fn(model, batch)`` as a module so ``functional_call`` can swap the parameters
    that ``loss_fn`` sees when it calls the model (or any of its methods).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any, batch_idx: int) -> Tensor:
        if self.loss_fn is lightning_training_step_loss:
            return lightning_training_step_loss(self.model, batch, batch_idx)
        return self.loss_fn(self.model, batch)


class LossClosure:
    """The size-weighted mean loss over a fixed list of batches as a function of the parameters.

    Args:
        model: The module; never modified.
        loss_fn: ``loss_fn(module, batch) -> scalar``; ``None`` uses a LightningModule's
            ``training_step``.
        data: Iterable of batches (list or DataLoader); materialized once.
        mode: ``"eval"`` or ``"train"``.
        dtype: Floating dtype for parameters, buffers and inputs; ``None`` keeps the parameters'.
        batch_size_fn: ``batch -> number of samples``; default: first dim of the first tensor.

    Raises:
        ValueError: For empty ``data``, a bad ``mode``, or a batch of unknown size.

    Example:
        >>> closure = LossClosure(model, loss_fn, [(x, y)])
        >>> with closure.context():
        ...     loss = closure.batch_loss(params, 0)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None,
        data: Iterable[Any],
        *,
        mode: str = "eval",
        dtype: torch.dtype | None = None,
        batch_size_fn: BatchSizeFn | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        self.mode = validate_mode(mode)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"`dtype` must be a floating torch.dtype such as torch.float64, got {dtype!r}.")
        self.model = model
        self.loss_fn = resolve_loss_fn(model, loss_fn)
        self.dtype = dtype
        self.batches = self._materialize(data, dtype)
        size_fn = batch_size_fn or infer_batch_size
        self.batch_sizes = [int(size_fn(b)) for b in self.batches]
        if any(n <= 0 for n in self.batch_sizes):
            raise ValueError(f"Every batch must hold at least one sample; sizes: {self.batch_sizes}.")
        self.num_samples = sum(self.batch_sizes)
        self._wrapper = _LossModule(model, self.loss_fn)
        if mode == "train" and any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
            warnings.warn(
                "mode='train' with dropout: each batch uses one fixed random dropout mask, so the "
                "Hessian is that of one sampled sub-network. Use mode='eval' for the deterministic "
                "network.",
                UserWarning,
                stacklevel=3,
            )

    @staticmethod
    def _materialize(data: Iterable[Any], dtype: torch.dtype | None) -> list[Any]:
        if isinstance(data, Tensor) or not isinstance(data, Iterable):
            raise TypeError(
                "`data` must be an iterable of batches (a list of batches or a DataLoader), got "
                f"{type(data).__name__}; wrap a single batch in a list: data=[batch]."
            )
        batches = [prepare_batch(b, dtype) for b in data]
        if not batches:
            raise ValueError("`data` holds no batch; pass a non-empty list of batches or DataLoader.")
        return batches

    @property
    def device(self) -> torch.device:
        """Device of the model's first parameter (CPU for a parameterless model)."""
        first = next(self.model.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def buffers(self) -> dict[str, Tensor]:
        """Tensors held fixed while differentiating: buffers and, when computing in another dtype,
        every parameter (selected ones are overridden by the differentiated values), cast to it.
        """
        fixed = dict(self.model.named_buffers())
        if self.dtype is not None:
            fixed.update((n, p.detach()) for n, p in self.model.named_parameters())
            fixed = {n: t.to(self.dtype) if t.is_floating_point() else t for n, t in fixed.items()}
        return fixed

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Enter once around any number of loss evaluations: sets the mode, restores all state."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(preserved_rng_state([self.device]))
            stack.enter_context(preserved_module_state(self.model))
            self.model.train(self.mode == "train")
            if self.mode == "train":
                stack.enter_context(_batch_norm_without_running_stats(self.model))
            stack.enter_context(differentiable_context(self.device))
            yield

    def batch_loss(
        self, params: Mapping[str, Tensor], index: int, buffers: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        """Loss of batch ``index`` with ``params`` swapped in (call inside :meth:`context`).

        Args:
            params: Name -> tensor for (some of) the model's parameters.
            index: Batch index.
            buffers: Buffers to swap in; default :meth:`buffers`.

        Returns:
            The scalar loss of that batch (not weighted).

        Raises:
            ValueError: If the loss is not a scalar.
        """
        fixed = self.buffers() if buffers is None else buffers
        swapped = {f"model.{k}": v for k, v in fixed.items()}
        swapped.update((f"model.{k}", v) for k, v in params.items())
        if self.mode == "train":
            # One fixed random stream per batch, so dropout draws the same mask for every product.
            torch.manual_seed(_TRAIN_MODE_SEED + index)
        with preserved_tensor_slots(self.model):
            loss = functional_call(self._wrapper, swapped, (self.batches[index], index), strict=False)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                f"`loss_fn` must return a scalar tensor, got {shape}. Reduce it, e.g. with "
                "reduction='mean' in the loss function."
            )
        return loss.reshape(())

    def weight(self, index: int, total: int | None = None) -> float:
        """Weight of batch ``index`` in the mean over ``total`` samples (default: this closure's)."""
        return self.batch_sizes[index] / (total or self.num_samples)
