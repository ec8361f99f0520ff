"""hf_munba: Machine Unlearning via Nash Bargaining (Wu & Harandi, 2024) for the Hugging Face stack.

The bargaining core is imported eagerly (it needs only torch); the Stable Diffusion and
classification front ends load on first use, so `import hf_munba` stays light.
"""

import importlib

from .dependency_versions import check_dependency_versions

check_dependency_versions()  # one clear line naming what to install, before any deep failure

from . import _moved_modules  # noqa: E402  (old module paths, one release)
from .bargaining import (  # noqa: E402
    ConstantWeighting,
    Weighting,
    BargainingSolution,
    BargainingStatus,
    BargainStats,
    InfeasibleBargainingError,
    NashBargainer,
    NashWeighting,
    SatisfactionRule,
    build_forget_rule,
    default_forget_target,
    nash_bargaining_weights,
    solve_nash_bargaining,
)

__version__ = "0.1.0"

_LAZY = {
    # Stable Diffusion unlearning
    "generate_images": ".diffusion.generation",
    "PairedUnlearningDataset": ".diffusion.data", "load_imagefolder": ".diffusion.data",
    "SDUnlearner": ".diffusion.unlearner",
    "SDUnlearningConfig": ".diffusion.config", "train_sd": (".diffusion.trainer", "train"),
    "unlearn": ".diffusion.unlearn",  # one call: pipeline + concept(s) -> unlearned pipeline
    # the shared step and the method registry
    "SkippedStepGuard": ".unlearning.step", "TooManySkippedSteps": ".unlearning.step",
    "guarded_step": ".unlearning.step",
    "available_methods": ".classification.methods",  # via classification: every method registered
    "register_method": ".unlearning.registry", "get_method": ".classification.methods",
    # classification unlearning: the Trainer, its options, the methods
    "MunbaArguments": ".classification.trainer", "MunbaTrainer": ".classification.trainer",
    "NonFiniteTrainingError": ".classification.trainer",
    "UnlearningMethod": ".unlearning.methods", "unlearning_step": ".unlearning.step",
    "ForgetSpec": ".classification.forget_sets",
    "split_forget_retain": ".classification.forget_sets",
    "CLIPZeroShotClassifier": ".classification.clip_zero_shot",
    "unlearn_classifier": ".classification.unlearn",  # one call: model + dataset -> unlearned model
}

__all__ = [
    "BargainingSolution",
    "ConstantWeighting",
    "Weighting",
    "BargainingStatus",
    "BargainStats",
    "InfeasibleBargainingError",
    "NashBargainer",
    "NashWeighting",
    "SatisfactionRule",
    "build_forget_rule",
    "default_forget_target",
    "nash_bargaining_weights",
    "solve_nash_bargaining",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name] if isinstance(_LAZY[name], tuple) else (_LAZY[name], name)
        return getattr(importlib.import_module(module, __name__), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
