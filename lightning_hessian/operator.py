"""The Hessian of a module's loss w.r.t. its parameters as a symmetric linear operator.

Products are exact (Pearlmutter's trick), by one of two methods:

- ``"reverse-over-reverse"``: differentiate the gradient once more with ``grad_outputs=v``. The
  first-order graph of each batch is built once and reused for every product while memory allows;
  many vectors at once go through ``is_grads_batched`` (vmap over the backward pass).
- ``"forward-over-reverse"``: ``torch.func.jvp`` of ``torch.func.grad``; many vectors at once
  through ``torch.func.vmap``.

``hvp="auto"`` times both on the first product (and both batched forms on the first matrix product),
checks that they agree, and keeps the fastest method that works and agrees for the model at hand.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .closure import BatchSizeFn, LossClosure, LossFn, differentiable_context
from .errors import NonFiniteHessianError, RankFailedError
from .memory import available_memory, saved_tensor_bytes
from .parameters import ParameterSpace, Patterns, select_parameters

REVERSE = "reverse-over-reverse"
FORWARD = "forward-over-reverse"
HVP_METHODS = ("auto", REVERSE, FORWARD)
_GRAPH_CACHE_SHARE = 0.25  # share of free memory the cached first-order graphs may take
_CHUNK_MEMORY_SHARE = 0.25  # share of free memory one batched product may take
_MAX_CHUNK = 256  # batched products of more columns run slower per column (cache), measured
_LOOP = " (loop)"
_SELECTION_COLUMNS = 32  # columns timed per candidate when choosing the batched method
_VECTOR_ROUNDS = 3  # timed runs per candidate (after a warm-up), interleaved; the fastest counts
_MATRIX_ROUNDS = 2
_WARM_UP_COLUMNS = 4  # untimed first batched run of each candidate
_BLOCK_SELECTION_MIN_COLUMNS = 1024  # a dense block this wide gets its own batched-method choice


@dataclass
class _Graph:
    leaves: list[Tensor]
    grads: list[Tensor]
    loss: Tensor


@dataclass
class MethodChoice:
    """How ``hvp="auto"`` chose a method: seconds per product of each candidate, or its failure.

    Attributes:
        vector: Method used for single vectors.
        matrix: Method used for batched products (``"<method> (loop)"`` when batching failed).
        seconds: Measured seconds per product by candidate.
        failures: Error message by candidate that failed or disagreed.
    """

    vector: str | None = None
    matrix: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


_METHOD_MEMORY: dict[tuple[Any, ...], MethodChoice] = {}
_METHOD_MEMORY_SIZE = 64


class _EvalBatchNormAsAffine(TorchFunctionMode):
    """Evaluate eval-mode ``F.batch_norm`` as the per-channel affine map that it is.

    ``(x - mean) / sqrt(var + eps) * weight + bias`` with fixed running statistics is the same
    function of ``x``, ``weight`` and ``bias`` (so the same exact Hessian, up to float rounding),
    but its second derivatives are a few elementwise products instead of the generic batch-norm
    double backward: reverse-over-reverse products of a conv-BN-ReLU network are ~15% cheaper
    (measured on the mid-size CNN of ``benchmarks/hvp.py``). Train-mode calls, and calls with
    mixed dtypes, run unchanged.
    """

    _NAMES = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            bound = {**dict(zip(self._NAMES, args, strict=False)), **kwargs}
            affine = _affine_batch_norm(bound)
            if affine is not None:
                return affine
        return func(*args, **kwargs)


def _affine_batch_norm(bound: dict[str, Any]) -> Tensor | None:
    x, mean, var = bound.get("input"), bound.get("running_mean"), bound.get("running_var")
    weight, bias = bound.get("weight"), bound.get("bias")
    if bound.get("training", False) or not all(isinstance(t, Tensor) for t in (x, mean, var)):
        return None
    if x.ndim < 2 or any(t is not None and t.dtype != x.dtype for t in (mean, var, weight, bias)):
        return None
    scale = torch.rsqrt(var + bound.get("eps", 1e-5))
    if weight is not None:
        scale = weight * scale
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return x * scale.reshape(shape) + shift.reshape(shape)


def _tensor_signature(batch: Any) -> tuple[Any, ...]:
    """Shapes and dtypes of every tensor in a (nested) batch."""
    if isinstance(batch, Tensor):
        return ((tuple(batch.shape), str(batch.dtype)),)
    if isinstance(batch, dict):
        return tuple(item for key in sorted(batch, key=str) for item in _tensor_signature(batch[key]))
    if isinstance(batch, list | tuple):
        return tuple(item for value in batch for item in _tensor_signature(value))
    return (type(batch).__name__,)


def _resolve_process_group(process_group: Any) -> Any:
    if process_group == "auto":
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None
    return process_group


def _relative_difference(a: Tensor, b: Tensor) -> float:
    scale = max(float(a.norm()), float(b.norm()), torch.finfo(a.dtype).tiny)
    return float((a - b).norm()) / scale


def _agreement_tolerance(dtype: torch.dtype) -> float:
    return 1e-3 if dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-7


class HessianOperator:
    """The Hessian ``H = d²L/dθ²`` of the size-weighted mean loss over ``data`` w.r.t. parameters.

    ``op @ v`` multiplies a vector ``[N]``, ``op @ V`` a matrix ``[N, m]``. The operator is taken at
    the parameters' values when it is constructed (they are copied) and never modifies the model.
    Under ``torch.distributed`` it sums the products of all ranks (weighted by sample counts), so it
    is the Hessian of the loss over the union of every rank's batches.

    Args:
        model: Any ``nn.Module``.
        loss_fn: ``loss_fn(module, batch) -> scalar``. ``module`` is the model itself; call it as
            usual. ``None`` uses a LightningModule's ``training_step``.
        data: Iterable of batches (list or DataLoader).
        params: Glob pattern(s) on parameter names; default all trainable parameters.
        mode: ``"eval"`` (default) or ``"train"``.
        dtype: Compute dtype (e.g. ``torch.float64``); default the parameters' dtype.
        batch_size_fn: ``batch -> number of samples``; default first dim of the first tensor.
        hvp: ``"auto"``, ``"reverse-over-reverse"`` or ``"forward-over-reverse"``.
        cache_graphs: Keep each batch's first-order graph for reuse (``"auto"``: while it fits in a
            quarter of free memory).
        chunk_size: Columns per batched product (default: sized from free memory).
        process_group: ``"auto"`` (the default group when ``torch.distributed`` is initialized with
            more than one rank), a process group, or ``None`` for this process's data only.

    Raises:
        ValueError: For bad arguments, a non-scalar loss, or a loss that does not depend on the
            selected parameters; all checked on the first batch before any product.

    Example:
        >>> op = HessianOperator(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), [(x, y)])
        >>> hv = op @ torch.randn(op.shape[0])
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
        cache_graphs: bool | str = "auto",
        chunk_size: int | None = None,
        process_group: Any = "auto",
    ) -> None:
        if hvp not in HVP_METHODS:
            raise ValueError(f"`hvp={hvp!r}` is not one of {HVP_METHODS}.")
        if cache_graphs not in (True, False, "auto"):
            raise ValueError(f"`cache_graphs` must be True, False or 'auto', got {cache_graphs!r}.")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"`chunk_size` must be a positive integer or None, got {chunk_size!r}.")
        if data is None:
            raise ValueError("`data` is required: an iterable of batches (a list or a DataLoader).")
        selected = select_parameters(model, params)
        closure = LossClosure(model, loss_fn, data, mode=mode, dtype=dtype, batch_size_fn=batch_size_fn)
        dtypes = {p.dtype for p in selected.values()}
        if dtype is None and len(dtypes) > 1:
            raise ValueError(
                f"The selected parameters have several dtypes {sorted(map(str, dtypes))}; pass "
                "`dtype=` (e.g. torch.float32) to compute in one."
            )
        self._setup(
            closure,
            {n: p.detach() for n, p in selected.items()},
            dtype=dtype or next(iter(dtypes)),
            hvp=hvp,
            cache_graphs=cache_graphs,
            chunk_size=chunk_size,
            process_group=_resolve_process_group(process_group),
        )

    @torch.inference_mode(False)  # callers may hold inference mode; products need autograd
    def _setup(
        self,
        closure: LossClosure,
        params: dict[str, Tensor],
        *,
        dtype: torch.dtype,
        hvp: str,
        cache_graphs: bool | str,
        chunk_size: int | None,
        process_group: Any,
    ) -> None:
        if not dtype.is_floating_point:
            raise TypeError(f"Parameters must be floating point, got {dtype}.")
        self.closure = closure
        self._dtype = dtype
        self._params = {n: p.detach().to(dtype, copy=True) for n, p in params.items()}
        self.space = ParameterSpace.from_tensors(self._params)
        self._device = next(iter(self._params.values())).device
        self.requested_method = hvp
        self.chunk_size = chunk_size
        self.num_matvecs = 0
        self.process_group = process_group
        self.choice = MethodChoice(
            vector=None if hvp == "auto" else hvp, matrix=None if hvp == "auto" else hvp
        )
        if hvp == "auto" and self._problem_key() in _METHOD_MEMORY:
            # Measured before in this process for the same model, loss, parameters and batch shapes
            # (e.g. the callback's previous evaluation): reuse the choice instead of timing again.
            remembered = _METHOD_MEMORY[self._problem_key()]
            self.choice = MethodChoice(
                remembered.vector, remembered.matrix, dict(remembered.seconds), dict(remembered.failures)
            )
        self._graphs: dict[int, _Graph] = {}
        self._graph_bytes = 0
        # Batched method per (support, targets) pair where it was chosen apart from `choice.matrix`
        # (the dense path times each wide parameter block on its own: their costs differ a lot).
        self._block_methods: dict[tuple[tuple[str, ...], tuple[str, ...]], str] = {}
        self._block_seconds: dict[tuple[tuple[str, ...], tuple[str, ...]], dict[str, float]] = {}
        try:
            first = self._build_graph(0)
            self._validate_first_graph(first)
        except Exception as error:
            if process_group is None:
                raise
            self._all_reduce_count(closure.num_samples, failure=error)
            raise
        self.num_samples = self._all_reduce_count(closure.num_samples)
        self._cache_graphs = self._decide_caching(cache_graphs)
        if self._cache_graphs and hvp != FORWARD:
            self._graphs[0] = first

    def restrict(self, names: Iterable[str]) -> HessianOperator:
        """The operator of a diagonal block: the Hessian w.r.t. a subset of the parameters.

        It shares this operator's data, loss and settings; products cost a forward and backward
        pass but differentiate only the block's parameters.

        Args:
            names: Parameter names (a subset of ``op.space.names``).

        Returns:
            A new :class:`HessianOperator` over those parameters, in this operator's flat order.

        Raises:
            ValueError: If a name is not one of this operator's parameters.
        """
        wanted = list(names)
        unknown = [n for n in wanted if n not in self._params]
        if unknown or not wanted:
            raise ValueError(f"Unknown or empty parameter names for a block: {unknown or wanted}.")
        block = HessianOperator.__new__(HessianOperator)
        block._setup(
            self.closure,
            {n: p for n, p in self._params.items() if n in set(wanted)},
            dtype=self._dtype,
            hvp=self.requested_method,
            cache_graphs="auto",
            chunk_size=self.chunk_size,
            process_group=self.process_group,
        )
        return block

    # ----------------------------------------------------------------------------- properties
    @property
    def shape(self) -> tuple[int, int]:
        """``(N, N)`` with ``N`` the number of selected parameters."""
        n = self.space.numel
        return (n, n)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the products."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """Device of the products (the parameters' device)."""
        return self._device

    @property
    def parameters(self) -> dict[str, Tensor]:
        """The (copied, detached) parameter values the Hessian is taken at."""
        return dict(self._params)

    @property
    def num_batches(self) -> int:
        """Number of local batches."""
        return len(self.closure.batches)

    def __repr__(self) -> str:
        return (
            f"HessianOperator(N={self.shape[0]}, batches={self.num_batches}, "
            f"samples={self.num_samples}, dtype={self.dtype}, method={self.choice.vector or 'auto'})"
        )

    # ----------------------------------------------------------------------------- set-up
    def _all_reduce_count(self, count: int, failure: BaseException | None = None) -> int:
        """Sum the sample counts of all ranks, and agree on whether any rank failed to set up."""
        if self.process_group is None:
            return count
        t = torch.tensor([count, failure is not None], dtype=torch.float64, device=self._reduce_device())
        dist.all_reduce(t, group=self.process_group)
        if t[1] > 0 and failure is None:
            raise RankFailedError(
                f"{int(t[1])} other rank(s) failed to build the Hessian operator; this rank stops too "
                "so that no rank waits in a collective."
            )
        return int(t[0].item())

    def _reduce_device(self) -> torch.device:
        backend = dist.get_backend(self.process_group)
        return self._device if backend == "nccl" else torch.device("cpu")

    def _build_graph(self, index: int) -> _Graph:
        with self.closure.context(), saved_tensor_bytes() as counter, _EvalBatchNormAsAffine():
            leaves = {n: p.detach().requires_grad_(True) for n, p in self._params.items()}
            loss = self.closure.batch_loss(leaves, index)
            if not loss.requires_grad:
                grads = [None] * len(leaves)
            else:
                grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True, allow_unused=True)
        if index == 0:
            self._graph_bytes = counter[0]
        return _Graph(list(leaves.values()), list(grads), loss.detach())

    def _validate_first_graph(self, graph: _Graph) -> None:
        if all(g is None for g in graph.grads):
            raise ValueError(
                "The loss does not depend on the selected parameters (no autograd path from "
                f"{', '.join(self.space.names[:6])} to the loss). Check `loss_fn` (does it call "
                "the module it is given?) and `params=`."
            )

    def _decide_caching(self, cache_graphs: bool | str) -> bool:
        if cache_graphs != "auto":
            return bool(cache_graphs)
        free = available_memory(self._device)
        per_sample = self._graph_bytes / max(1, self.closure.batch_sizes[0])
        needed = per_sample * self.closure.num_samples
        return free is None or needed <= _GRAPH_CACHE_SHARE * free

    def _graph(self, index: int) -> _Graph:
        graph = self._graphs.get(index)
        if graph is None:
            graph = self._build_graph(index)
            if self._cache_graphs:
                self._graphs[index] = graph
        return graph

    def release_graphs(self) -> None:
        """Free the cached first-order graphs (they are rebuilt on the next product if needed)."""
        self._graphs.clear()

    # ----------------------------------------------------------------------------- loss & gradient
    def loss(self) -> float:
        """The size-weighted mean loss over all batches (and ranks) at the operator's parameters.

        Raises:
            NonFiniteHessianError: If it is NaN or infinite (on any rank).
        """

        def local() -> Tensor:
            total = torch.zeros(1, dtype=torch.float64, device=self._device)
            for i in range(self.num_batches):
                graph = self._graphs.get(i)
                if graph is None:
                    with self.closure.context(), torch.no_grad():
                        value = self.closure.batch_loss(self._params, i)
                else:
                    value = graph.loss
                total += float(value) * self.closure.batch_sizes[i]
            return total

        return float(self.agreed_all_reduce(local, (1,), torch.float64, what="The loss")) / self.num_samples

    # ----------------------------------------------------------------------------- products
    def __matmul__(self, other: Tensor) -> Tensor:
        """``H @ v`` for ``v`` of shape ``[N]``, or ``H @ V`` for ``V`` of shape ``[N, m]``.

        Raises:
            ValueError: If the shape does not match ``N``.
        """
        if not isinstance(other, Tensor):
            return NotImplemented
        n = self.shape[0]
        if other.ndim not in (1, 2) or other.shape[0] != n:
            raise ValueError(f"Expected a tensor of shape [{n}] or [{n}, m], got {tuple(other.shape)}.")
        with torch.inference_mode(False):
            other = other.to(device=self._device, dtype=self._dtype)
            if other.is_inference():
                other = other.clone()
            if other.ndim == 1:
                return self.matvec(other)
            return self.matmat(other)

    def matvec(self, vector: Tensor) -> Tensor:
        """``H @ v`` for one vector ``[N]``.

        Raises:
            NonFiniteHessianError: If the product is not finite (on any rank).
        """

        def local() -> Tensor:
            rows = vector.unsqueeze(0)
            if self.choice.vector is None:
                self._choose_vector_method(rows)
            return self._products(rows, self.choice.vector, batched=False)[0]

        out = self.agreed_all_reduce(local, vector.shape)
        self.num_matvecs += 1
        return out

    def matmat(self, matrix: Tensor) -> Tensor:
        """``H @ V`` for a matrix ``[N, m]``, in column chunks sized to the free memory.

        Raises:
            NonFiniteHessianError: If a product is not finite (on any rank).
        """

        def local() -> Tensor:
            out = torch.empty_like(matrix)
            chunk = self._chunk_size()
            for begin in range(0, matrix.shape[1], chunk):
                rows = matrix[:, begin : begin + chunk].T.contiguous()
                out[:, begin : begin + chunk] = self.block_products(rows).T
            return out

        return self.agreed_all_reduce(local, matrix.shape)

    def agreed_all_reduce(
        self,
        local: Callable[[], Tensor],
        shape: tuple[int, ...] | torch.Size,
        dtype: torch.dtype | None = None,
        what: str = "A Hessian-vector product",
    ) -> Tensor:
        """Run a local product computation and sum it over ranks; all ranks fail together.

        A local exception under ``torch.distributed`` becomes a NaN-filled contribution that still
        joins the all-reduce, so no rank is left waiting; a non-finite result then raises on every
        rank at the same point (the failing rank chains its own error).

        Args:
            local: Computes this rank's (weighted) contribution.
            shape: Its shape.
            dtype: Its dtype (default the operator's).
            what: What is computed, for the error message.

        Returns:
            The sum over ranks (the local result without a process group).

        Raises:
            NonFiniteHessianError: If the result is NaN or infinite.
        """
        error: BaseException | None = None
        try:
            result = local()
        except Exception as caught:
            if self.process_group is None:
                raise
            error = caught
            result = torch.full(tuple(shape), float("nan"), dtype=dtype or self._dtype, device=self._device)
        result = self._all_reduce(result)
        if not bool(torch.isfinite(result).all()):
            where = "this rank" if error is not None else "the loss or another rank"
            raise NonFiniteHessianError(
                f"{what} is not finite (failure on {where}"
                f"{f': {type(error).__name__}: {error}' if error is not None else ''}). Check the loss "
                "for NaN/inf at these parameters and batches."
            ) from error
        return result

    def block_products(
        self,
        rows: Tensor,
        support: tuple[str, ...] | None = None,
        targets: tuple[str, ...] | None = None,
        *,
        out: Tensor | None = None,
    ) -> Tensor:
        """Local (not yet all-reduced) products of one chunk, restricted to parameter subsets.

        ``rows[j]`` is a vector over the ``support`` parameters (zero elsewhere); the result holds
        the entries of ``H @ rows[j]`` for the ``targets`` parameters only. Restricting both lets
        autograd skip the layers that neither set touches, which the dense path uses to compute
        only one triangle of the matrix.

        Args:
            rows: ``[m, N_support]``.
            support: Parameter names the vectors live on (default all).
            targets: Parameter names whose product entries are wanted (default all).
            out: Optional ``[m, N_targets]`` tensor (any strides, e.g. rows of a larger matrix)
                to write the products into instead of a new tensor.

        Returns:
            ``[m, N_targets]`` (``out`` when given).
        """
        support = tuple(support or self.space.names)
        targets = tuple(targets or self.space.names)
        m = rows.shape[0]
        if out is None:
            out = torch.empty(m, self.space.subspace(targets).numel, dtype=self._dtype, device=self._device)
        if self.choice.vector is None:
            self._choose_vector_method(rows[:1], support, targets)
        if self.choice.matrix is None and m > 1:
            self._choose_matrix_method(rows[:_SELECTION_COLUMNS], support, targets)
        method = self._block_methods.get((support, targets), self.choice.matrix) if m > 1 else None
        self.num_matvecs += m
        if m == 1 or method.endswith(_LOOP):
            vector_method = (method or self.choice.vector).removesuffix(_LOOP)
            for j in range(m):
                self._products(rows[j : j + 1], vector_method, False, support, targets, out=out[j : j + 1])
            return out
        try:
            return self._products(rows, method, True, support, targets, out=out)
        except Exception as error:  # noqa: BLE001 - vmap lacks batching rules for some layers
            warnings.warn(
                f"Batched {method} products failed ({type(error).__name__}: {error}); falling back "
                "to one product per column.",
                RuntimeWarning,
                stacklevel=3,
            )
            if (support, targets) in self._block_methods:
                self._block_methods[(support, targets)] = self.choice.vector + _LOOP
            else:
                self.choice.matrix = self.choice.vector + _LOOP
            self.num_matvecs -= m
            return self.block_products(rows, support, targets, out=out)

    def to_dense(self) -> Tensor:
        """The exact dense Hessian ``[N, N]`` (see :func:`lightning_hessian.hessian`)."""
        from .dense import dense_from_operator

        return dense_from_operator(self)

    def _chunk_size(self) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        free = available_memory(self._device) or 8 * 1024**3
        per_column = 4 * self.space.numel * self._dtype.itemsize + self._graph_bytes
        return max(1, min(_MAX_CHUNK, int(_CHUNK_MEMORY_SHARE * free // max(1, per_column))))

    def _all_reduce(self, tensor: Tensor) -> Tensor:
        if self.process_group is None:
            return tensor
        device = self._reduce_device()
        buffer = tensor.to(device)
        dist.all_reduce(buffer, group=self.process_group)
        return buffer.to(tensor.device)

    def _products(
        self,
        rows: Tensor,
        method: str,
        batched: bool,
        support: tuple[str, ...] | None = None,
        targets: tuple[str, ...] | None = None,
        out: Tensor | None = None,
    ) -> Tensor:
        """Local weighted sum over batches of ``H_b @ rows[j]`` for each row ``j``.

        Each parameter's product is written straight into its columns of ``out`` (no
        concatenation, no zero-filled accumulator): ``out`` may be rows of the dense matrix.
        """
        support = support or self.space.names
        targets = targets or self.space.names
        tangents = self.space.subspace(support).unflatten(rows)
        target_space = self.space.subspace(targets)
        m = rows.shape[0]
        if out is None:
            out = torch.empty(m, target_space.numel, dtype=self._dtype, device=self._device)
        columns = [out[:, piece] for piece in target_space.slices().values()]
        product = self._reverse_product if method == REVERSE else self._forward_product
        for i in range(self.num_batches):
            weight = self.closure.weight(i, self.num_samples)
            pieces = product(i, tangents, batched, target_space.names)
            for destination, piece in zip(columns, pieces, strict=True):
                if piece is None:  # the target does not depend on the support
                    if i == 0:
                        destination.zero_()
                    continue
                piece = piece.detach().reshape(m, -1)
                if i > 0:
                    destination.add_(piece, alpha=weight)
                elif weight == 1.0:
                    destination.copy_(piece)
                else:
                    torch.mul(piece, weight, out=destination)
        return out

    def _reverse_product(
        self, index: int, tangents: dict[str, Tensor], batched: bool, targets: tuple[str, ...]
    ) -> list[Tensor | None]:
        graph = self._graph(index)
        leaf = dict(zip(self.space.names, graph.leaves, strict=True))
        grad = dict(zip(self.space.names, graph.grads, strict=True))
        pairs = [
            (grad[name], t if batched else t[0])
            for name, t in tangents.items()
            if grad[name] is not None and grad[name].requires_grad
        ]
        if not pairs:
            return [None] * len(targets)
        with differentiable_context(self._device):
            hv = torch.autograd.grad(
                [g for g, _ in pairs],
                [leaf[name] for name in targets],
                grad_outputs=[t for _, t in pairs],
                retain_graph=self._cache_graphs,
                allow_unused=True,
                is_grads_batched=batched,
            )
        return list(hv)

    def _forward_product(
        self, index: int, tangents: dict[str, Tensor], batched: bool, targets: tuple[str, ...]
    ) -> list[Tensor]:
        closure = self.closure
        support = tuple(tangents)
        with closure.context():
            fixed = closure.buffers()
            constants = {n: p for n, p in self._params.items() if n not in support}

            def gradient(support_values: dict[str, Tensor]) -> dict[str, Tensor]:
                def loss(target_values: dict[str, Tensor]) -> Tensor:
                    return closure.batch_loss({**constants, **support_values, **target_values}, index, fixed)

                start = {n: support_values[n] if n in support_values else constants[n] for n in targets}
                return torch.func.grad(loss)(start)

            primals = {n: self._params[n] for n in support}

            def hvp(tangent: dict[str, Tensor]) -> dict[str, Tensor]:
                return torch.func.jvp(gradient, (primals,), (tangent,))[1]

            if batched:
                result = torch.func.vmap(hvp, randomness="same")(tangents)
            else:
                result = hvp({k: t[0] for k, t in tangents.items()})
        return [result[n] for n in targets]

    # ----------------------------------------------------------------------------- auto choice
    def _time_candidates(
        self,
        rows: Tensor,
        candidates: list[str],
        run: Callable[[str], Tensor],
        rounds: int = 1,
        warm_up: Callable[[str], Tensor] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Run each candidate once to warm up, then ``rounds`` timed times, interleaved.

        The fastest of a candidate's timed runs counts: on a shared machine a single run can be
        slowed down many times over by other processes, and interleaving spreads that noise
        over all candidates instead of one. ``warm_up`` (default ``run``) is the untimed first run.
        """
        results: dict[str, Tensor] = {}
        seconds: dict[str, float] = {}

        def attempt(name: str, call: Callable[[str], Tensor] = run) -> bool:
            try:
                start = time.perf_counter()
                results[name] = call(name)
                elapsed = (time.perf_counter() - start) / rows.shape[0]
            except Exception as error:  # noqa: BLE001 - any failure disqualifies the method
                self.choice.failures[name] = f"{type(error).__name__}: {error}"
                results.pop(name, None)
                seconds.pop(name, None)
                return False
            seconds[name] = min(seconds.get(name, math.inf), elapsed)
            return True

        alive = [name for name in candidates if attempt(name, warm_up or run)]  # graphs, vmap rules
        seconds.clear()
        for _ in range(rounds):
            alive = [name for name in alive if attempt(name)]
        for name in alive:
            if not torch.isfinite(results[name]).all():
                self.choice.failures[name] = "non-finite products"
                results.pop(name)
                seconds.pop(name)
        return results, seconds

    def _pick(
        self, results: dict[str, Tensor], seconds: dict[str, float], check: Callable[[], Tensor]
    ) -> str:
        if not results:
            raise RuntimeError(
                "No Hessian-vector product method works for this model: "
                + "; ".join(f"{k}: {v}" for k, v in self.choice.failures.items())
            )
        names = list(results)
        if len(names) == 2:
            a, b = (results[n] for n in names)
            difference = _relative_difference(a, b)
            if difference > _agreement_tolerance(self._dtype):
                reference = check()
                errors = {n: _relative_difference(results[n], reference) for n in names}
                worse = max(errors, key=errors.get)
                self.choice.failures[worse] = (
                    f"disagrees with the other method (relative difference {difference:.2e}; "
                    "finite differences of the gradient side with the other)"
                )
                warnings.warn(
                    f"Hessian-vector product method {worse!r} gives wrong products for this model and "
                    f"will not be used: {self.choice.failures[worse]}.",
                    RuntimeWarning,
                    stacklevel=5,
                )
                names.remove(worse)
        return min(names, key=lambda n: seconds[n])

    def _finite_difference(self, rows: Tensor, support: tuple[str, ...], targets: tuple[str, ...]) -> Tensor:
        """Central differences of the gradient: an independent referee between two methods."""
        out = []
        support_space, target_space = self.space.subspace(support), self.space.subspace(targets)
        for row in rows:
            norm = float(row.norm()) or 1.0
            eps = math.sqrt(torch.finfo(self._dtype).eps) * max(
                1.0, max(float(p.abs().max()) for p in self._params.values())
            )
            step = support_space.unflatten(row / norm)
            plus = {n: p + eps * step[n] if n in step else p for n, p in self._params.items()}
            minus = {n: p - eps * step[n] if n in step else p for n, p in self._params.items()}
            difference = self._gradient(plus) - self._gradient(minus)
            out.append(target_space.flatten(self.space.unflatten(difference)) * (norm / (2 * eps)))
        return torch.stack(out)

    def _gradient(self, params: dict[str, Tensor]) -> Tensor:
        total = torch.zeros(self.space.numel, dtype=self._dtype, device=self._device)
        for i in range(self.num_batches):
            with self.closure.context():
                leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
                loss = self.closure.batch_loss(leaves, i)
                grads = torch.autograd.grad(
                    loss, list(leaves.values()), allow_unused=True, materialize_grads=True
                )
            total += self.closure.weight(i, self.num_samples) * torch.cat([g.reshape(-1) for g in grads])
        return total

    def _problem_key(self) -> tuple[Any, ...]:
        model, closure = self.closure.model, self.closure
        return (
            id(model),
            type(model).__qualname__,
            id(closure.loss_fn),
            closure.mode,
            str(self._dtype),
            str(self._device),
            tuple(
                (name, tuple(shape)) for name, shape in zip(self.space.names, self.space.shapes, strict=True)
            ),
            _tensor_signature(closure.batches[0]),
            len(closure.batches),
        )

    def _remember_choice(self) -> None:
        if self.requested_method != "auto":
            return
        if len(_METHOD_MEMORY) >= _METHOD_MEMORY_SIZE:
            _METHOD_MEMORY.pop(next(iter(_METHOD_MEMORY)))
        _METHOD_MEMORY[self._problem_key()] = MethodChoice(
            self.choice.vector, self.choice.matrix, dict(self.choice.seconds), dict(self.choice.failures)
        )

    def _choose_vector_method(
        self, rows: Tensor, support: tuple[str, ...] | None = None, targets: tuple[str, ...] | None = None
    ) -> None:
        support, targets = support or self.space.names, targets or self.space.names
        results, seconds = self._time_candidates(
            rows,
            [REVERSE, FORWARD],
            lambda name: self._products(rows, name, False, support, targets),
            rounds=_VECTOR_ROUNDS,
        )
        self.choice.seconds.update(seconds)
        self.choice.vector = self._pick(
            results, seconds, lambda: self._finite_difference(rows, support, targets)
        )
        self._remember_choice()

    def _choose_matrix_method(self, rows: Tensor, support: tuple[str, ...], targets: tuple[str, ...]) -> None:
        """Time the batched forms against a loop of the chosen vector method on ``rows``."""
        self.choice.matrix, seconds = self._select_batched(rows, support, targets, vector_seconds=None)
        self.choice.seconds.update({f"{k} (batched)": v for k, v in seconds.items()})
        self._remember_choice()

    def _choose_block_method(self, rows: Tensor, support: tuple[str, ...], targets: tuple[str, ...]) -> None:
        """Choose the batched method for one ``(support, targets)`` pair of the dense path.

        Parameter blocks differ a lot: for a wide last layer whose products stop at the logits,
        reverse-over-reverse can be several times faster per column than forward-over-reverse
        while the opposite holds for the convolutions in front of it. Only with ``hvp="auto"``
        and after the operator-wide choice; ``rows`` are the block's first columns.
        """
        key = (tuple(support), tuple(targets))
        if self.requested_method != "auto" or key in self._block_methods or rows.shape[0] < 2:
            return
        if self.choice.vector is None or self.choice.matrix is None:
            return  # the first products make the operator-wide choice on this very block
        loop = self.choice.vector
        _, single = self._time_candidates(
            rows[:1], [loop], lambda name: self._products(rows[:1], name, False, *key), rounds=_MATRIX_ROUNDS
        )
        # Timed on the whole chunk: per-column costs at a few columns are mostly fixed overheads.
        method, seconds = self._select_batched(rows, *key, vector_seconds=single.get(loop, math.inf))
        self._block_methods[key] = method
        self._block_seconds[key] = {**seconds, loop + _LOOP: single.get(loop, math.inf)}

    def _select_batched(
        self,
        rows: Tensor,
        support: tuple[str, ...],
        targets: tuple[str, ...],
        vector_seconds: float | None,
    ) -> tuple[str, dict[str, float]]:
        """The fastest working batched method on ``rows``, or a loop of the vector method."""
        candidates = [m for m in (REVERSE, FORWARD) if m not in self.choice.failures]
        few = rows[:_WARM_UP_COLUMNS]
        results, seconds = self._time_candidates(
            rows,
            candidates,
            lambda name: self._products(rows, name, True, support, targets),
            rounds=_MATRIX_ROUNDS,
            warm_up=lambda name: self._products(few, name, True, support, targets),
        )
        if vector_seconds is None:
            vector_seconds = self.choice.seconds.get(self.choice.vector, math.inf)
        if results:
            best = self._pick(results, seconds, lambda: self._finite_difference(rows, support, targets))
            if seconds[best] <= vector_seconds:
                return best, seconds
        return self.choice.vector + _LOOP, seconds
