"""``HessianOperator``: the Hessian of a module's loss w.r.t. its parameters as a linear operator.

The class is the public face: construction and checks, ``@``, :meth:`~HessianOperator.matvec`,
:meth:`~HessianOperator.matmat`, :meth:`~HessianOperator.restrict`, :meth:`~HessianOperator.loss`
and :meth:`~HessianOperator.to_dense`. Its jobs live apart: the product kernels and the graph cache
(:mod:`.kernels`, :mod:`.graphs`), the measured method choice (:mod:`.selection`), cross-rank sums
(:mod:`lightning_hessian.distributed`) and dense matrices (:mod:`lightning_hessian.dense`).
Well over half of the module documents the public methods; their bodies delegate to those modules.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..batches import BatchSizeFn
from ..closure import LossClosure, LossFn
from ..dense import dense_from_operator
from ..distributed import agree_on_failure, all_reduce_or_raise, resolve_process_group
from ..memory import available_memory
from ..parameters import ParameterSpace, Patterns, select_parameters
from ..shards import refuse_sharded_parameters
from ..validation import check_choice, check_optional_int
from .differences import DIFFERENCE_METHODS, FINITE_DIFFERENCE, RICHARDSON, half_precision_advice
from .graphs import GraphCache
from .kernels import FORWARD, REVERSE, ProductKernels
from .selection import MethodChoice, MethodSelector, problem_key

HVP_METHODS = ("auto", REVERSE, FORWARD, FINITE_DIFFERENCE, RICHARDSON)
_CHUNK_MEMORY_SHARE = 0.25  # share of free memory one batched product may take
_MAX_CHUNK = 256  # batched products of more columns run slower per column (cache)
_SMALL_PRODUCT_BYTES = 16 * 2**20  # a batched product this small is not sized from free memory


@dataclass(frozen=True)
class _Settings:
    """What a restricted (block) operator inherits from its parent."""

    dtype: torch.dtype
    hvp: str
    chunk_size: int | None
    process_group: Any


class HessianOperator:
    """The Hessian ``H = d²L/dθ²`` of the loss over ``data`` w.r.t. parameters.

    ``L`` is the size-weighted mean of the batch losses (``reduction="mean"``) or their sum
    (``reduction="sum"``).

    ``op @ v`` multiplies a vector ``[N]``, ``op @ V`` a matrix ``[N, m]``. The operator is taken at
    the parameters' values when it is constructed (they are copied) and never modifies the model.
    Under ``torch.distributed`` it sums the products of all ranks (weighted by sample counts), so it
    is the Hessian of the loss over the union of every rank's batches.

    Products are exact (Pearlmutter's trick): ``"reverse-over-reverse"`` differentiates each batch's
    cached gradient again; ``"forward-over-reverse"`` is ``torch.func.jvp`` of ``torch.func.grad``.
    ``hvp="auto"`` tries reverse-over-reverse alone on the first product where the first-order graphs
    are cached (both methods otherwise, or when it fails), times the batched forms on the first product
    of many columns, has gradient differences referee the method it keeps, and keeps the fastest that
    works and is right for the model at hand. Where neither is (a compiled module without double
    backward, a custom ``autograd.Function`` without second derivatives), it falls back to gradient
    differences with one warning. ``"finite-difference"`` forces those: ``(g(θ + h v) - g(θ - h v)) /
    (2h)`` of two plain gradients, relative error about 1e-4 in float32 and 1e-10 in float64 on smooth
    models and on ReLU and max-pool networks, whose kinks they freeze at ``θ`` (:mod:`.differences`,
    :mod:`.kinks`); ``"finite-difference-richardson"`` extrapolates two of them (four
    gradients), about 2 times more accurate in float32 and 30 in float64. A forced exact method is
    refereed on its first product too, and raises if it is found wrong.

    Args:
        model: Any ``nn.Module``.
        loss_fn: ``loss_fn(module, batch) -> scalar``. ``module`` is the model itself; call it as
            usual. ``None`` uses a LightningModule's ``training_step``.
        data: Iterable of batches (list or DataLoader).
        params: Glob pattern(s) on parameter names; default all trainable parameters.
        mode: ``"eval"`` (default) or ``"train"``.
        dtype: Compute dtype (e.g. ``torch.float64``); default the parameters' dtype. Float32 products
            carry float32 rounding through two differentiations (see NOTE [Float32 Hessians] in
            :mod:`lightning_hessian.exact`).
        batch_size_fn: ``batch -> number of samples``; default first dim of the first tensor.
        hvp: ``"auto"``, ``"reverse-over-reverse"``, ``"forward-over-reverse"``,
            ``"finite-difference"`` or ``"finite-difference-richardson"``. ``op.choice`` says which
            one is used, what failed and the referee's verdicts.
        cache_graphs: Keep each batch's first-order graph for reuse (``"auto"``: while it fits in a
            quarter of free memory).
        chunk_size: Columns per batched product (default: sized from free memory).
        process_group: ``"auto"`` (the default group when ``torch.distributed`` is initialized with
            more than one rank), a process group, or ``None`` for this process's data only.
        reduction: ``"mean"`` (default): the Hessian of the size-weighted mean of the batch losses,
            right for mean-reduced losses; ``"sum"``: of their plain sum, i.e. of the loss of the
            concatenated data for a ``loss_fn`` with ``reduction="sum"``.

    Raises:
        ValueError: For bad arguments, a non-scalar loss, or a loss that does not depend on the
            selected parameters; all checked on the first batch before any product.
        TypeError: For arguments of the wrong type.

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
        reduction: str = "mean",
    ) -> None:
        check_choice("hvp", hvp, HVP_METHODS)
        check_choice("cache_graphs", cache_graphs, (True, False, "auto"))
        check_optional_int("chunk_size", chunk_size, 1, "Pass a positive number of columns, or None.")
        if data is None:
            raise ValueError("`data` is required: an iterable of batches (a list or a DataLoader).")
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        refuse_sharded_parameters(model, "HessianOperator")
        selected = select_parameters(model, params)
        closure = LossClosure(
            model, loss_fn, data, mode=mode, dtype=dtype, batch_size_fn=batch_size_fn, reduction=reduction
        )
        dtypes = {p.dtype for p in selected.values()}
        if closure.dtype is None and len(dtypes) > 1:
            raise ValueError(
                f"The selected parameters have several dtypes {sorted(map(str, dtypes))}; pass "
                "`dtype=` (e.g. torch.float32) to compute in one."
            )
        settings = _Settings(
            closure.dtype or next(iter(dtypes)), hvp, chunk_size, resolve_process_group(process_group)
        )
        advice = half_precision_advice(settings.dtype)
        if advice is not None:
            warnings.warn(advice, UserWarning, stacklevel=2)
        self._build(closure, {n: p.detach() for n, p in selected.items()}, settings, cache_graphs)

    @classmethod
    def _from_closure(
        cls, closure: LossClosure, params: dict[str, Tensor], settings: _Settings, cache_graphs: bool | str
    ) -> HessianOperator:
        """Alternate constructor for a block of an existing operator (same closure and settings)."""
        op = cls.__new__(cls)
        op._build(closure, params, settings, cache_graphs, require_dependence=False)
        return op

    @torch.inference_mode(False)  # callers may hold inference mode; products need autograd
    def _build(
        self,
        closure: LossClosure,
        params: dict[str, Tensor],
        settings: _Settings,
        cache_graphs: bool | str,
        require_dependence: bool = True,
    ) -> None:
        if not settings.dtype.is_floating_point:
            raise TypeError(f"Parameters must be floating point, got {settings.dtype}.")
        self.closure = closure
        self._settings = settings
        self._params = {n: p.detach().to(settings.dtype, copy=True) for n, p in params.items()}
        self.space = ParameterSpace.from_tensors(self._params)
        self.requested_method = settings.hvp
        self.chunk_size = settings.chunk_size
        self.process_group = settings.process_group
        self.num_matvecs = 0
        self._graphs = GraphCache(closure, self._params)
        error: BaseException | None = None
        second_order = settings.hvp in ("auto", REVERSE)  # products that differentiate a cached graph
        try:
            try:
                first = self._graphs.build(0, create_graph=second_order)
            except Exception:
                if settings.hvp != "auto":
                    raise
                # A kernel that refuses create_graph: no second-order graph, gradient differences remain.
                first, second_order = self._graphs.build(0, create_graph=False), False
            self._depends = any(g is not None for g in first.grads)
            if require_dependence and not self._depends:
                raise ValueError(
                    "The loss does not depend on the selected parameters (no autograd path from "
                    f"{', '.join(self.space.names[:6])} to the loss). Check `loss_fn` (does it call "
                    "the module it is given?) and `params=`."
                )
        except Exception as caught:
            if self.process_group is None:
                raise
            error = caught
        agreement = agree_on_failure(
            error,
            self.process_group,
            device=self.device,
            values=[closure.num_samples],
            what="Building the Hessian operator",
        )
        agreement.raise_error()
        self.num_samples = int(agreement.values[0])
        self._graphs.enable(cache_graphs if second_order else False, first if second_order else None)
        self._kernels = ProductKernels(closure, self._params, self._graphs, self.num_samples)
        key = problem_key(closure, self.space, settings.dtype, self.device)
        self._selector = MethodSelector(settings.hvp, self._kernels, key)

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
        wanted = set(names)
        unknown = sorted(wanted - set(self._params))
        if unknown or not wanted:
            raise ValueError(f"Unknown or empty parameter names for a block: {unknown or list(wanted)}.")
        params = {n: p for n, p in self._params.items() if n in wanted}
        return HessianOperator._from_closure(self.closure, params, self._settings, "auto")

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, N)`` with ``N`` the number of selected parameters."""
        n = self.space.numel
        return (n, n)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the products."""
        return self._settings.dtype

    @property
    def device(self) -> torch.device:
        """Device of the products (the parameters' device)."""
        return next(iter(self._params.values())).device

    @property
    def parameters(self) -> dict[str, Tensor]:
        """The (copied, detached) parameter values the Hessian is taken at."""
        return dict(self._params)

    @property
    def num_batches(self) -> int:
        """Number of local batches."""
        return len(self.closure.batches)

    @property
    def depends_on_parameters(self) -> bool:
        """Whether the loss depends on these parameters at all (else the Hessian is exactly zero).

        Always true for an operator built from a model (it refuses such parameters); a block of one
        (:meth:`restrict`) may hold parameters the loss never uses, e.g. a module left out of ``forward``.
        """
        return self._depends

    @property
    def choice(self) -> MethodChoice:
        """The product methods in use (measured by ``hvp="auto"``, or the one requested)."""
        return self._selector.choice

    def __repr__(self) -> str:
        return (
            f"HessianOperator(N={self.shape[0]}, batches={self.num_batches}, "
            f"samples={self.num_samples}, dtype={self.dtype}, method={self.choice.vector or 'auto'})"
        )

    def release_graphs(self) -> None:
        """Free the cached first-order graphs (they are rebuilt on the next product if needed)."""
        self._graphs.release()

    def loss(self, displacement: Tensor | None = None) -> float:
        """The loss over all batches (and ranks) at the operator's parameters (see ``reduction``).

        Args:
            displacement: Optional ``[N]`` step: the loss is then taken at ``θ + displacement`` (a
                forward pass per batch, under the same state and RNG guarantees as every product).

        Raises:
            NonFiniteHessianError: If it is NaN or infinite (on any rank).
            ValueError: If ``displacement`` is not of shape ``[N]``.
        """
        params = self._params
        if displacement is not None:
            if displacement.shape != (self.shape[0],):
                raise ValueError(
                    f"`displacement` must have shape [{self.shape[0]}], got {tuple(displacement.shape)}."
                )
            step = self.space.unflatten(displacement.to(device=self.device, dtype=self.dtype))
            params = {n: p + step[n] for n, p in self._params.items()}

        local = functools.partial(self._kernels.local_loss, params, use_graphs=displacement is None)
        return float(self.agreed_all_reduce(local, (1,), torch.float64, "The loss"))

    def gradient(self) -> Tensor:
        """The gradient ``[N]`` of the loss over all batches (and ranks) at the operator's parameters.

        Read from the cached first-order graphs where they are kept, else one backward per batch.

        Raises:
            NonFiniteHessianError: If it is NaN or infinite (on any rank).

        Example:
            >>> g = op.gradient()
            >>> curvature = float(g @ (op @ g)) / float(g @ g)  # doctest: +SKIP
        """
        return self.agreed_all_reduce(self._kernels.local_gradient, (self.shape[0],), what="The gradient")

    def for_batch(self, index: int) -> HessianOperator:
        """The Hessian of one local batch's loss alone, on this rank only (no reduction over ranks).

        It shares this operator's parameters and settings; its products cost one batch's.

        Args:
            index: Local batch index, ``0 <= index < num_batches``.

        Returns:
            A :class:`HessianOperator` whose objective is batch ``index``'s (unweighted) loss.

        Raises:
            IndexError: If ``index`` is out of range.
        """
        if not 0 <= index < self.num_batches:
            raise IndexError(f"Batch index {index} out of range for {self.num_batches} local batches.")
        settings = dataclasses.replace(self._settings, process_group=None)
        return HessianOperator._from_closure(self.closure.subset(index), self._params, settings, "auto")

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
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                return self @ other
        if other.dtype != self.dtype or other.device != self.device:
            other = other.to(device=self.device, dtype=self.dtype)
        if other.is_inference():
            other = other.clone()
        return self.matvec(other) if other.ndim == 1 else self.matmat(other)

    def matvec(self, vector: Tensor) -> Tensor:
        """``H @ v`` for one vector ``[N]``.

        Raises:
            NonFiniteHessianError: If the product is not finite (on any rank).
        """
        return self.agreed_all_reduce(lambda: self.block_products(vector.unsqueeze(0))[0], vector.shape)

    def matmat(self, matrix: Tensor) -> Tensor:
        """``H @ V`` for a matrix ``[N, m]``, in column chunks sized to the free memory.

        Raises:
            NonFiniteHessianError: If a product is not finite (on any rank).
        """

        def local() -> Tensor:
            out = torch.empty_like(matrix)
            chunk = self._chunk_for(matrix.shape[1])
            for begin in range(0, matrix.shape[1], chunk):
                # Gathered column by column, and written into ``out``'s columns by the kernels: a
                # transposing copy each way cost 2.8 ms per block of 4 at N = 72k (a tenth of the block).
                rows = torch.stack(matrix[:, begin : begin + chunk].unbind(1))
                self.block_products(rows, out=out[:, begin : begin + chunk].T)
            return out

        return self.agreed_all_reduce(local, matrix.shape)

    def agreed_all_reduce(
        self,
        local: Callable[[], Tensor],
        shape: tuple[int, ...] | torch.Size,
        dtype: torch.dtype | None = None,
        what: str = "A Hessian-vector product",
    ) -> Tensor:
        """Sum a local computation over this operator's ranks; all ranks fail together.

        :func:`lightning_hessian.distributed.all_reduce_or_raise` on this operator's process group.

        Raises:
            NonFiniteHessianError: If the result is NaN or infinite (on every rank).
        """
        return all_reduce_or_raise(
            local, self.process_group, shape=shape, dtype=dtype or self.dtype, device=self.device, what=what
        )

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
            out = torch.empty(m, self.space.subspace(targets).numel, dtype=self.dtype, device=self.device)
        method, done = self._selector.method_for(rows, support, targets, out)
        if method.batched and done < m:
            try:
                self._kernels.products(rows[done:], method.method, True, support, targets, out=out[done:])
                self.num_matvecs += m
                return out
            except Exception as error:  # noqa: BLE001 - vmap lacks batching rules for some layers
                warnings.warn(
                    f"Batched {method.method} products failed ({type(error).__name__}: {error}); falling "
                    "back to one product per column.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._selector.demote(support, targets)
        if m == 1 and done == 0:  # one vector (a matvec): no slicing
            self._kernels.products(rows, self.choice.vector, False, support, targets, out=out)
        elif method.method in DIFFERENCE_METHODS and done < m:  # their kernel loops over the rows itself
            self._kernels.products(rows[done:], method.method, False, support, targets, out=out[done:])
        else:
            for j in range(done, m):
                self._kernels.products(
                    rows[j : j + 1], self.choice.vector, False, support, targets, out=out[j : j + 1]
                )
        self.num_matvecs += m
        return out

    def chunk_columns(self) -> int:
        """Columns per batched product: ``chunk_size`` when given, else sized from free memory."""
        if self.chunk_size is not None:
            return self.chunk_size
        free = available_memory(self.device) or 8 * 1024**3
        return max(1, min(_MAX_CHUNK, int(_CHUNK_MEMORY_SHARE * free // max(1, self._column_bytes()))))

    def _chunk_for(self, columns: int) -> int:
        """:meth:`chunk_columns` for a product of ``columns`` columns, without asking the system for
        its free memory (0.16 ms on Linux, as much as a small model's gradient) when they all take
        less than :data:`_SMALL_PRODUCT_BYTES`.
        """
        small = columns <= _MAX_CHUNK and columns * self._column_bytes() <= _SMALL_PRODUCT_BYTES
        return columns if self.chunk_size is None and small else self.chunk_columns()

    def _column_bytes(self) -> int:
        """Memory one column of a batched product takes: work vectors and a first-order graph."""
        return 4 * self.space.numel * self.dtype.itemsize + self._graphs.first_graph_bytes

    def to_dense(self) -> Tensor:
        """The exact dense Hessian ``[N, N]`` (see :func:`lightning_hessian.hessian`)."""
        return dense_from_operator(self)
