"""Loss closure: ``(module, loss_fn, batches) -> loss(params)`` with the parameters swapped in.

The closure never mutates the module: parameters are swapped into its slots for the call and put back
(:class:`~lightning_hessian.state.TensorSlots`, what ``torch.func.functional_call`` does), mode
changes and BatchNorm running statistics are undone, and every random-number generator is restored.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .batches import BatchSizeFn, infer_batch_size, prepare_batch
from .state import (
    TensorSlots,
    batch_norm_without_running_stats,
    differentiable_context,
    preserved_module_state,
    preserved_rng_state,
    silenced_logging,
)
from .validation import check_callable, check_choice, check_dtype

LossFn = Callable[[nn.Module, Any], Tensor]
MODES = ("eval", "train")
#: How batch losses combine: their size-weighted mean, or their plain sum.
REDUCTIONS = ("mean", "sum")
_TRAIN_MODE_SEED = 0x1E55


def validate_mode(mode: str) -> str:
    """Check ``mode`` and return it.

    Raises:
        ValueError: If ``mode`` is not ``"eval"`` or ``"train"``.
    """
    return check_choice(
        "mode",
        mode,
        MODES,
        "Use 'eval' (dropout off, BatchNorm running stats) or 'train' (BatchNorm batch statistics; "
        "running stats are left untouched).",
    )


def validate_reduction(reduction: str) -> str:
    """Check ``reduction`` and return it.

    Raises:
        ValueError: If ``reduction`` is not ``"mean"`` or ``"sum"``.
    """
    return check_choice(
        "reduction",
        reduction,
        REDUCTIONS,
        "Use 'mean' (the size-weighted mean of batch losses, for mean-reduced losses) or 'sum' (their "
        "plain sum, for losses with reduction='sum').",
    )


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


def resolve_loss_fn(model: nn.Module, loss_fn: LossFn | None) -> LossFn:
    """Return ``loss_fn``, or the LightningModule's ``training_step`` when it is ``None``.

    Raises:
        TypeError: If ``loss_fn`` is missing and the model has no usable ``training_step``, or the
            module uses manual optimization.
    """
    if loss_fn is not None:
        return check_callable("loss_fn", loss_fn, "loss_fn(module, batch)")
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


def _scalar(loss: Any) -> Tensor:
    """``loss`` as a 0-d tensor.

    Raises:
        ValueError: If it is not a one-element tensor.
    """
    if isinstance(loss, Tensor) and loss.ndim == 0:
        return loss
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"`loss_fn` must return a scalar tensor, got {shape}. Reduce it, e.g. with "
            "reduction='mean' in the loss function."
        )
    return loss.reshape(())


class _Hold:
    """How deep the :meth:`LossClosure.held` calls over one model are nested."""

    depth: int = 0


class LossClosure:
    """The mean (or sum) of the losses of a fixed list of batches as a function of the parameters.

    Args:
        model: The module; never modified.
        loss_fn: ``loss_fn(module, batch) -> scalar``; ``None`` uses a LightningModule's
            ``training_step``.
        data: Iterable of batches (list or DataLoader); materialized once.
        mode: ``"eval"`` or ``"train"``.
        dtype: Floating dtype for parameters, buffers and inputs; ``None`` keeps the parameters'.
        batch_size_fn: ``batch -> number of samples``; default: first dim of the first tensor.
        reduction: ``"mean"``: the size-weighted mean of batch losses; ``"sum"``: their plain sum.

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
        reduction: str = "mean",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        self.mode = validate_mode(mode)
        self.reduction = validate_reduction(reduction)
        dtype = check_dtype("dtype", dtype)
        self.model = model
        self.loss_fn = resolve_loss_fn(model, loss_fn)
        self.dtype = dtype
        self.batches = self._materialize(data, dtype)
        if batch_size_fn is not None:
            check_callable("batch_size_fn", batch_size_fn, "batch_size_fn(batch) -> number of samples")
        size_fn = batch_size_fn or infer_batch_size
        self.batch_sizes = [int(size_fn(b)) for b in self.batches]
        if any(n <= 0 for n in self.batch_sizes):
            raise ValueError(f"Every batch must hold at least one sample; sizes: {self.batch_sizes}.")
        self.num_samples = sum(self.batch_sizes)
        self._slots = TensorSlots(model)
        self._hold = _Hold()  # shared with subset() copies
        self._device: torch.device | None = None
        self.batch_offset = 0  # index of the first batch in the data it was taken from (see subset)
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
        if self._device is None:
            first = next(self.model.parameters(), None)
            self._device = first.device if first is not None else torch.device("cpu")
        return self._device

    def buffers(self) -> dict[str, Tensor]:
        """Tensors held fixed while differentiating: buffers and, when computing in another dtype,
        every parameter (selected ones are overridden by the differentiated values), cast to it.
        """
        fixed = self._slots.current("_buffers")
        if self.dtype is not None:
            fixed.update((n, p.detach()) for n, p in self._slots.current("_parameters").items())
            fixed = {n: t.to(self.dtype) if t.is_floating_point() else t for n, t in fixed.items()}
        return fixed

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Set the mode and save every state once around many :meth:`context` entries.

        Entering :meth:`context` saves and restores the generators, training flags, buffers and
        ``.grad`` (hundreds of microseconds, more than a small model's gradient); inside ``held``
        it only sets up autograd, and everything is restored when ``held`` exits. An analysis holds
        its closure for all its products (no user code runs between them); nested calls, also from
        :meth:`subset` closures, share the outermost one.

        Example:
            >>> with closure.held():
            ...     for i in range(len(closure.batches)):
            ...         with closure.context():
            ...             loss = closure.batch_loss(params, i)
        """
        if self._hold.depth:
            self._hold.depth += 1
            try:
                yield
            finally:
                self._hold.depth -= 1
            return
        with contextlib.ExitStack() as stack:
            stack.enter_context(preserved_rng_state([self.device]))
            stack.enter_context(preserved_module_state(self.model))
            self.model.train(self.mode == "train")
            if self.mode == "train":
                stack.enter_context(batch_norm_without_running_stats(self.model))
            self._hold.depth = 1
            try:
                yield
            finally:
                self._hold.depth = 0

    @contextlib.contextmanager
    def context(self, second_order: bool = True) -> Iterator[None]:
        """Enter once around any number of loss evaluations: sets the mode, restores all state.

        Args:
            second_order: Whether the losses will be differentiated twice (then attention runs on
                the math kernel, see :func:`~lightning_hessian.state.differentiable_context`); plain
                gradients keep the module's own attention kernel.
        """
        with self.held(), differentiable_context(self.device, math_attention=second_order):
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
        with self.evaluated(params, index, buffers) as loss:
            return loss

    @contextlib.contextmanager
    def evaluated(
        self, params: Mapping[str, Tensor], index: int, buffers: Mapping[str, Tensor] | None = None
    ) -> Iterator[Tensor]:
        """:meth:`batch_loss`, with ``params`` kept in the module's slots until exit.

        Differentiate inside it: activation checkpointing (``torch.utils.checkpoint``) runs the
        forward again during backward, which must see the same swapped-in tensors.

        Example:
            >>> with closure.context(), closure.evaluated(leaves, 0) as loss:
            ...     grads = torch.autograd.grad(loss, list(leaves.values()))
        """
        with self.swapped(params, buffers):
            yield self.module_loss(index)

    def swapped(
        self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor] | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """``params`` and ``buffers`` (default :meth:`buffers`) in the module's slots until exit.

        For many losses at the same tensors (whose values may change in between): each is
        :meth:`module_loss` inside it, and differentiated there (see :meth:`evaluated`).

        Example:
            >>> with closure.context(), closure.swapped(leaves):
            ...     losses = [closure.module_loss(i) for i in range(len(closure.batches))]
        """
        fixed = self.buffers() if buffers is None else buffers
        return self._slots.swapped({**fixed, **params})

    def module_loss(self, index: int) -> Tensor:
        """Loss of batch ``index`` with the tensors in the module's slots, through its own forward
        (call inside :meth:`context`).

        Those are the module's own parameters, or what :meth:`swapped` put there. For modules that
        manage their parameters themselves, such as FSDP2's sharded modules, which all-gather them in
        forward, nothing is swapped in (see :meth:`batch_loss` for that).

        Raises:
            ValueError: If the loss is not a scalar.
        """
        if self.mode == "train":
            # One fixed random stream per batch, so dropout draws the same mask for every product.
            torch.manual_seed(_TRAIN_MODE_SEED + self.batch_offset + index)
        batch, batch_idx = self.batches[index], self.batch_offset + index
        if self.loss_fn is lightning_training_step_loss:
            return _scalar(lightning_training_step_loss(self.model, batch, batch_idx))
        return _scalar(self.loss_fn(self.model, batch))

    def subset(self, index: int) -> LossClosure:
        """A closure over batch ``index`` alone (same model, loss and settings; mean reduction).

        Its one batch keeps its index for ``training_step``'s ``batch_idx`` and train-mode seeding.
        """
        single = copy.copy(self)
        single.batches = [self.batches[index]]
        single.batch_sizes = [self.batch_sizes[index]]
        single.num_samples = self.batch_sizes[index]
        single.reduction = "mean"
        single.batch_offset = self.batch_offset + index
        return single

    def weight(self, index: int, total: int | None = None) -> float:
        """Weight of batch ``index``: its share of ``total`` samples (default: this closure's), or 1.

        With ``reduction="mean"`` the objective is the size-weighted mean of the batch losses (the
        loss of the concatenated data for a mean-reduced ``loss_fn``); with ``"sum"`` it is their
        plain sum (the loss of the concatenated data for a sum-reduced ``loss_fn``).
        """
        if self.reduction == "sum":
            return 1.0
        return self.batch_sizes[index] / (total or self.num_samples)
