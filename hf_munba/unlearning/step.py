"""The optimizer step every front end shares: player gradients -> combine -> clip -> guard -> step.

:func:`unlearning_step` is the one function the SD training loop, :class:`MunbaTrainer` and the
step-cost benchmark call once per optimizer step, after each player's backward passes went into
its ``bargainer.player(i)`` block. It decides the players' bargaining powers (the satisfied forget
player), combines the gradients, clips, and steps or skips. A skipped step leaves weights,
optimizer state and the learning-rate schedule bitwise untouched (:func:`guarded_step`), and a run
that only skips stops with one clear error (:class:`SkippedStepGuard`). Every rank must reach
the same decision, so it is taken on values that are equal on every rank: losses averaged over
ranks (``reduce``) and gradients that DDP already averaged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = ["unlearning_step", "StepResult", "guarded_step", "SkippedStepGuard",
           "TooManySkippedSteps"]


@dataclass
class StepResult:
    """What one optimizer step did: ready for ``accelerator.log`` / ``history.jsonl``."""

    stepped: bool
    nonfinite: bool
    grad_norm: float  # NaN when no clipping ran (a skipped step, or no ``clip``)
    losses: List[float]  # per player, as averaged for the decision
    logs: Dict[str, float] = field(default_factory=dict)
    stats: Optional[object] = None  # the bargainer's BargainStats

    @property
    def skipped(self) -> bool:
        return not self.stepped


def _grads_finite(params) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())


def _name(player_names: Sequence[str], i: int) -> str:
    return player_names[i] if i < len(player_names) else str(i)


def unlearning_step(bargainer, optimizer, *, losses: torch.Tensor | Sequence[float],
                    lr_scheduler=None, clip: Optional[Callable[[], object]] = None, scaler=None,
                    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                    forget_rule=None, forget_player: int = 1,
                    forget_rules: Optional[Mapping[int, object]] = None,
                    powers: Optional[Sequence[float]] = None,
                    edit_gradients: Optional[Callable[[List[torch.nn.Parameter]], None]] = None,
                    guard: Optional["SkippedStepGuard"] = None, step: Optional[int] = None,
                    zero_grad: bool = True,
                    player_names: Sequence[str] = ("retain", "forget")) -> StepResult:
    """One optimizer step of unlearning, after every player's backward passes of the step.

    ``bargainer``: a :class:`~hf_munba.bargaining.NashBargainer` (any weighting: Nash, or the
    weighted sum's :class:`~hf_munba.bargaining.ConstantWeighting`), or None when autograd
    already summed the gradients into ``.grad``.
    ``losses``: each player's loss for this step (mean over micro-batches; a tensor stays on the
    device until the one host copy here). ``reduce`` averages it over ranks first (e.g.
    ``lambda t: accelerator.reduce(t, "mean")``), so every rank takes the same decision.
    ``forget_rule``: a :class:`~hf_munba.bargaining.SatisfactionRule` updated with the forget
    player's loss; its power replaces ``powers[forget_player]`` (``powers`` default: all 1).
    ``forget_rules``: several forget players (one per concept), each with its own rule
    (bargainer index -> rule); each concept is satisfied, and yields, on its own loss. Give
    either ``forget_rule`` or ``forget_rules``.
    ``clip``: returns the pre-clip gradient norm (``accelerator.clip_grad_norm_``); a non-finite
    norm skips the step. ``edit_gradients(params)``: a method's last change to the combined
    gradient (e.g. SalUn's mask), before clipping. ``guard``: counts skips and raises
    :class:`TooManySkippedSteps` after too many in a row. ``zero_grad``: clear ``.grad`` (set to
    None) after the step; a skipped step always leaves no gradient behind.

    The order is fixed: decide powers -> combine -> finiteness -> edit -> clip -> step (or skip)
    -> scheduler -> zero_grad -> guard.
    """
    t = torch.as_tensor(losses, dtype=torch.float32) if not isinstance(losses, torch.Tensor) \
        else losses.detach().float()
    if reduce is not None:
        t = reduce(t)
    values = [float(v) for v in t.tolist()]  # the step's host sync for the losses
    nonfinite = not all(math.isfinite(v) for v in values)
    logs: Dict[str, float] = {f"loss/{_name(player_names, i)}": v for i, v in enumerate(values)}
    stats = None
    params = list(bargainer.params) if bargainer is not None else [
        p for group in optimizer.param_groups for p in group["params"]]
    if bargainer is not None:
        rules = dict(forget_rules or {})
        if forget_rule is not None:
            if rules:
                raise ValueError("give forget_rule (one forget player) or forget_rules, not both")
            rules = {forget_player: forget_rule}
        if rules:
            powers = list(powers) if powers is not None else [1.0] * bargainer.num_players
            for i, rule in sorted(rules.items()):
                powers[i] = rule.update(values[i])
                logs.update(rule.log_dict(
                    name="forget" if forget_rule is not None else _name(player_names, i)))
        from ..bargaining.solver import BargainingStatus

        stats = bargainer.combine(grad_scale=scaler.get_scale() if scaler is not None
                                  and scaler.is_enabled() else None, powers=powers)
        if not bargainer.direct:
            logs.update(stats.to_log_dict(names=player_names))
        nonfinite = nonfinite or stats.status is BargainingStatus.NONFINITE
        skip = stats.skipped or nonfinite
    else:
        skip = nonfinite
    if not skip and clip is None and (bargainer is None or bargainer.direct):
        # nothing else looks at the summed gradient: a NaN there must not reach the weights
        skip = nonfinite = not _grads_finite(params)
    if not skip and edit_gradients is not None:
        edit_gradients(params)
    stepped, norm = guarded_step(optimizer, lr_scheduler, skip=skip, nonfinite=nonfinite,
                                 clip=clip, scaler=scaler)
    nonfinite = nonfinite or (not stepped and clip is not None and not math.isfinite(norm)
                              and not skip)
    if stepped:
        logs["grad_norm"] = norm
    if zero_grad or not stepped:
        optimizer.zero_grad(set_to_none=True)
        for p in params:  # parameters the optimizer does not hold (e.g. a bargainer's subset)
            p.grad = None
    logs["step_skipped"] = float(not stepped)
    if guard is not None:
        logs["skipped_steps"] = float(guard.total + int(not stepped))
        guard.record(not stepped, step)
    return StepResult(stepped, nonfinite, norm, values, logs, stats)


def guarded_step(optimizer, lr_scheduler=None, *, skip: bool = False, nonfinite: bool = False,
                 clip: Optional[Callable[[], object]] = None, scaler=None) -> Tuple[bool, float]:
    """One optimizer step, or a skipped one that changes nothing; returns (stepped, grad_norm).

    A skipped step leaves the weights, the optimizer state (Adam's ``exp_avg``, ``exp_avg_sq``,
    ``step``) and the learning-rate schedule exactly as they were: ``optimizer.step()`` is never
    called for it, because even with zero gradients AdamW moves the weights by its momentum and
    weight decay. The step is skipped when the caller says so (``skip``: the bargainer skipped,
    or the losses are not finite) or when the clipped norm (``clip()``, which unscales under a
    GradScaler) is not finite. The scheduler steps only with the optimizer.

    ``scaler`` (a ``torch.amp.GradScaler``, e.g. ``accelerator.scaler``): on a non-finite skip
    (``nonfinite`` or a non-finite norm) its scale backs off as ``GradScaler.update`` would do
    after an overflow, so fp16 training recovers; a skip for another reason leaves it alone.
    The decision never depends on the scaler's own inf check, so it is the same with and
    without one. ``grad_norm`` is NaN when ``clip`` was not called.
    """
    norm = float("nan")
    if not skip and clip is not None:
        value = clip()
        norm = float(value) if value is not None else float("nan")
        if value is not None and not math.isfinite(norm):
            skip = nonfinite = True
    if skip:
        if scaler is not None and nonfinite and scaler.is_enabled():
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())  # also clears unscale_
            tracker = getattr(scaler, "_growth_tracker", None)
            if tracker is not None:
                tracker.fill_(0)
        return False, norm
    optimizer.step()
    if lr_scheduler is not None:
        lr_scheduler.step()
    return True, norm


class TooManySkippedSteps(RuntimeError):
    """Raised when ``max_consecutive`` optimizer steps in a row had non-finite gradients."""


class SkippedStepGuard:
    """Counts optimizer steps skipped for non-finite losses/gradients; stops a run that diverged.

    A single NaN (a bad batch, an fp16 overflow) costs one step; ``max_consecutive`` skips in a
    row mean the weights or the learning rate are broken and continuing only burns compute.
    """

    def __init__(self, max_consecutive: int = 10):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.total = 0
        self.consecutive = 0

    def record(self, skipped: bool, step: Optional[int] = None) -> None:
        if not skipped:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            where = f" (at step {step})" if step is not None else ""
            raise TooManySkippedSteps(
                f"{self.consecutive} consecutive optimizer steps had non-finite losses or "
                f"gradients{where}; stopping. Lower the learning rate, use bf16 instead of fp16, "
                "or check the data; raise --max_consecutive_skips to tolerate more.")

    def state_dict(self) -> Dict[str, int]:
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.total, self.consecutive = int(state["total"]), int(state["consecutive"])
