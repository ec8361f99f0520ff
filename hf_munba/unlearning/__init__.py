"""What every unlearning front end shares: the method registry and the optimizer step."""

from .registry import METHODS, available_methods, get_method, register_method
from .step import SkippedStepGuard, StepResult, TooManySkippedSteps, guarded_step, unlearning_step

__all__ = ["METHODS", "available_methods", "get_method", "register_method", "SkippedStepGuard",
           "TooManySkippedSteps", "guarded_step", "unlearning_step", "StepResult"]
