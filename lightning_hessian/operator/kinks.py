"""Gradient differences with the kinks frozen at θ: the Hessian that the exact methods differentiate.

# NOTE [Frozen kinks]
A ReLU network's loss is smooth only piece by piece: on the piece that holds ``θ`` every ReLU,
leaky ReLU and hardtanh takes a fixed branch per element and every max-pool a fixed argmax, and the
loss is the smooth function ``f_θ`` of the network with that *activation pattern* held fixed. The
exact methods (autograd's double backward, ``torch.func``'s jvp of grad) differentiate ``f_θ``: they
differentiate each layer's backward formula, in which ``relu'(x) = [x > 0]``, the hardtanh window and
the argmax indices are constants, so ``relu'' = 0`` and no derivative of the pattern appears. Gradient
differences take the gradient of the true loss at ``θ ± h d``, where the patterns differ from those at
``θ`` wherever a pre-activation changes sign within the step: every such crossing adds its gradient
jump, of size ``O(1)``, divided by ``2h`` (NOTE [Kinks] in :mod:`.differences`). In float32, whose steps
are about ``6e-3 L``, that made products on ReLU networks wrong by 100% and more.

Under :class:`FrozenKinks` the forward passes at ``θ ± h d`` compute ``f_θ`` itself: each kinked call
reuses the pattern recorded, call by call, in a forward pass at ``θ`` (relu as ``x * mask``, leaky
ReLU as ``x * factor`` with a factor of 1 or the slope, hardtanh as ``x`` inside its window and the
recorded bound outside, max-pooling as a gather at the recorded argmax indices). At ``θ`` each
replayed form has the native function's value and the derivative of its native backward formula (the
mask ``x > 0``, hardtanh's open window, the recorded argmax), so the forward and the gradient at ``θ``
are unchanged; and each is linear (or constant) in its input, elementwise, so ``f_θ`` is as smooth as
the network's other layers, its second derivative at ``θ`` is what double backward computes, and the
differences converge to that product at the rate of a smooth loss (NOTE [Step of gradient
differences]). Measured
on ``benchmarks/gradient_products.py``: float32 products of the ReLU + max-pool CNN 4e-5 off instead of
4.4, the ReLU transformer layer's 3.5e-5 instead of 1.1 (README, "Gradient-difference products").

Covered: ``F.relu``/``torch.relu``/``Tensor.relu`` (and their in-place forms, which stay in place),
``F.threshold``, ``F.leaky_relu``, ``F.hardtanh``/``F.relu6``, ``F.max_pool1d/2d/3d`` (with and
without ``return_indices``; replay returns the recorded indices) and ``F.adaptive_max_pool1d/2d/3d``,
which is what ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.Hardtanh``, ``nn.ReLU6``, ``nn.Threshold``,
``nn.MaxPool*``, ``nn.AdaptiveMaxPool*`` and ``nn.TransformerEncoderLayer(activation="relu")`` call (the
encoder layer's fused fast path is off while any function mode is active). Not covered, so crossed as
before: ``abs``, ``clamp``, ``max``/``min``/``maximum``, ``sort``/``topk``, ``argmax``-based indexing,
hardswish/hardsigmoid, ELU with ``alpha != 1``, kinks inside a custom ``autograd.Function`` or a fused
kernel, and modules compiled with ``torch.compile`` (or ``Module.compile``): they run without the
mode, since dynamo would trace it into the compiled graph and recompile, so their differences are
unfrozen as before. A function compiled inside ``forward`` cannot be told apart: dynamo then traces the
mode (frozen products, as eager; two recompilations on a compiled ReLU).

Replay is checked call by call: the function, the input's shape and dtype and the function's settings
must be those recorded, and every recorded pattern must be used. Activation checkpointing runs the
forward again inside backward, where no function mode is active (``torch.autograd.grad`` and
``.backward()`` run with the mode popped), so the patterns could not be replayed there: it is found
when the patterns are recorded (``torch.utils.checkpoint``'s saved-tensor hooks around a kinked call,
or a reentrant checkpoint's node in the loss's graph). Where anything differs (data-dependent control
flow, checkpointing, a frozen pass that raises where the unfrozen one does not), the operator warns
once and uses unfrozen differences from then on, the whole product recomputed: never a frozen pattern
applied to the wrong call, never a mixture. :class:`~lightning_hessian.ShardedHessianOperator` replays
the patterns recorded in the pass at ``θ`` that builds it, and its ranks agree on every product's
replay (a rank that raises inside a sharded forward fails every rank, as without freezing).

Memory: one pattern per kinked call of a batch's forward, kept per batch while all batches' patterns
fit in a quarter of the free memory (else only the latest batch's, recorded again, in one forward
pass, when needed): as many bytes per element of each ReLU or leaky ReLU input as the input has (a
factor multiplied in, so that replay costs what the activation does), one per element of each other
threshold or hardtanh input (a bool mask or an int8 code), and eight per element of each max-pool
output (int64 indices); the benchmark's ReLU CNN (32 samples of 3x8x8, two ReLUs and a max-pool)
keeps 328 kB (131 kB with bool masks).

About 540 lines, 165 of them docstrings: the record and replay rule of each kinked function, the mode
that applies them, their checks, and the per-batch cache that switches freezing off are one contract
(what is recorded is what is replayed), kept in one module.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..closure import LossClosure
from ..memory import available_memory

#: Share of free memory the kept patterns of all batches may take (else only the latest is kept).
PATTERN_MEMORY_SHARE = 0.25

Bound = dict[str, Any]
Result = TypeVar("Result")


class _Kink:
    """How one family of kinked functions is recorded and replayed.

    Args:
        names: The function's positional argument names (the input first).
        defaults: Default values of the arguments not passed.
        settings: Names of the arguments that must match between recording and replay.
    """

    def __init__(self, names: tuple[str, ...], defaults: Bound, settings: tuple[str, ...]) -> None:
        self.names, self.defaults, self.settings = names, defaults, settings

    def bind(self, args: tuple, kwargs: dict) -> Bound | None:
        """The arguments by name, or ``None`` when the call is not frozen (not a floating input,
        or settings that are not plain numbers).
        """
        bound = {**self.defaults, **dict(zip(self.names, args, strict=False)), **kwargs}
        x = bound.get("input")
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return None
        if not all(_is_plain(bound.get(name)) for name in self.settings):
            return None
        return bound

    def key(self, func: Any, bound: Bound) -> tuple:
        """What recording and replay must agree on: function, input shape and dtype, settings."""
        x = bound["input"]
        return (func, tuple(x.shape), x.dtype, tuple(_hashable(bound.get(n)) for n in self.settings))

    def record(self, func: Any, bound: Bound, args: tuple, kwargs: dict) -> tuple[Any, Tensor]:
        """Run the native function; return its output and the pattern of its input."""
        raise NotImplementedError

    def replay(self, bound: Bound, pattern: Tensor) -> Any:
        """The function with the recorded pattern in place of its input's own."""
        raise NotImplementedError


