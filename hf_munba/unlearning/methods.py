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

A method declares its settings where it is defined (peft style): ``settings`` maps a field
name to a :class:`MethodSetting` (default, help, type, check). The front end's config is
assembled from them (:func:`settings_fields` builds ``MunbaArguments``' method fields, with their
help and ``__post_init__`` check, see :func:`validate_settings`), so a method with a new setting
is one class in one file. A method reads a setting from the front end's config by attribute
(:meth:`UnlearningMethod.setting`: ``MunbaArguments``, or the SD script's ``argparse``
namespace); a config without it gives the declared default. Methods that only one front end can
run (e.g. SalUn needs a classifier's saliency) list it in ``front_ends``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..bargaining import (DEFAULT_OPPOSED_TOL, DEFAULT_SATISFIED_POWER, ConstantWeighting,
                          NashBargainer, NashWeighting, SatisfactionRule, Weighting,
                          build_forget_rule)
from .registry import METHODS, available_methods, get_method, register_method

__all__ = ["UnlearningMethod", "METHODS", "register_method", "get_method", "available_methods",
           "FRONT_ENDS", "MethodSetting", "check_forget_names", "method_settings", "settings_fields",
           "validate_settings"]

FRONT_ENDS = ("diffusion", "classification")


@dataclass(frozen=True)
class MethodSetting:
    """One option of a method: what a config field needs (default, help, type) and its check.

    ``check`` returns True for an acceptable value; ``expected`` says what it accepts, in the
    words of the one error raised otherwise (``"<name> must be <expected>, got <value>"``).
    ``choices`` restricts the value to a fixed set (checked first). Two methods share a setting
    by naming the same object (e.g. ``munba`` and ``munba-paper`` share ``opposed_tol``).
    """

    default: Any
    help: str
    type: Any = None  # the config field's annotation; None: the default's type
    check: Optional[Callable[[Any], bool]] = None
    expected: str = ""
    choices: Optional[Tuple[Any, ...]] = None

    @property
    def annotation(self) -> Any:
        return self.type if self.type is not None else type(self.default)

    def validate(self, name: str, value: Any) -> None:
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{name} must be one of {list(self.choices)}, got {value!r}")
        if self.check is not None and not self.check(value):
            raise ValueError(f"{name} must be {self.expected}, got {value!r}")


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def _non_negative(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v >= 0


# ---- the settings the shared methods declare (one object per setting; methods name them) ------
FORGET_WEIGHT = MethodSetting(
    1.0, "lam in L_r + lam * L_f for method 'weighted' (MUNBa is invariant to it)", float,
    _positive, "a positive number")
OPPOSED_TOL = MethodSetting(
    DEFAULT_OPPOSED_TOL, "smallest 1 + cos(g_r, g_f) still bargained; below it the fallback "
    "player steps", float, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
FALLBACK_PLAYER = MethodSetting(
    0, "player followed when no direction helps both (0 retain, 1 forget, None skip)",
    Optional[int], choices=(None, 0, 1))
BARGAINING_SETTINGS: Dict[str, MethodSetting] = {"opposed_tol": OPPOSED_TOL,
                                                  "fallback_player": FALLBACK_PLAYER}
FORGET_RULE_SETTINGS: Dict[str, MethodSetting] = {
    "bargaining_power_forget": MethodSetting(
        None, "method 'munba': the forget player's bargaining power (retain has 1) while it is "
        "not satisfied; 1 = the paper's symmetric game. None: chosen by the front end from the "
        "forget set, 1 for classes or concepts, 0.2 for a classifier's samples of classes it "
        "keeps (hf_munba.classification.forget_power)", Optional[float],
        lambda v: v is None or _positive(v), "a positive number or None"),
    "forget_target": MethodSetting(
        None, "method 'munba': the forget player leaves the game once an EMA of its loss is at "
        "or below this target; default per forget loss (none for random_label and neg_ce: see "
        "hf_munba.bargaining.DEFAULT_FORGET_TARGETS)", Optional[float],
        lambda v: v is None or (isinstance(v, (int, float)) and math.isfinite(v)),
        "a finite number or None"),
    "forget_target_mode": MethodSetting(
        None, "'relative' (a fraction of the first steps' mean loss; scale-free) or 'absolute' "
        "(a loss value); default: the forget loss's default, else absolute", Optional[str],
        choices=(None, "relative", "absolute")),
    "forget_target_ema": MethodSetting(
        0.9, "smoothing of the forget loss before the comparison, in [0, 1)", float,
        lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "forget_target_hysteresis": MethodSetting(
        1.5, "a satisfied forget player comes back above this factor times the target", float,
        lambda v: math.isfinite(v) and v >= 1.0, "a finite factor >= 1 (hysteresis)"),
    "forget_target_reference_steps": MethodSetting(
        1, "relative targets: the number of first optimizer steps averaged as reference", int,
        lambda v: v >= 1, ">= 1"),
    "satisfied_power_forget": MethodSetting(
        DEFAULT_SATISFIED_POWER, "the forget player's power while satisfied (0: it leaves the "
        "game; the default mostly follows retain and keeps a small forgetting pressure)",
        float, _non_negative, "finite and >= 0"),
}


def method_settings(front_end: Optional[str] = None) -> Dict[str, Tuple[MethodSetting, List[str]]]:
    """Every setting the registered methods (of ``front_end``) declare: name -> (setting, the
    methods that read it). Two methods declaring one name with different settings is an error:
    one config field cannot have two defaults."""
    out: Dict[str, Tuple[MethodSetting, List[str]]] = {}
    for name in available_methods(front_end):
        for key, setting in get_method(name).settings.items():
            if key in out and out[key][0] != setting:
                raise TypeError(f"methods {out[key][1]} and {name!r} declare different settings "
                                f"named {key!r}; share one MethodSetting or rename one")
            out.setdefault(key, (setting, []))[1].append(name)
    return dict(sorted(out.items()))


def settings_fields(front_end: Optional[str] = None) -> List[Tuple[str, Any, Any]]:
    """``dataclasses.make_dataclass`` fields for every method setting of ``front_end``: a config
    (``MunbaArguments``) is assembled from them, with ``HfArgumentParser`` help naming the
    methods that read each one."""
    fields = []
    for key, (setting, users) in method_settings(front_end).items():
        help_text = f"{setting.help} [read by: {', '.join(users)}]"
        fields.append((key, setting.annotation,
                       field(default=setting.default, metadata={"help": help_text})))
    return fields


def validate_settings(config: Any, front_end: Optional[str] = None) -> None:
    """Check every method setting ``config`` holds (all of them, not only the chosen method's:
    a bad value is a mistake whichever method runs); raises one ``ValueError`` naming the field."""
    for key, (setting, _) in method_settings(front_end).items():
        if hasattr(config, key):
            setting.validate(key, getattr(config, key))


_FORGET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_forget_names(names: Optional[Sequence[str]]) -> Tuple[str, ...]:
    """Validate the names of separate forget players (concepts): non-empty, unique, and safe as
    part of a tracker key and a file name. None or () means one pooled forget player."""
    if names is None:
        return ()
    if isinstance(names, str):
        raise ValueError(f"forget names must be a sequence of names, got the string {names!r}")
    names = tuple(names)
    for n in names:
        if not isinstance(n, str) or not _FORGET_NAME.match(n):
            raise ValueError(f"a forget concept name must be letters, digits, '_', '-' or '.', "
                             f"starting with a letter or digit; got {n!r}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"forget concept names must be unique; repeated: {dup}")
    if len(names) == 1:
        raise ValueError("one forget concept is the pooled forget player: give no names, or at "
                         f"least two concepts (got {list(names)})")
    return names


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

    #: the options this method reads: field name -> :class:`MethodSetting` (see the module doc)
    settings: ClassVar[Mapping[str, MethodSetting]] = {}

    def __init__(self, config: Any = None, forget_names: Optional[Sequence[str]] = None):
        self.config = config
        self.forget_names: Tuple[str, ...] = check_forget_names(forget_names)

    def setting(self, name: str):
        """``name`` from the front end's config, or the declared default when it has none."""
        try:
            default = self.settings[name].default
        except KeyError:
            raise KeyError(f"method {self.name!r} declares no setting {name!r}; add it to "
                           f"{type(self).__name__}.settings") from None
        return getattr(self.config, name, default) if self.config is not None else default

    # ---- players and their combination ----------------------------------------------------
    def players(self) -> Tuple[str, ...]:
        """Names of the players, in bargainer order: retain (if used) before the forget players.

        One forget player is named ``forget`` (every forget concept pooled into one loss);
        with ``forget_names`` each concept is its own player, ``forget_<name>``, so no concept
        can dominate the others (the dominance bargaining exists to prevent)."""
        out = ("retain",) if self.uses_retain else ()
        if self.uses_forget:
            out += tuple(f"forget_{n}" for n in self.forget_names) or ("forget",)
        return out

    @property
    def forget_players(self) -> Tuple[int, ...]:
        """Bargainer indices of the forget players (empty when the method uses no D_f)."""
        return tuple(i for i, p in enumerate(self.players()) if p.startswith("forget"))

    @property
    def forget_player(self) -> Optional[int]:
        """The first (with one concept: the only) forget player's index, or None."""
        return self.forget_players[0] if self.forget_players else None

    @property
    def forget_weight(self) -> float:
        """The forget loss's weight in a constant weighting (1 unless the method says otherwise).
        With several forget players each concept's loss gets this weight."""
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
        """Fixed bargaining powers when no forget rule sets them (None: all 1); every forget
        player gets ``bargaining_power_forget``."""
        if not self.bargains or "bargaining_power_forget" not in self.settings:
            return None
        w = self.forget_power()
        if w == 1.0:
            return None
        return [1.0 if p == "retain" else w for p in self.players()]

    def forget_power(self) -> float:
        """``bargaining_power_forget``; None (no front end chose one) is the symmetric game, 1."""
        w = self.setting("bargaining_power_forget")
        return 1.0 if w is None else float(w)

    def forget_rule(self, forget_loss: str) -> Optional[SatisfactionRule]:
        """The satisfied-forget-player rule for ``forget_loss`` (an objective name), or None."""
        if not (self.bargains and self.satisfiable and self.uses_forget):
            return None
        s = self.setting
        return build_forget_rule(
            forget_loss, target=s("forget_target"), mode=s("forget_target_mode"),
            ema=s("forget_target_ema"), hysteresis=s("forget_target_hysteresis"),
            reference_steps=s("forget_target_reference_steps"),
            satisfied_power=s("satisfied_power_forget"), power=self.forget_power())

    def forget_rules(self, forget_loss: str) -> Dict[int, SatisfactionRule]:
        """One independent satisfied-player rule per forget player (bargainer index -> rule):
        a concept that is forgotten yields its share while the others are still bargained for.
        Empty when the method has no rule."""
        if self.forget_rule(forget_loss) is None:
            return {}
        return {i: self.forget_rule(forget_loss) for i in self.forget_players}

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
    settings = {**BARGAINING_SETTINGS, **FORGET_RULE_SETTINGS}


@register_method("munba-paper")
class MunbaPaper(Munba):
    summary = "the paper's plain MUNBa: equal bargaining powers, no satisfied player"
    satisfiable = False
    settings = BARGAINING_SETTINGS

    def powers(self) -> Optional[List[float]]:
        return None


@register_method("weighted")
class Weighted(UnlearningMethod):
    summary = "L_r + lam * L_f, one summed gradient"
    uses_forget = True
    settings = {"forget_weight": FORGET_WEIGHT}

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
