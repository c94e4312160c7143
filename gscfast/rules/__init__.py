"""Per-module analytic Jacobian rules and their registry (``RULES``: module type -> rule class)."""

from . import activation, conv, generic, linear, norm, residual  # noqa: F401  (registration side effects)
from .base import RULES, ForwardCtx, Rule, register
from .error import error_grad, error_value

__all__ = ["RULES", "ForwardCtx", "Rule", "error_grad", "error_value", "register"]