class _Threshold(_Kink):
    """``x if x > threshold else value``; the pattern is ``x > threshold``, or for relu (threshold and
    value 0) its factor ``1.0 / 0.0`` in the input's dtype, which replay multiplies in: as fast as relu
    itself, forward and backward (a bool mask is converted at every use: the mid-size CNN's products
    cost 0.2 gradients more; ``torch.where`` is slower still).
    """

    def record(self, func: Any, bound: Bound, args: tuple, kwargs: dict) -> tuple[Any, Tensor]:
        x = bound["input"]
        mask = x > bound["threshold"]  # before an in-place call overwrites the input
        pattern = mask.to(x.dtype) if _is_relu(bound) else mask
        return func(*args, **kwargs), pattern

    def replay(self, bound: Bound, pattern: Tensor) -> Any:
        x, value = bound["input"], bound["value"]
        if _is_relu(bound):
            return x.mul_(pattern) if bound["inplace"] else x * pattern
        if bound["inplace"]:
            return x.masked_fill_(pattern.logical_not(), value)
        return torch.where(pattern, x, value)


def _is_relu(bound: Bound) -> bool:
    return bound["threshold"] == 0 and bound["value"] == 0


class _LeakyReLU(_Kink):
    """``x if x > 0 else slope * x``; the pattern is its factor, ``1`` or ``slope`` per element in the
    input's dtype, which replay multiplies in (as :class:`_Threshold` does relu's).
    """

    def record(self, func: Any, bound: Bound, args: tuple, kwargs: dict) -> tuple[Any, Tensor]:
        x = bound["input"]
        factor = x.new_full(x.shape, bound["negative_slope"]).masked_fill_(x > 0, 1.0)
        return func(*args, **kwargs), factor

    def replay(self, bound: Bound, pattern: Tensor) -> Any:
        x = bound["input"]
        return x.mul_(pattern) if bound["inplace"] else x * pattern


