"""The paper's classification metrics: Acc on D_f / D_r / D_t, MIA-efficacy, Avg. Gap, run-time.

MIA-efficacy (SalUn / "Model sparsity can simplify machine unlearning" protocol): an SVC learns
to tell members from non-members by one feature, the model's confidence in the true class,
trained on retain samples (members, label 1) against test samples (non-members, label 0) in
equal numbers; efficacy is the share of D_f it calls non-member. Higher = the forget samples
look like data the model never saw. Avg. Gap is the mean absolute difference to the model
retrained from scratch over (Acc D_f, Acc D_r, Acc D_t, MIA); lower = closer to the gold
reference. All numbers are percentages.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import torch

from .results import deprecated_alias, markdown_table
from .results import write_results as _write_results

__all__ = ["METRIC_KEYS", "predict_confidences", "mia_efficacy", "avg_gap", "evaluate_unlearning",
           "evaluate_models",
           "aggregate_runs", "classification_markdown", "plot_classification_results",
           "write_classification_results", "results_markdown", "write_results"]

METRIC_KEYS = ("acc_forget", "acc_retain", "acc_test", "mia_efficacy")
METRIC_NAMES = {"acc_forget": "Acc D_f", "acc_retain": "Acc D_r", "acc_test": "Acc D_t",
                "mia_efficacy": "MIA-efficacy", "avg_gap": "Avg. Gap", "runtime_s": "Run-time (s)"}


@torch.no_grad()
def predict_confidences(model, dataset, batch_size: int = 256, device=None):
    """(predictions, softmax probability of the true class, labels) as numpy arrays."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    preds, confs, labels = [], [], []
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        x = torch.stack([torch.as_tensor(r["pixel_values"]) for r in rows]).to(device)
        y = torch.as_tensor([int(r["labels"]) for r in rows], device=device)
        out = model(pixel_values=x)
        logits = (out.logits if hasattr(out, "logits") else out[0]).float()
        prob = logits.softmax(-1)
        preds.append(logits.argmax(-1).cpu())
        confs.append(prob.gather(1, y[:, None])[:, 0].cpu())
        labels.append(y.cpu())
    model.train(was_training)
    cat = lambda xs: torch.cat(xs).numpy() if xs else np.zeros(0)  # noqa: E731
    return cat(preds), cat(confs), cat(labels)


def mia_efficacy(retain_conf: Sequence[float], test_conf: Sequence[float],
                 forget_conf: Sequence[float], seed: int = 0) -> float:
    """Share (%) of D_f that an SVC membership attack on true-class confidence calls non-member."""
    from ..classification.data import require_sklearn

    require_sklearn("MIA-efficacy")
    from sklearn.svm import SVC

    r, t, f = (np.asarray(a, dtype=np.float64).reshape(-1, 1) for a in (retain_conf, test_conf, forget_conf))
    if len(r) == 0 or len(t) == 0 or len(f) == 0:
        raise ValueError("MIA needs non-empty retain, test and forget confidences")
    n = min(len(r), len(t))
    rng = np.random.default_rng(seed)
    r = r[rng.choice(len(r), n, replace=False)]
    t = t[rng.choice(len(t), n, replace=False)]
    x = np.concatenate([r, t])
    y = np.concatenate([np.ones(n), np.zeros(n)])
    if np.ptp(x) == 0:  # nothing to learn from: the attack cannot call anything a member
        return 100.0 * float(np.mean(f[:, 0] != r[0, 0])) if len(r) else 100.0
    clf = SVC(C=3, gamma="auto", kernel="rbf")
    clf.fit(x, y)
    return 100.0 * float(np.mean(clf.predict(f) == 0))


def avg_gap(metrics: Mapping[str, float], reference: Mapping[str, float],
            keys: Iterable[str] = METRIC_KEYS) -> float:
    """Mean absolute difference (points) to the retrained reference over ``keys``."""
    keys = list(keys)
    missing = [k for k in keys if k not in metrics or k not in reference]
    if missing:
        raise ValueError(f"avg_gap needs {missing} in both the model's and the reference's metrics")
    return float(np.mean([abs(metrics[k] - reference[k]) for k in keys]))


def evaluate_unlearning(model, forget_set, retain_set, test_set, batch_size: int = 256,
                        mia_seed: int = 0, mia: bool = True) -> Dict[str, float]:
    """Acc on D_f, D_r, D_t and MIA-efficacy (percent).

    ``forget_set=None`` (a model trained on everything, e.g. the original) gives Acc on D_r and
    D_t only. ``mia=False`` leaves out MIA-efficacy, the one metric that needs scikit-learn.
    """
    out = {}
    confs = {}
    sets = (("forget", forget_set), ("retain", retain_set), ("test", test_set))
    for name, ds in sets:
        if ds is None:
            continue
        pred, conf, lab = predict_confidences(model, ds, batch_size=batch_size)
        out[f"acc_{name}"] = 100.0 * float(np.mean(pred == lab)) if len(lab) else float("nan")
        confs[name] = conf
    if mia and forget_set is not None:
        out["mia_efficacy"] = mia_efficacy(confs["retain"], confs["test"], confs["forget"], seed=mia_seed)
    return out


