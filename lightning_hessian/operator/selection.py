"""``hvp="auto"``: choose the product method by measuring it on the model at hand.

# NOTE [Cheap method choice]
# The operator-wide choice runs the candidates once on the first vector (the winner's product is the
# caller's result; with cached graphs reverse-over-reverse alone, NOTE [Cached graph first]) and the
# winner's batched form once on the first chunk of several columns (its products are the chunk's
# own), so choosing costs the referee's two gradients (about one product; two more when it must
# measure its own spread), plus one product of the slower method where both are timed. Single
# timings are noisier than the best of several rounds; the choice is remembered per problem, and the
# dense path, which spends thousands of products, still times each wide block's batched candidates.

Some ``torch.func`` compositions fail on some layers, and the faster method differs between models,
between one vector and many, and between parameter blocks of one model (for a wide last layer whose
products stop at the logits, reverse-over-reverse can be several times faster per column than
forward-over-reverse, while the opposite holds for the convolutions in front of it). So the
:class:`MethodSelector` times every exact candidate on the first product it is asked for, has
gradient differences referee them (:mod:`.referee`), keeps the fastest one that works and is not
found wrong, and remembers the choice for the same problem in this process. Where no exact method
works, ``"auto"`` falls back to gradient differences with one warning that names the causes and the
accuracy to expect. A method the user forces gets the same referee on its first product, and an
error when it is found wrong (the user asked for that method; its products would be wrong).

The state is explicit data: a :class:`MethodChoice` holds the method for single vectors and a
:class:`MatrixMethod` (a method, batched or as a loop of single products) for many.

About 590 lines, 125 of them docstrings: the choice is one piece of explicit state
(:class:`MethodChoice`) with its vector, batched, per-block and referee steps, kept in one class so
that the state changes in one place.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..batches import batch_signature
from ..closure import LossClosure
from ..distributed import all_finite
from ..parameters import ROOT_MODULE_NAME, ParameterSpace, module_name_of
from .differences import DIFFERENCE_METHODS, FINITE_DIFFERENCE, expected_error
from .kernels import EXACT_METHODS, REVERSE, ProductKernels
from .referee import REFEREE_MARGIN, Referee, Verdict, agreement_tolerance, relative_difference

#: A support (parameter block) at least this wide gets its own batched-method choice.
BLOCK_SELECTION_MIN_COLUMNS = 1024
_MATRIX_ROUNDS = 2
_WARM_UP_COLUMNS = 4  # untimed first batched run of each candidate
_MEMORY_SIZE = 64  # problems whose choice the process remembers
_KINK_SPREAD = 1e-2  # a gradient-difference spread above this is reported (NOTE [Kinks])
_WRONG_CAUSE = (
    "A custom autograd.Function whose backward is @once_differentiable (as fused kernels' are), or "
    "has no derivative of its own, drops second-order terms without raising."
)

Pair = tuple[tuple[str, ...], tuple[str, ...]]  # (support, targets)
# Layers whose backward has no derivative of its own in PyTorch (no double backward, no forward AD).
_NO_SECOND_DERIVATIVES = (nn.EmbeddingBag,)


@dataclass(frozen=True)
class MatrixMethod:
    """How many vectors are multiplied at once.

    Attributes:
        method: One of the product methods (``"reverse-over-reverse"``, ``"forward-over-reverse"``,
            ``"finite-difference"``, ``"finite-difference-richardson"``).
        batched: One batched call for all columns, or a loop of single products.
    """

    method: str
    batched: bool = True

    def __str__(self) -> str:
        return f"{self.method} ({'batched' if self.batched else 'loop'})"


@dataclass
class MethodChoice:
    """How ``hvp="auto"`` chose a method: seconds per product of each candidate, or its failure.

    Attributes:
        vector: Method used for single vectors (``None`` until chosen).
        matrix: Method used for many vectors at once (``None`` until chosen).
        seconds: Measured seconds per product by candidate (``"<method> (batched)"`` for batched forms;
            ``"finite-difference"`` for the referee's gradient differences).
        failures: Error message by candidate that failed or disagreed.
        referee: The referee's verdict on the first product of each method it judged: ``"agrees"``,
            ``"unverified"`` (it could not judge, see NOTE [Referee verdicts]) or ``"wrong"``, with the
            measured differences; for gradient differences, their spread between two steps.
    """

    vector: str | None = None
    matrix: MatrixMethod | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    referee: dict[str, str] = field(default_factory=dict)

    def copy(self) -> MethodChoice:
        """An independent copy (the dicts are copied)."""
        return replace(
            self, seconds=dict(self.seconds), failures=dict(self.failures), referee=dict(self.referee)
        )


_MEMORY: dict[tuple[Any, ...], MethodChoice] = {}
# Warnings given per model, by kind: one each in a process, not one per block, batch subset or evaluation.
_WARNED: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()


#: A serial number per live model: unlike ``id``, never given again to a new model at a freed address.
_MODEL_SERIALS: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
_NEXT_SERIAL = itertools.count()


def _model_serial(model: nn.Module) -> int:
    serial = _MODEL_SERIALS.get(model)
    if serial is None:
        serial = _MODEL_SERIALS[model] = next(_NEXT_SERIAL)
    return serial


def problem_key(
    closure: LossClosure, space: ParameterSpace, dtype: torch.dtype, device: torch.device
) -> tuple:
    """What makes two problems time alike: model, loss, mode, dtype, device, parameters and batch shapes."""
    return (
        _model_serial(closure.model),
        type(closure.model).__qualname__,
        id(closure.loss_fn),
        closure.mode,
        str(dtype),
        str(device),
        tuple(zip(space.names, (tuple(shape) for shape in space.shapes), strict=True)),
        batch_signature(closure.batches[0]),
        len(closure.batches),
    )


def _exclusion_advice(model: nn.Module, names: Sequence[str], generic: bool = True) -> str:
    """How to analyse the rest of a model some of whose layers have no second derivatives in PyTorch
    (``""`` when no known such layer is found and ``generic`` is false).
    """
    owners = {module_name_of(n) for n in names}
    without = {
        name: type(module).__name__
        for name, module in model.named_modules()
        if isinstance(module, _NO_SECOND_DERIVATIVES) and name in owners
    }
    if not without:
        return "Exclude the parameters of layers without second derivatives with `params=`." * generic
    rest = sorted(f"{owner}.*" for owner in owners - set(without) if owner != ROOT_MODULE_NAME)
    layers = ", ".join(f"{name!r} ({kind})" for name, kind in sorted(without.items()))
    suggestion = f" (e.g. params={rest})" if rest else ""
    return (
        f"PyTorch has no second derivatives for {layers}: exclude their parameters with "
        f"`params=`{suggestion} to analyse the rest."
    )


class MethodSelector:
    """The product method for each call: fixed by the user, or measured once (``"auto"``).

    Args:
        requested: ``"auto"`` or one of the product methods.
        kernels: The product kernels to time.
        key: The problem's :func:`problem_key`: an ``"auto"`` choice made before in this process for
            the same key is reused instead of timing again.

    Example:
        >>> selector = MethodSelector("auto", kernels, problem_key(closure, space, dtype, device))
        >>> method = selector.method_for(rows, space.names, space.names)  # doctest: +SKIP
    """

    def __init__(self, requested: str, kernels: ProductKernels, key: tuple) -> None:
        self.requested = requested
        self.kernels = kernels
        self.key = key
        if requested != "auto":
            self.choice = MethodChoice(requested, MatrixMethod(requested))
        elif key in _MEMORY:
            self.choice = _MEMORY[key].copy()
        else:
            self.choice = MethodChoice()
        self.block_methods: dict[Pair, MatrixMethod] = {}
        self.block_seconds: dict[Pair, dict[str, float]] = {}
        self._settled: set[Pair] = set()
        self._checked = requested == "auto"  # a forced method is refereed on its first product
        self._wrong: RuntimeError | None = None  # a forced method found wrong: every product raises

    def method_for(
        self, rows: Tensor, support: tuple[str, ...], targets: tuple[str, ...], out: Tensor
    ) -> tuple[MatrixMethod, int]:
        """The method for a chunk of ``rows`` (``[m, N_support]``), choosing it on them if needed.

        The first product chooses the vector method, the first product of several columns the
        batched one; the products computed while choosing are the chunk's own (written into
        ``out``), so a choice costs about one extra product (see NOTE [Cheap method choice]). With
        ``"auto"``, a support at least :data:`BLOCK_SELECTION_MIN_COLUMNS` wide that restricts the
        operator (as the dense path does, block by block) gets its own, measured choice on its first
        chunk, after the operator-wide one.

        Args:
            rows: The chunk to multiply.
            support: Parameter names the rows live on.
            targets: Parameter names whose product entries are wanted.
            out: ``[m, N_targets]``: where the products computed while choosing go.

        Returns:
            ``(method, done)``: the method for the rest of the chunk (never batched for one row)
            and how many leading rows of ``out`` are already computed.

        Raises:
            RuntimeError: If no method works, or a forced exact method is found wrong.
        """
        done, chose_now = 0, False
        if self._wrong is not None:
            raise self._wrong
        if not self._checked:
            self._check_forced(rows[:1], support, targets, out[:1])
            done = 1
        if self.choice.vector is None:
            self._choose_vector(rows[:1], support, targets, out[:1])
            done, chose_now = 1, True
        if rows.shape[0] == 1:
            return MatrixMethod(self.choice.vector, batched=False), done
        if self.choice.vector in DIFFERENCE_METHODS:  # a loop of gradient differences, nothing to time
            self.choice.matrix = self.choice.matrix or MatrixMethod(self.choice.vector, batched=False)
            return self.choice.matrix, done
        if self.choice.matrix is None and rows.shape[0] - done >= 2:
            done = self._choose_matrix(rows, support, targets, out, done)
            chose_now = True
        pair = (support, targets)
        if pair not in self._settled and self._restricts(pair) and self.choice.matrix is not None:
            self._settled.add(pair)
            if not chose_now and self.kernels.space.subspace(support).numel >= BLOCK_SELECTION_MIN_COLUMNS:
                self._choose_block(rows, pair)
        method = self.block_methods.get(pair, self.choice.matrix)
        return method or MatrixMethod(self.choice.vector, batched=False), done

    def demote(self, support: tuple[str, ...], targets: tuple[str, ...]) -> None:
        """Use a loop of single products where the batched method failed."""
        loop = MatrixMethod(self.choice.vector, batched=False)
        if (support, targets) in self.block_methods:
            self.block_methods[(support, targets)] = loop
        else:
            self.choice.matrix = loop

    def _restricts(self, pair: Pair) -> bool:
        names = self.kernels.space.names
        return self.requested == "auto" and pair != (names, names)

    def _remember(self) -> None:
        if self.requested != "auto":
            return
        if len(_MEMORY) >= _MEMORY_SIZE:
            _MEMORY.pop(next(iter(_MEMORY)))
        _MEMORY[self.key] = self.choice.copy()

    def _choose_vector(
        self, rows: Tensor, support: tuple[str, ...], targets: tuple[str, ...], out: Tensor
    ) -> None:
        """Run every exact candidate once on one vector, keep the fastest that works and the referee
        does not find wrong, else gradient differences; the product goes to ``out``.
        """
        if self.kernels.graphs.enabled:  # built now, not inside reverse-over-reverse's timing
            for index in range(len(self.kernels.closure.batches)):
                self.kernels.graphs.get(index)
        referee = Referee(self.kernels, rows, support, targets)

        def run(name: str) -> Tensor:
            return self.kernels.products(rows, name, False, support, targets)

        if self.kernels.graphs.enabled:
            # NOTE [Cached graph first]: with every batch's first-order graph cached, one
            # reverse-over-reverse product is one more backward through it, which no forward-mode
            # product (a forward pass and a jvp through the backward) beats for a single vector: it
            # ran 2.2-2.4 gradients against 3.7-6.0 in benchmarks/hvp.py. So it is tried alone
            # first, and the other exact method only when it fails or the referee finds it wrong;
            # timing both cost about three more products on the 141k CNN.
            results, seconds = self._time_once(rows, [REVERSE], run)
            self.choice.seconds.update(seconds)
            if REVERSE in results:
                verdict = self._judge(REVERSE, results[REVERSE], referee)
                if verdict is None or not verdict.wrong:
                    self._keep_vector(REVERSE, results[REVERSE], out)
                    return
                self.choice.failures[REVERSE] = f"wrong products ({verdict.describe()})"
            self.kernels.graphs.release()
            candidates = [name for name in EXACT_METHODS if name != REVERSE]
        else:
            candidates = list(EXACT_METHODS)
        results, seconds = self._time_once(rows, candidates, run)
        self.choice.seconds.update(seconds)
        self.choice.vector = self._pick(results, seconds, referee)
        if self.choice.vector == FINITE_DIFFERENCE:
            out.copy_(referee.product())
        else:
            out.copy_(results[self.choice.vector])
        if self.choice.vector != REVERSE:
            self.kernels.graphs.release()
        self._remember()

    def _judge(self, name: str, product: Tensor, referee: Referee) -> Any:
        """The referee's verdict on one candidate's product (recorded), or ``None`` without a referee."""
        try:
            verdict = referee.judge(product)
        except Exception as error:  # noqa: BLE001 - no referee: the method stands, unverified
            self.choice.referee[name] = f"unverified (gradient differences failed: {error})"
            return None
        self._record(name, verdict)
        return verdict

    def _keep_vector(self, name: str, product: Tensor, out: Tensor) -> None:
        self.choice.vector = name
        out.copy_(product)
        self._remember()

    def _check_forced(
        self, rows: Tensor, support: tuple[str, ...], targets: tuple[str, ...], out: Tensor
    ) -> None:
        """The first product of a forced method, refereed: an exact method found wrong raises, and
        gradient differences that change much with their step are reported (NOTE [Kinks]).

        Raises:
            RuntimeError: If a forced exact method's product is wrong.
        """
        method = self.choice.vector
        self.kernels.products(rows, method, False, support, targets, out=out)
        self._checked = True
        referee = Referee(self.kernels, rows, support, targets, out if method == FINITE_DIFFERENCE else None)
        if method in DIFFERENCE_METHODS:
            self._report_spread(referee, method, f"hvp={method!r}")
            return
        try:
            verdict = referee.judge(out)
        except Exception as error:  # noqa: BLE001 - no referee: the forced method stands unverified
            self.choice.referee[method] = f"unverified (gradient differences failed: {error})"
            return
        self._record(method, verdict)
        if verdict.wrong:
            self.choice.failures[method] = f"wrong products ({verdict.describe()})"
            self._wrong = RuntimeError(
                f"hvp={method!r} gives wrong Hessian-vector products for this model: "
                f"{verdict.describe()}. {_WRONG_CAUSE} Use hvp='auto' (it falls back to gradient "
                "differences where no exact method is right) or hvp='finite-difference'."
            )
            raise self._wrong

    def _choose_matrix(
        self, rows: Tensor, support: tuple[str, ...], targets: tuple[str, ...], out: Tensor, done: int
    ) -> int:
        """Run the chosen method batched on the rest of the chunk and keep it if it beats a loop.

        Returns:
            How many leading rows of ``out`` are computed (all of them, unless batching failed).
        """
        vector, rest = self.choice.vector, rows[done:]
        results, seconds = self._time_once(
            rest, [vector], lambda name: self.kernels.products(rest, name, True, support, targets)
        )
        if vector not in results:  # batching failed (e.g. no vmap rule): a loop of single products
            self.choice.failures[f"{vector} (batched)"] = self.choice.failures.pop(vector)
            self.choice.matrix = MatrixMethod(vector, batched=False)
            self._remember()
            return done
        self.choice.seconds[f"{vector} (batched)"] = seconds[vector]
        batched = seconds[vector] <= self.choice.seconds.get(vector, math.inf)
        self.choice.matrix = MatrixMethod(vector, batched=batched)
        out[done:].copy_(results[vector])
        self._remember()
        return rows.shape[0]

    def _time_once(
        self, rows: Tensor, candidates: list[str], run: Callable[[str], Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Run each candidate once, timed per row; one that raises or gives non-finite products is out."""
        results: dict[str, Tensor] = {}
        seconds: dict[str, float] = {}
        for name in candidates:
            try:
                start = time.perf_counter()
                product = run(name)
                seconds[name] = (time.perf_counter() - start) / rows.shape[0]
            except Exception as error:  # noqa: BLE001 - any failure disqualifies the method
                self.choice.failures[name] = f"{type(error).__name__}: {error}"
                continue
            if all_finite(product):
                results[name] = product
            else:
                self.choice.failures[name] = "non-finite products"
                seconds.pop(name)
        return results, seconds

    def _choose_block(self, rows: Tensor, pair: Pair) -> None:
        loop = self.choice.vector
        if loop in DIFFERENCE_METHODS:
            self.block_methods[pair] = MatrixMethod(loop, batched=False)
            return
        _, single = self._time(
            rows[:1],
            [loop],
            lambda name: self.kernels.products(rows[:1], name, False, *pair),
            rounds=_MATRIX_ROUNDS,
        )
        # Timed on the whole chunk: per-column costs at a few columns are mostly fixed overheads.
        method, seconds = self._select_batched(rows, *pair, vector_seconds=single.get(loop, math.inf))
        self.block_methods[pair] = method
        self.block_seconds[pair] = {**seconds, str(MatrixMethod(loop, False)): single.get(loop, math.inf)}

    def _select_batched(
        self, rows: Tensor, support: tuple[str, ...], targets: tuple[str, ...], vector_seconds: float | None
    ) -> tuple[MatrixMethod, dict[str, float]]:
        """The fastest working batched method on ``rows``, or a loop of the vector method."""
        candidates = [m for m in EXACT_METHODS if m not in self.choice.failures]
        few = rows[:_WARM_UP_COLUMNS]
        results, seconds = self._time(
            rows,
            candidates,
            lambda name: self.kernels.products(rows, name, True, support, targets),
            rounds=_MATRIX_ROUNDS,
            warm_up=lambda name: self.kernels.products(few, name, True, support, targets),
        )
        if vector_seconds is None:
            vector_seconds = self.choice.seconds.get(self.choice.vector, math.inf)
        if results:
            best = self._pick(results, seconds, Referee(self.kernels, rows, support, targets), judge=False)
            if seconds[best] <= vector_seconds:
                return MatrixMethod(best), seconds
        return MatrixMethod(self.choice.vector, batched=False), seconds

    def _time(
        self,
        rows: Tensor,
        candidates: list[str],
        run: Callable[[str], Tensor],
        rounds: int = 1,
        warm_up: Callable[[str], Tensor] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Run each candidate once to warm up, then ``rounds`` timed times, interleaved.

        The fastest of a candidate's timed runs counts: on a shared machine a single run can be
        slowed down many times over by other processes, and interleaving spreads that noise over all
        candidates instead of one. A candidate that raises or gives non-finite products is out.
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
            if not all_finite(results[name]):
                self.choice.failures[name] = "non-finite products"
                results.pop(name)
                seconds.pop(name)
        return results, seconds

    def _pick(
        self, results: dict[str, Tensor], seconds: dict[str, float], referee: Referee, judge: bool = True
    ) -> str:
        """The fastest candidate that is not wrong; gradient differences where none is left.

        Two candidates that disagree go before the referee first (the one clearly further from its
        differences is out). With ``judge`` (the vector choice), the kept candidate is then judged on
        its own (NOTE [Referee verdicts]); without (batched forms of methods judged before), only a
        disagreement calls the referee.

        Raises:
            RuntimeError: If no method works, gradient differences included.
        """
        names = list(results)
        if len(names) == 2:
            difference = relative_difference(*(results[n] for n in names))
            if difference > agreement_tolerance(self.kernels.dtype):
                names = self._resolve(names, results, difference, referee)
        if not judge:
            if not names:
                raise self._no_method_error()
            return min(names, key=lambda n: seconds[n])
        for name in sorted(names, key=lambda n: seconds[n]):
            try:
                verdict = referee.judge(results[name])
            except Exception as error:  # noqa: BLE001 - no referee: keep the exact method, unverified
                self.choice.referee[name] = f"unverified (gradient differences failed: {error})"
                return name
            self._record(name, verdict)
            if not verdict.wrong:
                return name
            self.choice.failures[name] = f"wrong products ({verdict.describe()})"
        return self._fall_back(referee)

    def _resolve(
        self, names: list[str], results: dict[str, Tensor], difference: float, referee: Referee
    ) -> list[str]:
        """Of two disagreeing candidates, drop the one clearly further from gradient differences."""
        try:
            reference = referee.product()
        except Exception:  # noqa: BLE001 - no referee: both stay, the faster one is kept
            return names
        errors = {n: float((results[n] - reference).norm()) for n in names}
        worse, better = sorted(names, key=errors.get, reverse=True)
        # NOTE [Disagreement the referee cannot resolve]: where the product is (nearly) zero, e.g. a
        # bias before a train-mode BatchNorm, both exact methods return rounding noise and differ by
        # 100% of it, while the gradient differences carry far more noise. Only a method clearly
        # further from the referee than the other is wrong (see NOTE [Referee verdicts]).
        if errors[worse] <= REFEREE_MARGIN * errors[better]:
            return names
        self.choice.failures[worse] = (
            f"disagrees with the other method (relative difference {difference:.2e}; "
            "gradient differences side with the other)"
        )
        warnings.warn(
            f"Hessian-vector product method {worse!r} gives wrong products for this model "
            f"and will not be used: {self.choice.failures[worse]}.",
            RuntimeWarning,
            stacklevel=7,
        )
        return [better]

    def _record(self, method: str, verdict: Verdict) -> None:
        """Keep the referee's verdict on a method's first product in the choice."""
        state = "wrong" if verdict.wrong else "agrees" if verdict.verified else "unverified"
        self.choice.referee[method] = f"{state} ({verdict.describe()})"

    def _fall_back(self, referee: Referee) -> str:
        """Gradient differences, when no exact method works: one warning per model in a process.

        Raises:
            RuntimeError: If gradient differences fail too.
        """
        try:
            referee.product()
        except Exception as error:  # noqa: BLE001 - the last method failed too
            self.choice.failures[FINITE_DIFFERENCE] = f"{type(error).__name__}: {error}"
            raise self._no_method_error() from error
        self.choice.seconds[FINITE_DIFFERENCE] = referee.seconds
        causes = "; ".join(f"{k}: {v}" for k, v in self.choice.failures.items())
        spread = self._report_spread(referee, FINITE_DIFFERENCE, None)
        dtype = self.kernels.dtype
        exclusion = _exclusion_advice(self.kernels.closure.model, self.kernels.space.names, generic=False)
        self._warn_once(
            "fallback",
            f"No exact Hessian-vector product method works for this model ({causes}). hvp='auto' uses "
            "gradient differences instead (hvp='finite-difference', two gradients per product): "
            f"expect a relative error of about {expected_error(dtype):.0e} in {dtype} on a smooth "
            f"model (their spread between two steps on the first product: {spread:.1e}). "
            f"{_WRONG_CAUSE if 'wrong products' in causes else ''} "
            f"{exclusion.replace('to analyse the rest', 'for exact products of the rest')}".strip(),
        )
        return FINITE_DIFFERENCE

    def _report_spread(self, referee: Referee, method: str, forced: str | None) -> float:
        """Measure gradient differences' spread between two steps; warn (once) when kinks show."""
        try:
            spread = referee.spread()
        except Exception:  # noqa: BLE001 - a failing product raises on its own; nothing to report here
            return math.nan
        self.choice.referee[method] = f"spread between two steps {spread:.1e}"
        expected = expected_error(self.kernels.dtype)
        if spread > max(_KINK_SPREAD, 10 * expected):
            self._warn_once(
                "kinks",
                f"Gradient differences{' (' + forced + ')' if forced else ''} change by {spread:.1e} "
                f"(relative) between two steps on this model, far beyond the {expected:.0e} "
                "of a smooth loss: the steps cross kinks that are not frozen at θ (abs, clamp, max, a "
                "compiled module's; ReLU and max-pooling are frozen), so products may be wrong by that much. "
                "Compute in float64 (dtype=torch.float64), whose smaller steps cross fewer kinks, or use "
                "an exact method where one works.",
            )
        return spread

    def _warn_once(self, key: str, message: str) -> None:
        said = _WARNED.setdefault(self.kernels.closure.model, set())
        if key not in said:
            said.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=7)

    def _no_method_error(self) -> RuntimeError:
        return RuntimeError(
            "No Hessian-vector product method works for this model: "
            + "; ".join(f"{k}: {v}" for k, v in self.choice.failures.items())
            + ". "
            + _exclusion_advice(self.kernels.closure.model, self.kernels.space.names)
        )