class _Hardtanh(_Kink):
    """``x`` clamped to ``[min_val, max_val]``; the pattern is -1 below or at the lower bound, 1 at or
    above the upper one, 0 inside (where hardtanh's derivative is 1), as int8.
    """

    def record(self, func: Any, bound: Bound, args: tuple, kwargs: dict) -> tuple[Any, Tensor]:
        x = bound["input"]
        code = (x >= bound["max_val"]).to(torch.int8) - (x <= bound["min_val"]).to(torch.int8)
        return func(*args, **kwargs), code

    def replay(self, bound: Bound, pattern: Tensor) -> Any:
        x = bound["input"]
        low, high = x.new_tensor(bound["min_val"]), x.new_tensor(bound["max_val"])
        clamped = torch.where(pattern == 0, x, torch.where(pattern > 0, high, low))
        return x.copy_(clamped) if bound["inplace"] else clamped


class _MaxPool(_Kink):
    """Max-pooling over the last ``dims`` dimensions; the pattern is the argmax indices (int64, into
    each flattened input plane, as ``return_indices=True`` gives them).

    Args:
        dims: Pooled dimensions (1, 2 or 3).
        with_indices: The native function that also returns the indices, called to record.
        always_indices: The function returns ``(output, indices)`` whatever ``return_indices`` says.
        names, defaults, settings: As for :class:`_Kink`.
    """

    def __init__(
        self,
        dims: int,
        with_indices: Callable[..., tuple[Tensor, Tensor]],
        names: tuple[str, ...],
        defaults: Bound,
        settings: tuple[str, ...],
        always_indices: bool = False,
    ) -> None:
        super().__init__(names, defaults, settings)
        self.dims, self.with_indices, self.always_indices = dims, with_indices, always_indices

    def _wants_indices(self, bound: Bound) -> bool:
        return self.always_indices or bool(bound.get("return_indices", False))

    def record(self, func: Any, bound: Bound, args: tuple, kwargs: dict) -> tuple[Any, Tensor]:
        settings = {n: bound[n] for n in self.settings}
        output, indices = self.with_indices(bound["input"], **settings, return_indices=True)
        return ((output, indices) if self._wants_indices(bound) else output), indices

    def replay(self, bound: Bound, pattern: Tensor) -> Any:
        x = bound["input"]
        planes = x.flatten(start_dim=x.ndim - self.dims)
        gathered = planes.gather(-1, pattern.flatten(start_dim=pattern.ndim - self.dims))
        output = gathered.reshape(pattern.shape)
        return (output, pattern) if self._wants_indices(bound) else output


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float))


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