def evaluate_models(models: Mapping[str, object], forget_set, retain_set, test_set,
                    reference: Optional[str] = "retrain", runtimes: Optional[Mapping[str, float]] = None,
                    batch_size: int = 256) -> Dict[str, Dict[str, float]]:
    """Metrics for each named model, plus Avg. Gap against ``models[reference]`` when present."""
    results = {}
    for name, model in models.items():
        results[name] = evaluate_unlearning(model, forget_set, retain_set, test_set, batch_size=batch_size)
        results[name]["runtime_s"] = float((runtimes or {}).get(name, float("nan")))
    if reference is not None and reference in results:
        for m in results.values():
            m["avg_gap"] = avg_gap(m, results[reference])
    return results


def aggregate_runs(runs: List[Mapping[str, float]]) -> Dict[str, Dict[str, float]]:
    """{metric: {mean, std, n}} over repeated runs (population std over seeds is ddof=1)."""
    keys = sorted({k for r in runs for k in r if isinstance(r[k], (int, float))})
    out = {}
    for k in keys:
        vals = np.array([r[k] for r in runs if k in r], dtype=np.float64)
        out[k] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                  "n": int(len(vals))}
    return out


def classification_markdown(results: Mapping[str, Mapping], columns: Sequence[str] = (
        *METRIC_KEYS, "avg_gap", "runtime_s"), title: Optional[str] = None) -> str:
    """A markdown table, one row per model; cells are numbers or {mean, std, n} dicts."""
    table = markdown_table(["Method", *(METRIC_NAMES.get(c, c) for c in columns)],
                           [[name, *(_number_cell(metrics.get(c)) for c in columns)]
                            for name, metrics in results.items()])
    return (f"**{title}**\n\n" if title else "") + table + "\n"


def _number_cell(cell):
    """Every metric here is a percentage or seconds: two decimals, also for a whole number."""
    return float(cell) if isinstance(cell, int) and not isinstance(cell, bool) else cell


def plot_classification_results(results: Mapping[str, Mapping], path, title: Optional[str] = None
                                ) -> str:
    """A bar chart of the metrics per model (error bars: std over seeds), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in (*METRIC_KEYS, "avg_gap") if any(k in m for m in results.values())]
    models = list(results)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(keys) * max(1, len(models)) / 3), 4))
    width = 0.8 / max(1, len(models))
    for i, m in enumerate(models):
        vals, errs = [], []
        for k in keys:
            cell = results[m].get(k)
            if isinstance(cell, Mapping):
                vals.append(cell["mean"]), errs.append(cell.get("std", 0.0))
            else:
                vals.append(np.nan if cell is None else cell), errs.append(0.0)
        ax.bar(np.arange(len(keys)) + i * width, vals, width, yerr=errs, label=m)
    ax.set_xticks(np.arange(len(keys)) + width * (len(models) - 1) / 2)
    ax.set_xticklabels([METRIC_NAMES.get(k, k) for k in keys])
    ax.set_ylabel("%")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return str(path)


def write_classification_results(output_dir, results: Mapping[str, Mapping], *,
                                 name: str = "results", title: Optional[str] = None
                                 ) -> Dict[str, str]:
    """``<name>.json`` and ``<name>.md`` through the one writer, plus the bar chart ``<name>.png``;
    returns their paths (keys ``json``, ``markdown``, ``png``)."""
    paths = _write_results(output_dir, results, name=name,
                          markdown=classification_markdown(results, title=title))
    paths["png"] = plot_classification_results(results, Path(output_dir) / f"{name}.png", title)
    return paths


def _old_write_results(results, output_dir, name: str = "results", title: Optional[str] = None):
    paths = write_classification_results(output_dir, results, name=name, title=title)
    return {**paths, "md": paths["markdown"]}  # the key this returned before


# one release: the names (and argument order) these had before the one writer
results_markdown = deprecated_alias(classification_markdown,
                                    "hf_munba.evaluation.classification.results_markdown",
                                    "hf_munba.evaluation.classification.classification_markdown")
write_results = deprecated_alias(_old_write_results,
                                 "hf_munba.evaluation.classification.write_results(results, "
                                 "output_dir)",
                                 "hf_munba.evaluation.classification.write_classification_results"
                                 "(output_dir, results)")
