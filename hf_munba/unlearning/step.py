"""The optimizer step every front end shares: clip, skip guard, step.

A skipped step must leave weights, optimizer state and the learning-rate schedule bitwise
untouched, and a run that only skips must stop with one clear error. Both rules live here once.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

__all__ = ["guarded_step", "SkippedStepGuard", "TooManySkippedSteps"]


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
