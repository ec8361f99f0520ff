"""When a player is done: the satisfied forget player's rule (its bargaining power over training)."""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch


# Default satisfaction target per forget objective: (target, mode), or None for no target (the
# paper's plain rule). Chosen for what each loss does once forgetting is done:
#   remap / esd (SD): an MSE to a target prediction that falls towards 0 as the concept is
#     remapped: "smoothed loss at a quarter of its first steps' value" is scale-free and, on the
#     digits testbed, reached soon after the forgotten prompt stops producing its class
#     (docs/digits.md has the curves);
#   ga (SD) and neg_ce (classifiers): a negated loss, unbounded below, with no level that means
#     "done" (and negative, so a relative target is meaningless): no default target;
#   random_label (classifiers): cross-entropy against labels redrawn every batch cannot fall
#     below ~log(C - 1) however well the class is forgotten, so a fraction of its first value is
#     either unreachable or arbitrary: no default target (set an absolute one, e.g. log C).
DEFAULT_FORGET_TARGETS: Dict[str, Optional[Tuple[float, str]]] = {
    "remap": (0.25, "relative"),
    "esd": (0.25, "relative"),
    "ga": None,
    "neg_ce": None,
    "random_label": None,
}


def default_forget_target(objective: str) -> Optional[Tuple[float, str]]:
    """``(target, mode)`` the front ends use for ``objective`` when none is given, or None."""
    if objective not in DEFAULT_FORGET_TARGETS:
        raise ValueError(f"no default forget target for objective {objective!r}; known: "
                         f"{sorted(DEFAULT_FORGET_TARGETS)}")
    return DEFAULT_FORGET_TARGETS[objective]


# The front ends' power for a satisfied forget player. Not 0 (leaving): on the digits testbed a
# forget player that left regressed (forget "seven", LoRA: 0% -> 30% forget accuracy by the end,
# its loss still inside the hysteresis band). Not 0.01 either (the default until 2026-12-03):
# with cos(g_r, g_f) < 0 and w_f -> 0 the step tends to the retain direction with the forget
# player held at zero first-order gain (t -> |c|), and the remap loss is only a proxy: it stayed
# below its target while images of the forgotten digit came back ("two", "five", "seven", LoRA).
# 0.1 keeps a small forgetting pressure (the forget player's gain a_f (G a)_f = 0.1 instead of
# 0.01): over four digits, two seed sets and ten or thirty images per prompt it left the first
# points unchanged, ended at or below 0.01's forget accuracy in every case and forgot "two" in
# every full-weight seed, at 0.2-1.2 points of the full-weight best point (docs/digits.md).
DEFAULT_SATISFIED_POWER = 0.1

# Objectives whose loss is negated (unbounded below, negative): a relative target is meaningless.
NEGATED_OBJECTIVES = ("ga", "neg_ce")


def build_forget_rule(objective: str, *, target: Optional[float] = None,
                      mode: Optional[str] = None, ema: float = 0.9, hysteresis: float = 1.5,
                      reference_steps: int = 1,
                      satisfied_power: float = DEFAULT_SATISFIED_POWER,
                      power: float = 1.0) -> Optional["SatisfactionRule"]:
    """The forget player's :class:`SatisfactionRule` as both front ends configure it, or None.

    ``target``/``mode`` None take the objective's default (:data:`DEFAULT_FORGET_TARGETS`); an
    objective without a default gets no rule unless a target is given. A relative target on a
    negated loss (``ga``, ``neg_ce``) is refused with one clear error.
    """
    default = default_forget_target(objective)
    if target is None:
        if default is None:
            return None
        target = default[0]
        mode = mode or default[1]
    mode = mode or (default[1] if default is not None else "absolute")
    if mode == "relative" and objective in NEGATED_OBJECTIVES:
        raise ValueError(f"a relative forget target needs a positive loss, but the {objective!r} "
                         "forget loss is negated (unbounded below); give an absolute target "
                         "(mode 'absolute') or none")
    return SatisfactionRule(target, mode=mode, ema=ema, hysteresis=hysteresis,
                            reference_steps=reference_steps, satisfied_power=satisfied_power,
                            power=power)


