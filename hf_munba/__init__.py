"""hf_munba: Machine Unlearning via Nash Bargaining (Wu & Harandi, 2024) for the Hugging Face stack.

The bargaining core is imported eagerly (it needs only torch); the Stable Diffusion and
classification front ends load on first use, so `import hf_munba` stays light.
"""

import importlib

from .dependency_versions import check_dependency_versions

check_dependency_versions()  # one clear line naming what to install, before any deep failure

from .bargaining import (  # noqa: E402
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
    "generate_images": ".generation",
    "PairedUnlearningDataset": ".sd_data", "load_imagefolder": ".sd_data",
    "SDUnlearner": ".sd_unlearning", "SkippedStepGuard": ".sd_unlearning",
    # classification unlearning: the Trainer, its options, the method registry
    "MunbaArguments": ".trainer", "MunbaTrainer": ".trainer", "NonFiniteTrainingError": ".trainer",
    "UnlearningMethod": ".unlearning_methods", "available_methods": ".unlearning_methods",
    "register_method": ".unlearning_methods", "ForgetSpec": ".forget_sets",
    "split_forget_retain": ".forget_sets", "CLIPZeroShotClassifier": ".clip_zero_shot",
}

__all__ = [
    "BargainingSolution",
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
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
