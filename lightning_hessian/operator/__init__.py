"""The Hessian of a module's loss w.r.t. its parameters as a symmetric linear operator."""

from .hessian import HVP_METHODS, HessianOperator
from .kernels import FORWARD, REVERSE
from .selection import MatrixMethod, MethodChoice

__all__ = ["FORWARD", "HVP_METHODS", "REVERSE", "HessianOperator", "MatrixMethod", "MethodChoice"]
