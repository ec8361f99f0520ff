"""Combiners: K player gradients' Gram matrix in, K weights out (one interface, TorchJD-style)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .solver import DEFAULT_OPPOSED_TOL, BargainingSolution, nash_bargaining_weights, solve_nash_bargaining


class NashWeighting:
    """Gram matrix -> weights, TorchJD style (``weighting(gram)``): the solve, with its settings.

    ``NashWeighting(powers=[1.0, 0.5])(G)`` returns the same tensor as
    ``nash_bargaining_weights(G, powers=[1.0, 0.5])``; ``solution(G)`` returns the full
    :class:`BargainingSolution` with the infeasibility rule applied instead of raising.
    """

    def __init__(self, powers: Optional[Sequence[float]] = None, *,
                 opposed_tol: float = DEFAULT_OPPOSED_TOL, fallback_player: Optional[int] = 0):
        self.powers = None if powers is None else [float(x) for x in powers]
        self.opposed_tol = opposed_tol
        self.fallback_player = fallback_player

    def __call__(self, gram: torch.Tensor) -> torch.Tensor:
        return nash_bargaining_weights(gram, powers=self.powers, opposed_tol=self.opposed_tol)

    def solution(self, gram) -> BargainingSolution:
        return solve_nash_bargaining(gram, powers=self.powers, opposed_tol=self.opposed_tol,
                                     fallback_player=self.fallback_player)

    def __repr__(self) -> str:
        return (f"NashWeighting(powers={self.powers}, opposed_tol={self.opposed_tol}, "
                f"fallback_player={self.fallback_player})")

