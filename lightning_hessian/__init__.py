"""lightning_hessian: the Hessian of a neural network's loss w.r.t. its parameters.

Exact dense and block-diagonal Hessians, fast Hessian-vector products, Lanczos eigenvalues, trace
and spectral-density estimators for any ``torch.nn.Module``, and a PyTorch Lightning callback that
logs them to TensorBoard while a model trains.
"""

from .analysis import analyze
from .batches import infer_batch_size
from .callback import HessianCallback
from .density import spectral_density
from .errors import HessianTooLargeError, NonFiniteHessianError
from .exact import hessian
from .lanczos import HessianConvergenceWarning, eigenvalues
from .linear_operator import MatrixOperator, SymmetricOperator
from .operator import HessianOperator
from .parameters import ParameterSpace, resolve_blocks, select_parameters
from .results import BlockReport, EigenResult, HessianReport, SpectralDensity, TraceResult
from .stability import StabilityResult, stability
from .trace import trace

__version__ = "0.1.0"

__all__ = [
    "BlockReport",
    "HessianCallback",
    "HessianConvergenceWarning",
    "EigenResult",
    "HessianOperator",
    "HessianReport",
    "HessianTooLargeError",
    "MatrixOperator",
    "NonFiniteHessianError",
    "ParameterSpace",
    "SpectralDensity",
    "StabilityResult",
    "SymmetricOperator",
    "TraceResult",
    "analyze",
    "eigenvalues",
    "hessian",
    "infer_batch_size",
    "resolve_blocks",
    "select_parameters",
    "spectral_density",
    "stability",
    "trace",
]
