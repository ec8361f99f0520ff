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

__all__ = ["AccuracyCurveCallback", "ForgetCriterion", "first_and_best", "mean_std",
           "aggregate_curves", "aggregate_first_best", "best_at_forgetting", "select_run",
           "draw_tradeoff", "save_figure", "plot_tradeoff_curves"]


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


def mean_std(vals: Sequence[float]) -> Dict[str, float]:
    """``{mean, std, n}`` over the finite values (std with ddof=1: the spread between seeds; 0 for
    one value); NaN mean and std with ``n=0`` when there is none. None and NaN are skipped, so a
    seed that never reached a criterion does not count as a zero."""
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
        out.append({"step": step, **{k: mean_std([p[k] for p in pts if k in p]) for k in keys}})
    return out


def aggregate_first_best(per_seed: Sequence[Mapping[str, object]]) -> Dict[str, object]:
    """Mean ± std over the seeds that reached the criterion, and how many did."""
    reached = [r for r in per_seed if r["reached"]]
    return {"reached": len(reached), "seeds": len(per_seed),
            "first": mean_std([r["first"] for r in reached]),
            "first_step": mean_std([r["first_step"] for r in reached]),
            "best": mean_std([r["best"] for r in reached]),
            "best_step": mean_std([r["best_step"] for r in reached])}


def best_at_forgetting(candidates: Mapping[object, Mapping[str, object]], which: str = "best"
                       ) -> Optional[object]:
    """The candidate with the highest mean ``which`` (``"first"`` or ``"best"``) among those that
    met the criterion on every seed; None when none did.

    ``candidates`` maps a name (e.g. ``weighted-0.3``) to its :func:`aggregate_first_best`
    result. A candidate that missed the criterion on one seed is out: its mean is over the lucky
    seeds only. Ties go to the first in ``candidates``' order.
    """
    ok = [name for name, c in candidates.items()
          if c["seeds"] and c["reached"] == c["seeds"] and math.isfinite(c[which]["mean"])]
    if not ok:
        return None
    return max(ok, key=lambda name: (candidates[name][which]["mean"], -ok.index(name)))


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


def _mean(point: Mapping, key: str) -> float:
    value = point[key]
    return value["mean"] if isinstance(value, Mapping) else value


def _style(name: str) -> Dict[str, object]:
    """munba bold and solid, the weighted sum dashed, everything else dotted."""
    if name.startswith("munba"):
        return {"ls": "-", "lw": 2.2}
    return {"ls": "--" if name.startswith("weighted") else ":", "lw": 1.3}


def draw_tradeoff(ax, curves: Mapping[str, Sequence[Mapping[str, object]]], x_key: str, y_key: str,
                  *, band: Optional[Sequence[float]] = None,
                  references: Optional[Mapping[str, Mapping[str, float]]] = None,
                  band_axis: str = "x", label_end_step: bool = False) -> None:
    """One panel: ``y_key`` against ``x_key`` for every curve (start to end, o = end).

    Points are plain numbers or :func:`mean_std` cells (their mean is drawn). ``band`` = (low,
    high) of the forget criterion, shaded across ``band_axis``; ``references`` are single points
    (e.g. retrain, original) drawn as stars; ``label_end_step`` writes the last step next to the
    end marker. Every trade-off figure is made of these panels, so they read the same everywhere.
    """
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")  # distinct hues; line styles separate families
    for i, (name, pts) in enumerate(curves.items()):
        color = cmap(i % 10)
        xs = [_mean(p, x_key) for p in pts]
        ys = [_mean(p, y_key) for p in pts]
        ax.plot(xs, ys, color=color, marker=".", ms=4, label=name, **_style(name))
        ax.plot(xs[-1:], ys[-1:], "o", color=color, ms=6)
        if label_end_step:
            ax.annotate(str(pts[-1]["step"]), (xs[-1], ys[-1]), fontsize=7)
    for name, ref in (references or {}).items():
        if x_key in ref and y_key in ref:
            ax.plot([ref[x_key]], [ref[y_key]], "*", ms=14, zorder=5, label=name,
                    color="k" if name in ("retrain", "original") else "grey")
    if band is not None:
        (ax.axvspan if band_axis == "x" else ax.axhspan)(*band, color="green", alpha=0.12)
    ax.grid(alpha=0.3)


def save_figure(fig, path) -> str:
    """Save ``fig`` as a PNG atomically (temp file, rename) and close it."""
    import os

    import matplotlib.pyplot as plt

    path = str(path)
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp")
    fig.savefig(tmp, format="png", dpi=fig.dpi)
    plt.close(fig)
    os.replace(tmp, path)
    return path


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

    fig, grid = plt.subplots(2, 2, figsize=(13, 10), dpi=80)
    axes = grid.flat
    draw_tradeoff(axes[0], curves, "acc_forget", "acc_test", band=criterion_band,
                  references=references)
    draw_tradeoff(axes[1], curves, "acc_forget", "acc_retain", band=criterion_band,
                  references=references)
    draw_tradeoff(axes[2], curves, "step", "acc_forget", band=criterion_band, band_axis="y")
    draw_tradeoff(axes[3], curves, "step", "acc_test")
    if references and "retrain" in references:
        axes[3].axhline(references["retrain"]["acc_test"], color="k", lw=0.8, ls="-.",
                        label="retrain")
    labels = (("Acc(D_f) %  (start -> end, o = end)", "Acc(D_t) %"), ("Acc(D_f) %", "Acc(D_r) %"),
              ("optimizer step", "Acc(D_f) %"), ("optimizer step", "Acc(D_t) %"))
    for ax, (xlabel, ylabel) in zip(axes, labels):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    axes[1].legend(fontsize=7, ncol=2)
    if title:
        fig.suptitle(title + "  (green: forget criterion; lines: mean over seeds)")
    fig.tight_layout()
    return save_figure(fig, path)
