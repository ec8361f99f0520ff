"""Weightings: the K x K Gram matrix of the players' gradients in, K weights out.

One interface, in the style of TorchJD's ``Weighting``: ``weighting(gram) -> weights``. The
in-place bargainer (:class:`~hf_munba.bargaining.bargainer.NashBargainer`) takes any weighting,
so Nash bargaining and the weighted sum are two implementations of the same step rather than
two code paths in every front end:

- :class:`NashWeighting`: the Nash bargaining solution (:mod:`.solver`), scale-free.
- :class:`ConstantWeighting`: fixed weights, e.g. ``[1, lambda]`` for L_r + lambda L_f. It needs
  no Gram matrix (``needs_gram = False``), so the bargainer scales each player's loss instead of
  keeping a gradient buffer per player: the weighted sum costs what a plain summed backward
  costs, with each player's graph freed right after its own backward.

A new weighting subclasses :class:`Weighting` and implements ``__call__`` (and ``solution`` when
it can fail in a way the step must know about).
"""

from __future__ import annotations

import math
from typing import ClassVar, Optional, Sequence

import torch

from .solver import (DEFAULT_OPPOSED_TOL, BargainingSolution, BargainingStatus,
                     nash_bargaining_weights, solve_nash_bargaining)

__all__ = ["Weighting", "NashWeighting", "ConstantWeighting"]


class Weighting:
    """Gram matrix (K x K, float64) -> K non-negative weights for the players' gradients."""

    #: False for weightings that ignore the Gram matrix: the bargainer then never forms it.
    needs_gram: ClassVar[bool] = True

    def __call__(self, gram: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def solution(self, gram) -> BargainingSolution:
        """The weights with a status: NONFINITE when the Gram or the weights are not finite."""
        g = torch.as_tensor(gram, dtype=torch.float64)
        k = g.shape[0]
        if not bool(torch.isfinite(g).all()):
            return BargainingSolution([0.0] * k, BargainingStatus.NONFINITE, [False] * k)
        w = [float(x) for x in self(g)]
        if not all(math.isfinite(x) for x in w):
            return BargainingSolution([0.0] * k, BargainingStatus.NONFINITE, [False] * k)
        return BargainingSolution(w, BargainingStatus.OK, [x != 0.0 for x in w])


class ConstantWeighting(Weighting):
    """The same weights every step: the weighted sum sum_i w_i L_i (``[1, lam]`` for two players)."""

    needs_gram = False

    def __init__(self, weights: Sequence[float]):
        weights = [float(x) for x in weights]
        if not weights or not all(math.isfinite(x) and x >= 0 for x in weights):
            raise ValueError(f"weights must be finite and >= 0, got {weights}")
        self.weights = weights

    def __call__(self, gram=None) -> torch.Tensor:
        return torch.tensor(self.weights, dtype=torch.float64)

    def solution(self, gram=None) -> BargainingSolution:
        return BargainingSolution(list(self.weights), BargainingStatus.OK,
                                  [x != 0.0 for x in self.weights])

    def __repr__(self) -> str:
        return f"ConstantWeighting({self.weights})"


class NashWeighting(Weighting):
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

