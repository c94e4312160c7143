"""gscfast: fast Jacobian chains and gradient scale coefficients (Philipp, Song & Carbonell 2018).

Every quantity is defined in the project's definitions (README, "What gscfast computes").
"""

from . import autograd, estimators, nn
from .analysis import Analysis, analyze
from .api import (
    PreactStats,
    effective_depth,
    explosion_rate,
    gsc,
    gsc_matrix,
    gsc_moments,
    jacobian,
    preactivation_stats,
)
from .backends import available_backends
from .compiler import compile_model
from .errors import NumericalError
from .estimators import BootstrapGSC, GSCMoments, bootstrap_gsc, pool
from .flow import GradientFlow
from .nn import Residual, mlp

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "BootstrapGSC",
    "GSCMoments",
    "GradientFlow",
    "NumericalError",
    "PreactStats",
    "Residual",
    "__version__",
    "analyze",
    "autograd",
    "available_backends",
    "bootstrap_gsc",
    "compile_model",
    "effective_depth",
    "estimators",
    "explosion_rate",
    "gsc",
    "gsc_matrix",
    "gsc_moments",
    "jacobian",
    "mlp",
    "nn",
    "pool",
    "preactivation_stats",
]
