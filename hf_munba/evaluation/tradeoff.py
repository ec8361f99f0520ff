"""Forget/retain trade-off curves for classifier unlearning: record, summarise, compare, plot.

One end-of-run number hides *when* a method forgot and what that cost; two methods are only
comparable at equal forgetting. This module records accuracy on D_f, D_r and D_t every N
optimizer steps through a ``transformers.TrainerCallback`` (no copy of the training loop), and
reduces a curve to two numbers at a stated forget criterion:

* **first** — the test accuracy at the first evaluation that meets the criterion (what a user
  who stops as soon as the model has forgotten gets);
* **best** — the highest test accuracy over all evaluations that meet it (an oracle stopping
  point; an upper bound on what the method can offer at that level of forgetting).

The starting model (step 0) is drawn as the curve's origin but never counts as meeting the
criterion: an unlearning method must have taken a step. Criteria:

* ``ForgetCriterion.at_most(5.0)`` — class-wise forgetting: Acc(D_f) <= 5 %.
* ``ForgetCriterion.match(retrain_acc, 2.0)`` — random-sample forgetting, where a model that
  never saw D_f still classifies most of it correctly (the forgotten samples are ordinary
  digits): "equal forgetting" is |Acc(D_f) - Acc_retrain(D_f)| <= 2 points, retrain being the
  model trained from scratch on D_r with the same seed.

Evaluation runs under ``torch.no_grad`` in eval mode and draws no random numbers, so a run with
the callback ends with exactly the weights of a run without it (tested).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from transformers import TrainerCallback

__all__ = ["AccuracyCurveCallback", "ForgetCriterion", "first_and_best", "aggregate_curves",
           "aggregate_first_best", "select_run", "plot_tradeoff_curves"]


@torch.no_grad()
def _accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(y), batch_size):
        out = model(pixel_values=x[start:start + batch_size].to(device))
        logits = out.logits if hasattr(out, "logits") else out[0]
        correct += int((logits.argmax(-1).cpu() == y[start:start + batch_size]).sum())
    return 100.0 * correct / len(y) if len(y) else float("nan")


class AccuracyCurveCallback(TrainerCallback):
    """Accuracy on named datasets every ``eval_every`` optimizer steps, at step 0 and at the end.

    ``datasets`` maps a name (e.g. ``"forget"``, ``"retain"``, ``"test"``) to a map-style dataset
    of ``{"pixel_values", "labels"}`` rows; they are stacked once into tensors, so an evaluation
    costs only forward passes. ``points`` is a list of ``{"step", "epoch", "acc_<name>"...}`` in
    step order; ``eval_seconds`` is the time spent evaluating (subtract it from a run-time).
    """

    def __init__(self, datasets: Mapping[str, object], eval_every: int = 3, batch_size: int = 512):
        if eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {eval_every}")
        self.eval_every = int(eval_every)
        self.batch_size = int(batch_size)
        self._data = {}
        for name, ds in datasets.items():
            rows = [ds[i] for i in range(len(ds))]
            x = torch.stack([torch.as_tensor(r["pixel_values"]) for r in rows]) if rows else torch.zeros(0)
            y = torch.as_tensor([int(r["labels"]) for r in rows], dtype=torch.long)
            self._data[name] = (x, y)
        self.points: List[Dict[str, float]] = []
        self.eval_seconds = 0.0

    def evaluate(self, model, step: int, epoch: float) -> Dict[str, float]:
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        point = {"step": int(step), "epoch": float(epoch or 0.0)}
        for name, (x, y) in self._data.items():
            point[f"acc_{name}"] = _accuracy(model, x, y, self.batch_size)
        model.train(was_training)
        if self.points and self.points[-1]["step"] == point["step"]:
            self.points[-1] = point
        else:
            self.points.append(point)
        self.eval_seconds += time.perf_counter() - t0
        return point

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.points, self.eval_seconds = [], 0.0
        self.evaluate(model, state.global_step, state.epoch)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.eval_every == 0 or state.global_step >= state.max_steps:
            self.evaluate(model, state.global_step, state.epoch)


@dataclass(frozen=True)
class ForgetCriterion:
    """When a model counts as having forgotten: Acc(D_f) <= ``threshold`` (``kind="at_most"``) or
    |Acc(D_f) - ``target``| <= ``tolerance`` (``kind="match"``). Percent."""

    kind: str
    threshold: float = float("nan")
    target: float = float("nan")
    tolerance: float = float("nan")

    def __post_init__(self):
        if self.kind == "at_most":
            if not math.isfinite(self.threshold):
                raise ValueError("ForgetCriterion 'at_most' needs a finite threshold")
        elif self.kind == "match":
            if not (math.isfinite(self.target) and math.isfinite(self.tolerance) and self.tolerance >= 0):
                raise ValueError("ForgetCriterion 'match' needs a finite target and a tolerance >= 0")
        else:
            raise ValueError(f"unknown ForgetCriterion kind {self.kind!r} (at_most, match)")

    @classmethod
    def at_most(cls, threshold: float) -> "ForgetCriterion":
        return cls("at_most", threshold=float(threshold))

    @classmethod
    def match(cls, target: float, tolerance: float) -> "ForgetCriterion":
        return cls("match", target=float(target), tolerance=float(tolerance))

    def met(self, acc_forget: float) -> bool:
        if not math.isfinite(acc_forget):
            return False
        if self.kind == "at_most":
            return acc_forget <= self.threshold + 1e-9
        return abs(acc_forget - self.target) <= self.tolerance + 1e-9

    def describe(self) -> str:
        if self.kind == "at_most":
            return f"Acc(D_f) <= {self.threshold:g}%"
        return f"|Acc(D_f) - {self.target:.2f}| <= {self.tolerance:g} points"

    def to_dict(self) -> Dict[str, float]:
        return {k: v for k, v in asdict(self).items() if not (isinstance(v, float) and math.isnan(v))}


def first_and_best(points: Sequence[Mapping[str, float]], criterion: ForgetCriterion,
                   key: str = "acc_test", forget_key: str = "acc_forget") -> Dict[str, object]:
    """``key`` at the first point meeting ``criterion`` (after step 0) and its best over such points.

    Returns ``{"reached", "first", "first_step", "best", "best_step", "first_point",
    "best_point"}``; the numbers are NaN and the steps None when no point meets the criterion.
    Points must be in increasing step order (raises otherwise).
    """
    steps = [p["step"] for p in points]
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"curve points must have strictly increasing steps, got {steps}")
    ok = [p for p in points if p["step"] > 0 and criterion.met(p[forget_key])]
    if not ok:
        return {"reached": False, "first": float("nan"), "first_step": None, "best": float("nan"),
                "best_step": None, "first_point": None, "best_point": None}
    best = max(ok, key=lambda p: (p[key], -p["step"]))  # ties: the earlier point
    return {"reached": True, "first": float(ok[0][key]), "first_step": int(ok[0]["step"]),
            "best": float(best[key]), "best_step": int(best["step"]),
            "first_point": dict(ok[0]), "best_point": dict(best)}


def _stat(vals: Sequence[float]) -> Dict[str, float]:
    v = np.asarray([x for x in vals if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def aggregate_curves(curves: Sequence[Sequence[Mapping[str, float]]]) -> List[Dict[str, object]]:
    """Point-wise mean ± std over seeds, aligned on ``step`` (steps missing in a seed are skipped
    for that seed; ``n`` says how many seeds a point averages)."""
    by_step: Dict[int, List[Mapping[str, float]]] = {}
    for curve in curves:
        for p in curve:
            by_step.setdefault(int(p["step"]), []).append(p)
    out = []
    for step in sorted(by_step):
        pts = by_step[step]
        keys = sorted({k for p in pts for k in p if k != "step"})
        out.append({"step": step, **{k: _stat([p[k] for p in pts if k in p]) for k in keys}})
    return out


def aggregate_first_best(per_seed: Sequence[Mapping[str, object]]) -> Dict[str, object]:
    """Mean ± std over the seeds that reached the criterion, and how many did."""
    reached = [r for r in per_seed if r["reached"]]
    return {"reached": len(reached), "seeds": len(per_seed),
            "first": _stat([r["first"] for r in reached]),
            "first_step": _stat([r["first_step"] for r in reached]),
            "best": _stat([r["best"] for r in reached]),
            "best_step": _stat([r["best_step"] for r in reached])}


def select_run(candidates: Mapping[object, Mapping[str, object]],
               end_forget_distance: Mapping[object, float]) -> object:
    """The rule stated in advance for a hyper-parameter search at equal forgetting.

    ``candidates`` maps a value (e.g. a learning rate) to its :func:`first_and_best` result.
    Among values whose run reached the criterion: highest ``best``, then highest ``first``, then
    the earliest first step. If none reached it: the smallest ``end_forget_distance`` (how far
    the end-of-run Acc(D_f) is from meeting the criterion), i.e. the value that came closest.
    Remaining ties go to the first value in ``candidates``' order.
    """
    order = list(candidates)
    if not order:
        raise ValueError("select_run needs at least one candidate")
    reached = [v for v in order if candidates[v]["reached"]]
    if reached:
        return max(reached, key=lambda v: (candidates[v]["best"], candidates[v]["first"],
                                           -candidates[v]["first_step"], -order.index(v)))
    return min(order, key=lambda v: (end_forget_distance[v], order.index(v)))


def plot_tradeoff_curves(curves: Mapping[str, Sequence[Mapping[str, object]]], path: str,
                         title: str = "", criterion_band: Optional[Sequence[float]] = None,
                         references: Optional[Mapping[str, Mapping[str, float]]] = None) -> str:
    """A PNG with Acc(D_t) and Acc(D_r) against Acc(D_f), one line per method (seed means from
    :func:`aggregate_curves`, start to end), and Acc(D_f) and Acc(D_t) over optimizer steps.
    ``criterion_band`` = (low, high) Acc(D_f) shaded as "forgotten"; ``references`` are single
    points (e.g. retrain, original) drawn as stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 2, figsize=(13, 10))
    axes = grid.flat
    cmap = plt.get_cmap("tab10")  # distinct hues; line styles separate families
    mean = lambda p, k: p[k]["mean"] if isinstance(p[k], Mapping) else p[k]  # noqa: E731
    for i, (name, pts) in enumerate(curves.items()):
        color = cmap(i % 10)
        style = "-" if name.startswith("munba") else ("--" if name.startswith("weighted") else ":")
        width = 2.2 if name.startswith("munba") else 1.3
        xf = [mean(p, "acc_forget") for p in pts]
        steps = [p["step"] for p in pts]
        for ax, key in ((axes[0], "acc_test"), (axes[1], "acc_retain")):
            ax.plot(xf, [mean(p, key) for p in pts], style, color=color, lw=width, marker=".",
                    ms=4, label=name)
            ax.plot(xf[-1:], [mean(pts[-1], key)], "o", color=color, ms=6)
        axes[2].plot(steps, xf, style, color=color, lw=width, label=name)
        axes[3].plot(steps, [mean(p, "acc_test") for p in pts], style, color=color, lw=width, label=name)
    for name, ref in (references or {}).items():
        for ax, key in ((axes[0], "acc_test"), (axes[1], "acc_retain")):
            ax.plot([ref["acc_forget"]], [ref[key]], "*", ms=14, color="k" if name == "retrain" else "grey",
                    label=name, zorder=5)
        if name == "retrain":
            axes[3].axhline(ref["acc_test"], color="k", lw=0.8, ls="-.", label="retrain")
    labels = (("Acc(D_f) %  (start -> end, o = end)", "Acc(D_t) %"), ("Acc(D_f) %", "Acc(D_r) %"),
              ("optimizer step", "Acc(D_f) %"), ("optimizer step", "Acc(D_t) %"))
    for j, (ax, (xlabel, ylabel)) in enumerate(zip(axes, labels)):
        if criterion_band is not None and j < 3:
            (ax.axhspan if j == 2 else ax.axvspan)(*criterion_band, color="green", alpha=0.12)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    if title:
        fig.suptitle(title + "  (green: forget criterion; lines: mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