class SatisfactionRule:
    """When is a player done? An EMA of its loss against a target, with hysteresis.

    Call :meth:`update` once per optimizer step with the step's loss (averaged over the
    micro-batches of gradient accumulation, and over ranks: pass ``all_reduce=True`` under DDP,
    or a value the caller already reduced), *before* bargaining; it returns the player's power
    for that step:

      * EMA: m_1 = L_1, m_n = ema * m_{n-1} + (1 - ema) * L_n (default ema 0.9);
      * target T: ``target`` itself (``mode='absolute'``) or ``target`` times the reference,
        the mean loss of the first ``reference_steps`` steps (``mode='relative'``, default: a
        quarter of the first value; scale-free like MUNBa: any positive scale on the loss
        cancels). Until the reference is known the player is never satisfied;
      * satisfied when m_n <= T; satisfied players get ``satisfied_power`` (default 0: the
        player leaves the game and the step follows the others alone); it comes back when
        m_n > ``hysteresis`` * T (default 1.5). The band between T and hysteresis * T, plus the
        EMA's smoothing, keeps the decision from flipping step to step;
      * before the target is first reached the power is ``power`` (default 1), so nothing
        changes until then; non-finite losses (skipped steps) leave the state untouched.

    Every rank must take the same decision: with DDP the loss is reduced over ranks before the
    EMA (identical float on every rank, so identical decisions). Under gradient accumulation the
    rule decides once per optimizer step, on the micro-batch mean. The state is plain floats
    (:meth:`state_dict` / :meth:`load_state_dict`, JSON-safe and exact) for checkpoints.
    ``mode='relative'`` needs a positive reference: if the first losses are <= 0 (a negated
    loss) the rule is inert (never satisfied) and ``inert`` says so.
    """

    MODES = ("relative", "absolute")

    def __init__(self, target: float = 0.25, *, mode: str = "relative", ema: float = 0.9,
                 hysteresis: float = 1.5, reference_steps: int = 1,
                 satisfied_power: float = 0.0, power: float = 1.0):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if not math.isfinite(target) or (mode == "relative" and target <= 0):
            raise ValueError(f"a relative target must be a positive finite fraction, got {target}")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        if not (math.isfinite(hysteresis) and hysteresis >= 1.0):
            raise ValueError(f"hysteresis must be a finite factor >= 1, got {hysteresis}")
        if reference_steps < 1:
            raise ValueError(f"reference_steps must be >= 1, got {reference_steps}")
        if not (math.isfinite(satisfied_power) and satisfied_power >= 0.0):
            raise ValueError(f"satisfied_power must be finite and >= 0, got {satisfied_power}")
        if not (math.isfinite(power) and power > 0.0):
            raise ValueError(f"power must be finite and > 0, got {power}")
        if satisfied_power >= power:
            raise ValueError(f"satisfied_power ({satisfied_power}) must be below power ({power})")
        self.target, self.mode, self.ema = float(target), mode, float(ema)
        self.hysteresis, self.reference_steps = float(hysteresis), int(reference_steps)
        self.satisfied_power, self.base_power = float(satisfied_power), float(power)
        self.steps = 0  # finite losses seen
        self.ema_value: Optional[float] = None
        self.reference: Optional[float] = None
        self._reference_sum = 0.0
        self.satisfied = False
        self.times_satisfied = 0  # how often the player left (or was lowered)
        self.last_change_step: Optional[int] = None

    def __repr__(self) -> str:
        return (f"SatisfactionRule(target={self.target}, mode={self.mode!r}, ema={self.ema}, "
                f"hysteresis={self.hysteresis}, reference_steps={self.reference_steps}, "
                f"satisfied_power={self.satisfied_power}, power={self.base_power})")

    @property
    def threshold(self) -> Optional[float]:
        """The target value T of the EMA (None until a relative reference is known)."""
        if self.mode == "absolute":
            return self.target
        if self.reference is None or self.reference <= 0:
            return None
        return self.target * self.reference

    @property
    def inert(self) -> bool:
        """True when a relative rule met a non-positive reference and can never fire."""
        return self.mode == "relative" and self.reference is not None and self.reference <= 0

    @property
    def power(self) -> float:
        return self.satisfied_power if self.satisfied else self.base_power

    def update(self, loss, *, all_reduce: bool = False, process_group=None) -> float:
        """Feed this optimizer step's loss; returns the power for this step.

        ``loss``: a float or a scalar tensor. ``all_reduce=True`` averages it over the ranks of
        ``process_group`` first (a no-op without an initialised process group), so every rank
        sees the same number; the tensor stays on its device (NCCL needs CUDA tensors).
        """
        if isinstance(loss, torch.Tensor):
            t = loss.detach().reshape(()).float()
            if all_reduce and torch.distributed.is_available() and torch.distributed.is_initialized():
                t = t.clone()
                torch.distributed.all_reduce(t, group=process_group)
                t = t / torch.distributed.get_world_size(process_group)
            value = float(t)
        else:
            value = float(loss)
            if all_reduce and torch.distributed.is_available() and torch.distributed.is_initialized():
                return self.update(torch.tensor(value), all_reduce=True, process_group=process_group)
        if not math.isfinite(value):
            return self.power
        self.steps += 1
        self.ema_value = value if self.ema_value is None else (
            self.ema * self.ema_value + (1.0 - self.ema) * value)
        if self.mode == "relative" and self.reference is None:
            self._reference_sum += value
            if self.steps >= self.reference_steps:
                self.reference = self._reference_sum / self.reference_steps
        threshold = self.threshold
        if threshold is not None:
            if not self.satisfied and self.ema_value <= threshold:
                self.satisfied = True
                self.times_satisfied += 1
                self.last_change_step = self.steps
            elif self.satisfied and self.ema_value > self.hysteresis * threshold:
                self.satisfied = False
                self.last_change_step = self.steps
        return self.power

    def log_dict(self, name: str = "forget", prefix: str = "munba/") -> Dict[str, float]:
        """What trackers and history.jsonl record each step."""
        out = {f"{prefix}{name}_satisfied": float(self.satisfied),
               f"{prefix}{name}_times_satisfied": float(self.times_satisfied)}
        if self.ema_value is not None:
            out[f"{prefix}{name}_loss_ema"] = self.ema_value
        if self.threshold is not None:
            out[f"{prefix}{name}_target"] = self.threshold
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {"steps": self.steps, "ema_value": self.ema_value, "reference": self.reference,
                "reference_sum": self._reference_sum, "satisfied": self.satisfied,
                "times_satisfied": self.times_satisfied,
                "last_change_step": self.last_change_step,
                "config": {"target": self.target, "mode": self.mode, "ema": self.ema,
                           "hysteresis": self.hysteresis, "reference_steps": self.reference_steps,
                           "satisfied_power": self.satisfied_power, "power": self.base_power}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        cfg = state.get("config")
        mine = self.state_dict()["config"]
        if cfg is not None and cfg != mine:
            raise ValueError(f"the checkpoint's satisfaction rule {cfg} differs from this run's "
                             f"{mine}; resume with the same settings")
        self.steps = int(state["steps"])
        self.ema_value = None if state["ema_value"] is None else float(state["ema_value"])
        self.reference = None if state["reference"] is None else float(state["reference"])
        self._reference_sum = float(state["reference_sum"])
        self.satisfied = bool(state["satisfied"])
        self.times_satisfied = int(state["times_satisfied"])
        lc = state.get("last_change_step")
        self.last_change_step = None if lc is None else int(lc)


