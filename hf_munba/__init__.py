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
