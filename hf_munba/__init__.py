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
