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
from .geometry import eigenspace_overlap, gradient_geometry
from .lanczos import HessianConvergenceWarning, eigenvalues
from .landscape import loss_landscape
from .linear_operator import MatrixOperator, SymmetricOperator
from .operator import HessianOperator
from .parameters import ParameterSpace, resolve_blocks, select_parameters
from .results import (
    BlockReport,
    EigenResult,
    GradientGeometry,
    HessianReport,
    Landscape,
    SpectralDensity,
    StabilityResult,
    TraceResult,
)
from .sharded import ShardedHessianOperator
from .stability import stability
from .trace import trace

__version__ = "0.1.0"

__all__ = [
    "BlockReport",
    "EigenResult",
    "GradientGeometry",
    "HessianCallback",
    "HessianConvergenceWarning",
    "HessianOperator",
    "HessianReport",
    "HessianTooLargeError",
    "Landscape",
    "MatrixOperator",
    "NonFiniteHessianError",
    "ParameterSpace",
    "ShardedHessianOperator",
    "SpectralDensity",
    "StabilityResult",
    "SymmetricOperator",
    "TraceResult",
    "analyze",
    "eigenspace_overlap",
    "eigenvalues",
    "gradient_geometry",
    "hessian",
    "infer_batch_size",
    "loss_landscape",
    "resolve_blocks",
    "select_parameters",
    "spectral_density",
    "stability",
    "trace",
]