def _kinks() -> dict[Any, _Kink]:
    """Every covered function and how it is frozen."""
    relu = ("input", "inplace")
    threshold = ("threshold", "value", "inplace")
    kinks: dict[Any, _Kink] = {
        F.relu: _Threshold(relu, {"inplace": False, "threshold": 0, "value": 0}, threshold),
        torch.relu: _Threshold(("input",), {"inplace": False, "threshold": 0, "value": 0}, threshold),
        torch.relu_: _Threshold(("input",), {"inplace": True, "threshold": 0, "value": 0}, threshold),
        Tensor.relu: _Threshold(("input",), {"inplace": False, "threshold": 0, "value": 0}, threshold),
        Tensor.relu_: _Threshold(("input",), {"inplace": True, "threshold": 0, "value": 0}, threshold),
        F.threshold: _Threshold(("input", *threshold), {"inplace": False}, threshold),
        F.leaky_relu: _LeakyReLU(
            ("input", "negative_slope", "inplace"),
            {"negative_slope": 0.01, "inplace": False},
            ("negative_slope", "inplace"),
        ),
        F.leaky_relu_: _LeakyReLU(
            ("input", "negative_slope"), {"negative_slope": 0.01, "inplace": True}, ("negative_slope",)
        ),
    }
    window = ("min_val", "max_val", "inplace")
    kinks[F.hardtanh] = _Hardtanh(
        ("input", *window), {"min_val": -1.0, "max_val": 1.0, "inplace": False}, window
    )
    kinks[F.hardtanh_] = _Hardtanh(
        ("input", "min_val", "max_val"), {"min_val": -1.0, "max_val": 1.0, "inplace": True}, window
    )
    kinks[F.relu6] = _Hardtanh(relu, {"min_val": 0.0, "max_val": 6.0, "inplace": False}, window)
    pool = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
    pool_defaults: Bound = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False}
    for dims in (1, 2, 3):
        with_indices = getattr(F, f"max_pool{dims}d_with_indices")
        names = ("input", *pool, "return_indices")
        for func, always in ((getattr(F, f"max_pool{dims}d"), False), (with_indices, True)):
            kinks[func] = _MaxPool(dims, with_indices, names, pool_defaults, pool, always)
        kinks[getattr(torch, f"max_pool{dims}d")] = _MaxPool(
            dims, with_indices, ("input", *pool), {**pool_defaults, "stride": ()}, pool
        )
        adaptive = getattr(F, f"adaptive_max_pool{dims}d_with_indices")
        for func, always in ((getattr(F, f"adaptive_max_pool{dims}d"), False), (adaptive, True)):
            kinks[func] = _MaxPool(
                dims, adaptive, ("input", "output_size", "return_indices"), {}, ("output_size",), always
            )
    return kinks


_KINKS = _kinks()


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


@dataclass
class KinkPatterns:
    """The activation patterns of one forward pass, in call order.

    Attributes:
        keys: Per kinked call, what replay must match (function, input shape and dtype, settings).
        values: Per kinked call, its pattern: a bool mask, an int8 code or int64 pooling indices.
    """

    keys: list[tuple] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.values)

    @property
    def nbytes(self) -> int:
        """Bytes held by the patterns."""
        return sum(p.numel() * p.element_size() for p in self.values)


