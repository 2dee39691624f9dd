"""What an analysis measures and how: one settings object, checked once, for every entry point.

:func:`lightning_hessian.analyze` builds an :class:`AnalysisSettings` from its keyword arguments and
:class:`~lightning_hessian.HessianCallback` builds one from its own, so the rules for each setting
(its type, its range, its error message) exist in one place and a bad value is refused the same way
wherever it is given, before any heavy work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .batches import BatchSizeFn
from .closure import validate_mode, validate_reduction
from .operator import HVP_METHODS
from .parameters import BlocksSpec, Patterns, check_blocks
from .trace import METHODS as TRACE_METHODS
from .validation import (
    check_bool,
    check_callable,
    check_choice,
    check_dtype,
    check_int,
    check_optional_int,
    check_patterns,
    check_positive_float,
)

#: How blocks are computed: exactly up to ``dense_limit`` parameters (``"auto"``), always exactly
#: (``"dense"``), or always from Hessian-vector products (``"iterative"``).
ANALYSIS_METHODS = ("auto", "dense", "iterative")
#: How an iterative block is estimated: one Krylov space per quantity, or one shared by all of them.
KRYLOV_MODES = ("separate", "shared")


@dataclass(frozen=True)
class AnalysisSettings:
    """The settings of one analysis (see :func:`lightning_hessian.analyze` for each one's meaning).

    Every field is checked on construction: ``TypeError`` for a wrong type, ``ValueError`` for a
    value out of range, each naming the field and the fix. ``dtype`` may be given by name
    (``"float64"``) and is stored as a ``torch.dtype``.

    Example:
        >>> AnalysisSettings(top_k=5, dtype="float64").dtype
        torch.float64
    """

    params: Patterns = None
    blocks: BlocksSpec = None
    top_k: int = 3
    min_eigenvalue: bool = True
    trace: bool = True
    density: bool = True
    method: str = "auto"
    dense_limit: int = 1024
    mode: str = "eval"
    dtype: torch.dtype | None = None
    seed: int = 0
    batch_size_fn: BatchSizeFn | None = None
    tol: float = 1e-4
    max_matvecs: int | None = None
    trace_method: str = "hutch++"
    trace_matvecs: int = 99
    density_probes: int = 4
    density_steps: int = 32
    eigenvectors: bool = False
    hvp: str = "auto"
    reduction: str = "mean"
    krylov: str = "separate"
    keep_vectors: int = 0
    gradient_geometry: bool = False
    landscape: bool = False
    landscape_points: int = 21

    def __post_init__(self) -> None:
        check_patterns("params", self.params)
        check_blocks(self.blocks)
        check_int("top_k", self.top_k, 0, "Pass e.g. top_k=3 (0 for no top eigenvalues).")
        for flag in ("min_eigenvalue", "trace", "density", "eigenvectors", "gradient_geometry", "landscape"):
            check_bool(flag, getattr(self, flag))
        check_choice("method", self.method, ANALYSIS_METHODS)
        check_int(
            "dense_limit", self.dense_limit, 0, "Blocks up to this size are computed densely, e.g. 1024."
        )
        validate_mode(self.mode)
        object.__setattr__(self, "dtype", check_dtype("dtype", self.dtype))
        check_int("seed", self.seed, 0, "Pass a non-negative integer such as seed=0.")
        if self.batch_size_fn is not None:
            check_callable("batch_size_fn", self.batch_size_fn, "batch_size_fn(batch) -> number of samples")
        check_positive_float("tol", self.tol, "It is a relative residual, e.g. tol=1e-4.")
        check_optional_int("max_matvecs", self.max_matvecs, 1, "It is a product budget per search, or None.")
        check_choice("trace_method", self.trace_method, TRACE_METHODS)
        check_int("trace_matvecs", self.trace_matvecs, 1, "It is the number of products the trace may use.")
        check_int("density_probes", self.density_probes, 1, "Use at least one random probe.")
        check_int("density_steps", self.density_steps, 1, "Use at least one Lanczos step.")
        check_choice("hvp", self.hvp, HVP_METHODS)
        validate_reduction(self.reduction)
        check_choice("krylov", self.krylov, KRYLOV_MODES)
        check_int(
            "keep_vectors", self.keep_vectors, 0, "It is the number of Ritz vectors kept for a warm start."
        )
        check_int(
            "landscape_points", self.landscape_points, 3, "Use at least 3 points per direction, e.g. 21."
        )

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The names of all settings, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def create(cls, argument: str = "settings", **values: Any) -> AnalysisSettings:
        """Build settings from keyword arguments, refusing unknown names with the list of known ones.

        Args:
            argument: The user-facing name of the mapping the values came from, for the message.
            **values: Settings by name.

        Returns:
            The checked settings.

        Raises:
            ValueError: For an unknown name.
            TypeError: For a value of the wrong type.
        """
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            raise ValueError(
                f"`{argument}` has unknown keys {unknown}; use only these: {sorted(cls.names())}."
            )
        return cls(**values)
