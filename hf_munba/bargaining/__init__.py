"""Nash bargaining over gradients: the math every hf_munba front end shares.

- :mod:`.solver`: the solve itself (Gram matrix -> weights; closed form for two players, Newton
  for more; bargaining powers). Pure math; its docstring carries the derivation.
- :mod:`.combiners`: the interface a step uses (Gram -> weights) and its implementations.
- :mod:`.bargainer`: :class:`NashBargainer`, which keeps one gradient per player on the trained
  parameters and writes the combined gradient back into ``.grad``.
- :mod:`.satisfaction`: when the forget player is done (:class:`SatisfactionRule`).
"""

from .bargainer import BargainStats, NashBargainer
from .combiners import ConstantWeighting, NashWeighting, Weighting
from .satisfaction import (DEFAULT_FORGET_TARGETS, DEFAULT_SATISFIED_POWER, NEGATED_OBJECTIVES,
                           SatisfactionRule, build_forget_rule, default_forget_target)
from .solver import (DEFAULT_OPPOSED_TOL, BargainingSolution, BargainingStatus,
                     InfeasibleBargainingError, nash_bargaining_weights, solve_nash_bargaining)

__all__ = [
    "BargainStats", "NashBargainer", "NashWeighting", "ConstantWeighting", "Weighting", "DEFAULT_FORGET_TARGETS",
    "DEFAULT_SATISFIED_POWER", "NEGATED_OBJECTIVES", "SatisfactionRule", "build_forget_rule",
    "default_forget_target", "DEFAULT_OPPOSED_TOL", "BargainingSolution", "BargainingStatus",
    "InfeasibleBargainingError", "nash_bargaining_weights", "solve_nash_bargaining",
]