class FrozenKinks(TorchFunctionMode):
    """Records the activation patterns of a forward pass, or replays recorded ones (NOTE [Frozen kinks]).

    Without ``patterns`` it records: every covered kinked call runs natively and its pattern is
    appended to :attr:`patterns`. With ``patterns`` it replays: the ``i``-th covered call computes the
    function with the ``i``-th recorded pattern. A call that does not match its recording (or comes
    after :meth:`close`) sets :attr:`mismatch` and runs natively, as do all calls after it.

    Args:
        patterns: The patterns to replay; ``None`` to record.

    Example:
        >>> with FrozenKinks() as recording:
        ...     model(x)  # doctest: +SKIP
        >>> with FrozenKinks(recording.patterns) as replay:
        ...     loss = loss_fn(perturbed_model(x))  # same masks and argmaxes  # doctest: +SKIP
        ...     replay.close()  # doctest: +SKIP
        >>> replay.mismatch is None  # doctest: +SKIP
        True
    """

    def __init__(self, patterns: KinkPatterns | None = None) -> None:
        super().__init__()
        self.recording = patterns is None
        self.patterns = KinkPatterns() if patterns is None else patterns
        self.mismatch: str | None = None
        self._position = 0
        self._closed = False

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        try:
            kink = _KINKS.get(func)
        except TypeError:  # an unhashable callable
            kink = None
        bound = None if kink is None or self.mismatch is not None else kink.bind(args, kwargs)
        if bound is None:
            return func(*args, **kwargs)
        assert kink is not None
        key = kink.key(func, bound)
        if self._closed:
            self._fail(f"{_name(func)} ran after the forward pass at θ ± h v")
        elif self.recording:
            if _inside_checkpoint():
                self._fail(_RECOMPUTED)
            output, pattern = kink.record(func, bound, args, kwargs)
            self.patterns.keys.append(key)
            self.patterns.values.append(pattern)
            return output
        elif self._position >= len(self.patterns) or self.patterns.keys[self._position] != key:
            self._fail(self._describe(key))
        else:
            pattern = self.patterns.values[self._position]
            self._position += 1
            return kink.replay(bound, pattern)
        return func(*args, **kwargs)

    def close(self, loss: Tensor | None = None) -> None:
        """Mark the end of the forward pass: every recorded pattern must have been replayed, and any
        covered call from now on is a mismatch.

        Args:
            loss: The recorded forward's loss: a reentrant activation checkpoint in its graph, whose
                backward runs the forward again without the mode, sets :attr:`mismatch` (the patterns
                cannot be replayed).
        """
        if self.recording and loss is not None and len(self.patterns) and _recomputes_forward(loss):
            self._fail(_RECOMPUTED)
        if not self.recording and self.mismatch is None and self._position != len(self.patterns):
            self._fail(
                f"the forward at θ ± h v made {self._position} kinked calls, {len(self.patterns)} at θ"
            )
        self._closed = True

    def _fail(self, reason: str) -> None:
        self.mismatch = self.mismatch or reason

    def _describe(self, key: tuple) -> str:
        call = (
            f"kinked call {self._position + 1} of the forward at θ ± h v ({_name(key[0])} on {list(key[1])})"
        )
        if self._position >= len(self.patterns):
            return f"{call} is beyond the {len(self.patterns)} made at θ"
        recorded = self.patterns.keys[self._position]
        return f"{call} is not the one made at θ ({_name(recorded[0])} on {list(recorded[1])})"


class KinkMismatch(RuntimeError):
    """A replay did not match its recording; freezing is off now and the computation is to be redone."""


def compiled_submodules(model: nn.Module) -> list[str]:
    """Names of the submodules that ``torch.compile`` or ``Module.compile`` compiled (``""``: the root).

    Example:
        >>> compiled_submodules(torch.compile(nn.Linear(2, 2)))  # doctest: +SKIP
        ['']
    """
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - torch without dynamo
        return []
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, OptimizedModule) or getattr(module, "_compiled_call_impl", None) is not None
    ]


