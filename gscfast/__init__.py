"""gscfast: fast Jacobian chains and gradient scale coefficients (Philipp, Song & Carbonell 2018).

Every quantity is defined in the project's definitions (README, "What gscfast computes").
"""
from . import autograd, estimators, nn
from .analysis import Analysis, analyze
from .api import (PreactStats, effective_depth, explosion_rate, gsc, gsc_matrix, gsc_moments, jacobian,
                  preactivation_stats)
from .backends import available_backends
from .compiler import compile_model
from .estimators import BootstrapGSC, GSCMoments, bootstrap_gsc, pool
from .flow import GradientFlow
from .nn import Residual, mlp

__version__ = "0.1.0"

__all__ = [
    "gsc", "gsc_moments", "gsc_matrix", "preactivation_stats", "jacobian", "effective_depth", "analyze",
    "Analysis", "PreactStats", "explosion_rate", "mlp", "Residual", "compile_model",
    "available_backends", "autograd", "nn", "GradientFlow", "__version__",
    "estimators", "GSCMoments", "pool", "bootstrap_gsc", "BootstrapGSC",
]
