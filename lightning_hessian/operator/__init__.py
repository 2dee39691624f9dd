"""The Hessian of a module's loss w.r.t. its parameters as a symmetric linear operator."""

from .differences import FINITE_DIFFERENCE, RICHARDSON
from .hessian import HVP_METHODS, HessianOperator
from .kernels import FORWARD, REVERSE
from .selection import MatrixMethod, MethodChoice

__all__ = [
    "FINITE_DIFFERENCE",
    "FORWARD",
    "HVP_METHODS",
    "REVERSE",
    "RICHARDSON",
    "HessianOperator",
    "MatrixMethod",
    "MethodChoice",
]