class KinkCache:
    """The activation patterns at ``θ`` of each batch of a closure, recorded when first needed.

    Args:
        closure: The loss closure.
        params: The parameter values ``θ``, by name.

    Example:
        >>> kinks = KinkCache(closure, params)
        >>> with closure.context(second_order=False):
        ...     with kinks.frozen(0, closure.buffers()) as mode:  # doctest: +SKIP
        ...         loss = closure.batch_loss(perturbed, 0)  # doctest: +SKIP
        ...         kinks.close(mode)  # doctest: +SKIP
    """

    def __init__(self, closure: LossClosure, params: Mapping[str, Tensor]) -> None:
        self.closure = closure
        self.params = dict(params)
        compiled = compiled_submodules(closure.model)
        #: Why differences are not frozen (``None`` while they are).
        self.off: str | None = f"compiled modules {compiled}" if compiled else None
        #: Bumped whenever freezing is switched off, so that kept differences can be dropped.
        self.version = 0
        self._patterns: dict[int, KinkPatterns] = {}
        self._keep_all: bool | None = None

    def patterns(self, index: int, fixed: Mapping[str, Tensor]) -> KinkPatterns | None:
        """Batch ``index``'s patterns at ``θ`` (call inside the closure's context), or ``None`` where
        nothing is frozen (freezing off, or no covered kinked call).
        """
        if self.off is not None:
            return None
        patterns = self._patterns.get(index)
        if patterns is None:
            patterns = self._record(index, fixed)
            if self.off is not None:
                return None
            if not self._keep_all:
                self._patterns.clear()
            self._patterns[index] = patterns
        return patterns if len(patterns) else None

    def run(
        self, index: int, fixed: Mapping[str, Tensor], compute: Callable[[FrozenKinks | None], Result]
    ) -> Result:
        """``compute(mode)`` with batch ``index``'s patterns replayed (call inside the closure's context).

        ``compute`` runs the forward pass and calls ``mode.close()`` after it when ``mode`` is not
        ``None`` (``None``: nothing to freeze), then backward.

        Raises:
            KinkMismatch: When the replay did not match its recording, or raised where the unfrozen
                pass does not (freezing is then off for good, with one warning): the caller computes
                again. An error that the unfrozen pass raises too is raised as it is.
        """
        patterns = self.patterns(index, fixed)
        if patterns is None:
            return compute(None)
        mode = FrozenKinks(patterns)
        try:
            with mode:
                result = compute(mode)
            mode.close()
        except Exception as error:
            if mode.mismatch is None:
                compute(None)  # an error of the module's own is raised here, freezing left on
                first = str(error).splitlines()[0].rstrip(".") if str(error) else ""
                mode.mismatch = f"the frozen pass raised {type(error).__name__}: {first}"
            self.switch_off(mode.mismatch)
            raise KinkMismatch(mode.mismatch) from error
        if mode.mismatch is not None:
            self.switch_off(mode.mismatch)
            raise KinkMismatch(mode.mismatch)
        return result

    def switch_off(self, reason: str) -> None:
        """Use unfrozen differences from now on, with one warning naming ``reason``."""
        if self.off is not None:
            return
        self.off = reason
        self.version += 1
        self._patterns.clear()
        warn_unfrozen(reason, "This operator's")

    def _record(self, index: int, fixed: Mapping[str, Tensor]) -> KinkPatterns:
        leaves = {n: p.detach().requires_grad_(True) for n, p in self.params.items()}
        with FrozenKinks() as recording:
            loss = self.closure.batch_loss(leaves, index, fixed)
        recording.close(loss)
        if recording.mismatch is not None:
            self.switch_off(recording.mismatch)
        patterns = recording.patterns
        if self._keep_all is None:
            free = available_memory(next(iter(self.params.values())).device)
            per_sample = patterns.nbytes / max(1, self.closure.batch_sizes[index])
            self._keep_all = (
                free is None or per_sample * self.closure.num_samples <= PATTERN_MEMORY_SHARE * free
            )
        return patterns


_RECOMPUTED = "activation checkpointing (torch.utils.checkpoint) runs the forward again in backward"


def _inside_checkpoint() -> bool:
    """Whether the call runs inside a ``torch.utils.checkpoint(use_reentrant=False)`` region, whose
    saved-tensor hooks recompute it in backward (private API; ``False`` where it is missing).
    """
    if torch.compiler.is_compiling():  # dynamo cannot trace the query (a graph break and a warning)
        return False
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    try:
        hooks = top(False) if top is not None else None
    except Exception:  # noqa: BLE001 - a torch whose private API differs: nothing found
        return False
    return bool(hooks) and "checkpoint" in getattr(hooks[0], "__qualname__", "")


def _recomputes_forward(loss: Tensor) -> bool:
    """Whether the loss's graph holds a reentrant activation checkpoint, whose backward runs the
    forward again without the mode.
    """
    stack, seen = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if node.name() == "CheckpointFunctionBackward":
            return True
        seen.add(node)
        stack.extend(parent for parent, _ in node.next_functions)
    return False


def warn_unfrozen(reason: str, whose: str, stacklevel: int = 6) -> None:
    """Say that gradient differences stop freezing kinks, and why.

    Example:
        >>> warn_unfrozen("a reason", "This operator's")  # doctest: +SKIP
    """
    warnings.warn(
        f"Gradient differences cannot freeze this model's kinks (ReLU, max-pooling) at θ: {reason}. "
        f"{whose} products use unfrozen differences from now on, which are wrong where their steps "
        "cross kinks (NOTE [Frozen kinks] in lightning_hessian/operator/kinks.py).",
        RuntimeWarning,
        stacklevel=stacklevel,
    )
