"""hf_munba: Machine Unlearning via Nash Bargaining (Wu & Harandi, 2024) for the Hugging Face stack."""

from .bargaining import (
    BargainingSolution,
    BargainingStatus,
    BargainStats,
    InfeasibleBargainingError,
    NashBargainer,
    nash_bargaining_weights,
    solve_nash_bargaining,
)

__version__ = "0.1.0"

__all__ = [
    "BargainingSolution",
    "BargainingStatus",
    "BargainStats",
    "InfeasibleBargainingError",
    "NashBargainer",
    "nash_bargaining_weights",
    "solve_nash_bargaining",
]

# Stable Diffusion unlearning (issue 4)
from .generation import generate_images  # noqa: E402
from .sd_data import PairedUnlearningDataset, load_imagefolder  # noqa: E402
from .sd_unlearning import SDUnlearner, SkippedStepGuard  # noqa: E402

__all__ += ["generate_images", "PairedUnlearningDataset", "load_imagefolder", "SDUnlearner",
            "SkippedStepGuard"]

# Classification unlearning (issue 3): the Trainer, its options, the method registry. Imported
# lazily so that `import hf_munba` does not pull in transformers.Trainer for SD users.
_LAZY_CLASSIFICATION = {
    "MunbaArguments": ".trainer", "MunbaTrainer": ".trainer", "NonFiniteTrainingError": ".trainer",
    "UnlearningMethod": ".unlearning_methods", "available_methods": ".unlearning_methods",
    "register_method": ".unlearning_methods", "ForgetSpec": ".forget_sets",
    "split_forget_retain": ".forget_sets", "CLIPZeroShotClassifier": ".clip_zero_shot",
}
__all__ += list(_LAZY_CLASSIFICATION)
_previous_getattr = globals().get("__getattr__")


def __getattr__(name):
    if name in _LAZY_CLASSIFICATION:
        import importlib

        return getattr(importlib.import_module(_LAZY_CLASSIFICATION[name], __name__), name)
    if _previous_getattr is not None:
        return _previous_getattr(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
