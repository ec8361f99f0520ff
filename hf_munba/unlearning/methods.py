"""Unlearning methods shared by every front end: one short class each, one registry line.

A method says which players it uses (retain on D_r, forget on D_f), how their gradients combine
(a :class:`~hf_munba.bargaining.Weighting`: Nash bargaining or a constant weighted sum), whether
the forget player can be satisfied, and optionally prepares the model or edits the combined
gradient. The front ends own the losses (the SD objectives, the classifier's cross-entropies)
and the loop; both run the same optimizer step (:func:`~hf_munba.unlearning.unlearning_step`).
So ``weighted`` is a weighting, not a branch, and ``ga`` means the same everywhere: gradient
ascent on D_f alone. Adding a method::

    @register_method("my_method")
    class MyMethod(UnlearningMethod):
        summary = "..."
        uses_forget = True

A method reads its settings from the front end's config (``MunbaArguments``, the SD
script's arguments) by attribute: ``forget_weight``, ``opposed_tol``, ``fallback_player``,
``bargaining_power_forget`` and the ``forget_target*`` options; missing ones take the defaults
below. Methods that only one front end can run (e.g. SalUn needs a classifier's saliency) list it
in ``front_ends``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch

from ..bargaining import (DEFAULT_OPPOSED_TOL, DEFAULT_SATISFIED_POWER, ConstantWeighting,
                          NashBargainer, NashWeighting, SatisfactionRule, Weighting,
                          build_forget_rule)
from .registry import METHODS, available_methods, get_method, register_method

__all__ = ["UnlearningMethod", "METHODS", "register_method", "get_method", "available_methods",
           "FRONT_ENDS"]

FRONT_ENDS = ("diffusion", "classification")

_DEFAULTS: Dict[str, Any] = {
    "forget_weight": 1.0, "opposed_tol": DEFAULT_OPPOSED_TOL, "fallback_player": 0,
    "bargaining_power_forget": 1.0, "forget_target": None, "forget_target_mode": None,
    "forget_target_ema": 0.9, "forget_target_hysteresis": 1.5,
    "forget_target_reference_steps": 1, "satisfied_power_forget": DEFAULT_SATISFIED_POWER,
}


class UnlearningMethod:
    """Base: fine-tuning on D_r (one player, retain); subclasses switch pieces on or off."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    uses_retain: ClassVar[bool] = True
    uses_forget: ClassVar[bool] = False
    bargains: ClassVar[bool] = False  # Nash bargaining between the players
    satisfiable: ClassVar[bool] = False  # the forget player can be satisfied (SatisfactionRule)
    front_ends: ClassVar[Tuple[str, ...]] = FRONT_ENDS
    #: the forget loss when the config names none, per front end
    default_forget_loss: ClassVar[Dict[str, str]] = {"classification": "random_label",
                                                     "diffusion": "remap"}

    def __init__(self, config: Any = None):
        self.config = config

    def setting(self, name: str):
        return getattr(self.config, name, _DEFAULTS[name]) if self.config is not None \
            else _DEFAULTS[name]

    # ---- players and their combination ----------------------------------------------------
    @classmethod
    def players(cls) -> Tuple[str, ...]:
        """Names of the players, in bargainer order: retain (if used) before forget."""
        return tuple(n for n, used in (("retain", cls.uses_retain), ("forget", cls.uses_forget))
                     if used)

    @property
    def forget_player(self) -> Optional[int]:
        return self.players().index("forget") if self.uses_forget else None

    @property
    def forget_weight(self) -> float:
        """The forget loss's weight in a constant weighting (1 unless the method says otherwise)."""
        return 1.0

    def weighting(self) -> Weighting:
        if self.bargains:
            return NashWeighting(opposed_tol=self.setting("opposed_tol"),
                                 fallback_player=self.setting("fallback_player"))
        return ConstantWeighting([1.0 if p == "retain" else self.forget_weight
                                  for p in self.players()])

    def make_bargainer(self, params, **kwargs) -> NashBargainer:
        """The in-place combiner of the players' gradients on ``params``."""
        return NashBargainer(params, num_players=len(self.players()),
                             weighting=self.weighting(), **kwargs)

    def powers(self) -> Optional[List[float]]:
        """Fixed bargaining powers when no forget rule sets them (None: all 1)."""
        w = self.setting("bargaining_power_forget")
        if not self.bargains or w == 1.0:
            return None
        return [1.0 if p == "retain" else float(w) for p in self.players()]

    def forget_rule(self, forget_loss: str) -> Optional[SatisfactionRule]:
        """The satisfied-forget-player rule for ``forget_loss`` (an objective name), or None."""
        if not (self.bargains and self.satisfiable and self.uses_forget):
            return None
        s = self.setting
        return build_forget_rule(
            forget_loss, target=s("forget_target"), mode=s("forget_target_mode"),
            ema=s("forget_target_ema"), hysteresis=s("forget_target_hysteresis"),
            reference_steps=s("forget_target_reference_steps"),
            satisfied_power=s("satisfied_power_forget"), power=s("bargaining_power_forget"))

    # ---- hooks ------------------------------------------------------------------------------
    def setup(self, model: torch.nn.Module, context: Any = None) -> None:
        """Called once before training (and before any checkpoint is loaded). ``context`` is the
        front end's view of the data (e.g. the classifier's forget batches)."""

    def retain_loss(self, loss: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
        """The retain player's loss from the front end's (e.g. plus a penalty)."""
        return loss

    def forget_loss(self, loss: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
        return loss

    def edit_gradients(self, params: List[torch.nn.Parameter]) -> None:
        """Last change to the combined gradient, before clipping and the optimizer step."""


@register_method("munba")
class Munba(UnlearningMethod):
    summary = ("Nash bargaining between the retain and forget gradients (Wu & Harandi 2024), "
               "with the satisfied-forget-player rule")
    uses_forget = True
    bargains = True
    satisfiable = True


@register_method("munba-paper")
class MunbaPaper(Munba):
    summary = "the paper's plain MUNBa: equal bargaining powers, no satisfied player"
    satisfiable = False

    def powers(self) -> Optional[List[float]]:
        return None


@register_method("weighted")
class Weighted(UnlearningMethod):
    summary = "L_r + lam * L_f, one summed gradient"
    uses_forget = True

    @property
    def forget_weight(self) -> float:
        return float(self.setting("forget_weight"))


@register_method("ft")
class FineTune(UnlearningMethod):
    summary = "fine-tune on D_r only (catastrophic forgetting)"


@register_method("ga")
class GradientAscent(UnlearningMethod):
    summary = "gradient ascent on D_f only"
    uses_retain = False
    uses_forget = True
    default_forget_loss = {"classification": "neg_ce", "diffusion": "ga"}
