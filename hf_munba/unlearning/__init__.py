"""What every unlearning front end shares: the method registry and the optimizer step."""

from .methods import UnlearningMethod  # registers the shared methods (munba, weighted, ...)
from .registry import METHODS, available_methods, get_method, register_method
from .step import SkippedStepGuard, StepResult, TooManySkippedSteps, guarded_step, unlearning_step

__all__ = ["UnlearningMethod", "METHODS", "available_methods", "get_method", "register_method", "SkippedStepGuard",
           "TooManySkippedSteps", "guarded_step", "unlearning_step", "StepResult"]
