#!/usr/bin/env python
"""Real-data unlearning benchmark on scikit-learn digits: every method, compared at equal forgetting.

For each seed: train the original classifier on the digits training split; then for
(a) forgetting one class and (b) forgetting a random 10% of the training samples, retrain from
scratch on D_r (the gold reference) and run every unlearning method from the original weights
through ``MunbaTrainer``, recording Acc(D_f), Acc(D_r) and Acc(D_t) every ``--eval_every``
optimizer steps (``hf_munba.evaluation.tradeoff.AccuracyCurveCallback``).

Each method row gets the same small learning-rate search (``--lr_grid``), except ``iu``, which
does not train and searches its influence scale ``iu_alpha`` instead (``--iu_alpha_grid``),
decided on the first seed by a rule fixed in advance (``select_run``: best test accuracy at equal forgetting, then
the first point's, then the earliest). Forget criterion: class-wise Acc(D_f) <= 5 %; random
10 %: |Acc(D_f) - Acc_retrain(D_f)| <= 2 points (the same seed's retrained model). Per row it
reports the test accuracy at the FIRST evaluation meeting the criterion and the BEST over such
evaluations, beside the end-of-run table (Acc D_f / D_r / D_t, MIA-efficacy, Avg. Gap vs
retrain, run-time), mean ± std over seeds; writes markdown, JSON (every curve point of every
run) and a trade-off PNG per setting.

    python eval/bench_digits_unlearning.py --output_dir docs/bench_digits      # full (3 seeds)
    python eval/bench_digits_unlearning.py --seeds 0 --methods munba,weighted-1  # quick look

Rows: a classifier method of the registry (``hf_munba.unlearning.available_methods("classification")``:
``munba``, ``munba-paper``, ``ft``, ``ga``, ``rl``, ``salun``, ``l1``, ``iu``, ``be``, ``bs``,
``shs``, ...) or ``weighted-<lam>``
(``weighted`` with ``forget_weight=lam``). ``rl`` is exactly ``weighted-1`` (same losses), so the
default list (``default_rows``) runs it only under that name. Runs
single-threaded (``--threads``) so timings are comparable on a shared machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Recipes: SGD (momentum 0.9, weight decay 5e-4), grad clip 1.0, batch 64, linear decay (the
# paper's classification protocol, DESIGN.md §5, with epochs scaled to this tiny task). The
# original and the retrained model train 30 epochs at lr 0.1. Every unlearning row trains
# 3 epochs; its learning rate comes from the search over LR_GRID (inside the paper's range
# [1e-4, 1e-1]) unless --recipes fixes it.
_TRAIN = dict(lr=0.1, epochs=30)
RECIPES = {"class": dict(epochs=3), "random": dict(epochs=3)}
LR_GRID = (0.003, 0.01, 0.03, 0.1)
# IU takes no training step: its one hyper-parameter, the influence scale alpha (the reference
# uses 10 on CIFAR-10), is searched instead of the learning rate.
IU_ALPHA_GRID = (1, 2, 5, 10, 20, 50)
WEIGHTS = (0.1, 0.3, 1, 3)


def default_rows():
    """Every classifier method of the registry, with ``weighted`` as its lambda sweep: the
    bargaining methods first, then ``weighted-<lam>`` for lam in WEIGHTS, then the baselines.
    Left out: ``retrain`` (the reference, always run) and ``rl`` (exactly ``weighted-1``: the
    same losses and weights). A newly registered method is benchmarked without touching this file.
    Imported from ``hf_munba.classification``: that import registers the classifier-only methods
    (``salun``, ``l1``, ``iu``, ``be``, ``bs``, ``shs``, ...); ``hf_munba.unlearning`` alone has
    only the shared ones."""
    from hf_munba.classification.methods import available_methods, get_method

    methods = [m for m in available_methods("classification") if m not in ("retrain", "rl", "weighted")]
    bargaining = [m for m in methods if get_method(m).bargains]
    rest = sorted((m for m in methods if m not in bargaining),  # the paper's order, then the others
                  key=lambda m: (PAPER_BASELINES.index(m) if m in PAPER_BASELINES else len(PAPER_BASELINES), m))
    return [*bargaining, *[f"weighted-{w:g}" for w in WEIGHTS], *rest]


PAPER_BASELINES = ("ft", "ga", "iu", "be", "bs", "l1", "salun", "shs")  # its Table 5's order


ALL_METHODS = default_rows()
CLASS_THRESHOLD = 5.0     # class-wise: Acc(D_f) <= 5 % counts as forgotten
MATCH_TOLERANCE = 2.0     # random: |Acc(D_f) - retrain's| <= 2 points counts as equal forgetting


def searched(a, row):
    """(the hyper-parameter searched for ``row``, its grid): the learning rate, or for a method
    that does not train (``iu``) its own scale."""
    if row_spec(row)[0] == "iu":
        return "iu_alpha", a.iu_alpha_grid
    return "lr", a.lr_grid


def row_spec(name: str, retain_objective=None):
    """Row name -> (MunbaTrainer method, extra MunbaTrainer keywords).

    ``retain_objective`` (``--retain_objective``) is given to every row whose method has both
    a retain and a forget loss (the others have no choice to make); None keeps the trainer's
    default.

    ``munba`` is what ``MunbaTrainer(method="munba")`` does with no other option (the
    recommended configuration); ``munba-paper`` is the paper's plain rule: bargaining power 1
    and no satisfaction target. While the classifiers' default forget loss has no default target,
    that is exactly ``munba``'s configuration on class-wise forgetting, where the trainer picks
    power 1 (the row then shares munba's run; on random samples it picks 0.2, see
    ``hf_munba.classification.forget_power``); should the loss get a target, the row runs the
    registry's ``munba-paper`` method, which never builds a rule.
    ``munba-target-<T>`` (absolute target T on the forget loss) and ``munba-power-<w>``
    (forget bargaining power w) are for exploring the bargaining options.
    """
    from hf_munba.classification.trainer import MunbaArguments
    from hf_munba.classification.methods import get_method

    def number(prefix):
        try:
            value = float(name[len(prefix):])
        except ValueError:
            raise ValueError(f"row {name!r}: expected {prefix}<number>, e.g. {prefix}0.3") from None
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"row {name!r}: the number must be positive")
        return value

    if retain_objective is not None:
        method, extra = row_spec(name)
        cls = get_method(method)
        if cls.uses_retain and cls.uses_forget:
            extra = {**extra, "retain_objective": retain_objective}
        return method, extra
    if name.startswith("weighted-"):
        return "weighted", {"forget_weight": number("weighted-")}
    if name == "munba-paper":
        extra = {"bargaining_power_forget": 1.0, "forget_target": None}
        if MunbaArguments(method="munba", **extra).make_forget_rule() is not None:
            return "munba-paper", {}
        return "munba", extra
    if name.startswith("munba-target-"):
        return "munba", {"forget_target": number("munba-target-"), "forget_target_mode": "absolute"}
    if name.startswith("munba-power-"):
        return "munba", {"bargaining_power_forget": number("munba-power-")}
    if name == "retrain":
        raise ValueError("retrain always runs (it is the reference); leave it out of --methods")
    get_method(name)  # raises with the list of methods
    return name, {}


def config_key(row: str, retain_objective=None, setting: str = "class") -> str:
    """The full MunbaTrainer configuration a row runs on ``setting`` (two rows with the same key
    are one run): a forget power left to the trainer is the one it picks for that forget set."""
    from hf_munba.classification.forget_power import power_for_kind
    from hf_munba.classification.methods import get_method
    from hf_munba.classification.trainer import MunbaArguments

    method, extra = row_spec(row, retain_objective)
    config = MunbaArguments(method=method, **extra).to_dict()
    if config["bargaining_power_forget"] is None and "bargaining_power_forget" in get_method(method).settings:
        config["bargaining_power_forget"] = power_for_kind("samples" if setting == "random" else "classes")
    return json.dumps(config, sort_keys=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; the first one runs the lr search")
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help="comma-separated rows: methods or weighted-<lambda>")
    p.add_argument("--settings", default="class,random", help="class and/or random")
    p.add_argument("--forget_class", type=int, default=3)
    p.add_argument("--forget_fraction", type=float, default=0.1)
    p.add_argument("--model", default="tiny-resnet", choices=["tiny-resnet", "tiny-vit"])
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr_grid", default=",".join(f"{x:g}" for x in LR_GRID),
                   help="learning rates searched per row and setting on the first seed (one value: no search)")
    p.add_argument("--iu_alpha_grid", default=",".join(f"{x:g}" for x in IU_ALPHA_GRID),
                   help="influence scales searched for iu (which does not train) on the first seed")
    p.add_argument("--eval_every", type=int, default=2, help="optimizer steps between curve points")
    p.add_argument("--class_threshold", type=float, default=CLASS_THRESHOLD,
                   help="class-wise forget criterion: Acc(D_f) <= this (percent)")
    p.add_argument("--match_tolerance", type=float, default=MATCH_TOLERANCE,
                   help="random forget criterion: |Acc(D_f) - retrain's Acc(D_f)| <= this (points)")
    p.add_argument("--retain_objective", choices=("ce", "distill"), default=None,
                   help="the retain loss of every row with both a retain and a forget loss "
                        "(MunbaTrainer's retain_objective; default: its default)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output_dir", default="bench_digits_out")
    p.add_argument("--replot", action="store_true",
                   help="only rewrite the markdown and PNGs in --output_dir from its JSON (no training)")
    p.add_argument("--recipes", default=None,
                   help="JSON overriding recipes per row, e.g. '{\"random:ga\": {\"lr\": 0.01}, \"munba\": "
                        "{\"epochs\": 5}, \"retrain\": {\"epochs\": 20}}'; a given lr skips the search")
    a = p.parse_args(argv)
    a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    a.settings = [s.strip() for s in a.settings.split(",") if s.strip()]
    a.lr_grid = [float(x) for x in a.lr_grid.split(",") if x.strip()]
    a.iu_alpha_grid = [float(x) for x in a.iu_alpha_grid.split(",") if x.strip()]
    if not a.seeds or not a.methods or not a.lr_grid or not a.iu_alpha_grid:
        p.error("--seeds, --methods, --lr_grid and --iu_alpha_grid must not be empty")
    if any(not (math.isfinite(x) and x > 0) for x in a.lr_grid + a.iu_alpha_grid):
        p.error("--lr_grid and --iu_alpha_grid take positive numbers")
    if len(set(a.methods)) != len(a.methods):
        p.error("--methods lists a row twice")
    if a.eval_every < 1:
        p.error("--eval_every must be >= 1")
    for m in a.methods:
        try:
            row_spec(m)
        except ValueError as e:
            p.error(str(e))
    bad = [s for s in a.settings if s not in ("class", "random")]
    if bad or not a.settings:
        p.error(f"unknown settings {bad}")
    overrides = json.loads(a.recipes) if a.recipes else {}
    rows = ("original", "retrain", *a.methods)
    a.recipes = {s: {r: dict(_TRAIN) if r in ("original", "retrain") else dict(RECIPES[s]) for r in rows}
                 for s in ("class", "random")}
    for k, v in overrides.items():
        setting, _, name = k.rpartition(":")  # "munba" (both settings) or "random:munba"
        if name not in rows or setting not in ("", "class", "random"):
            p.error(f"--recipes: unknown entry {k!r} (rows: {list(rows)})")
        for s in ([setting] if setting else ["class", "random"]):
            a.recipes[s][name].update(v)
    return a


def train(model, row, retain, forget, recipe, batch_size, seed, workdir, callbacks=(), extra_args=None,
          retain_objective=None):
    """One MunbaTrainer run; returns (model, training seconds without curve evaluation).
    ``extra_args``: more MunbaArguments for the row (a searched setting such as ``iu_alpha``);
    ``retain_objective``: see :func:`row_spec`."""
    import torch
    from transformers import PrinterCallback, TrainingArguments

    from hf_munba.classification.trainer import MunbaArguments, MunbaTrainer

    method, extra = ("ft", {}) if row == "original" else (("retrain", {}) if row == "retrain" else row_spec(row, retain_objective))
    args = TrainingArguments(
        output_dir=workdir, per_device_train_batch_size=batch_size, learning_rate=recipe["lr"],
        num_train_epochs=recipe.get("epochs", 1), max_steps=recipe.get("max_steps", -1),
        optim="sgd", optim_args="momentum=0.9", weight_decay=5e-4, lr_scheduler_type="linear",
        max_grad_norm=1.0, seed=seed, data_seed=seed, save_strategy="no", report_to=[],
        logging_strategy="no", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
    trainer = MunbaTrainer(model=model, args=args, train_dataset=retain, forget_dataset=forget,
                           munba_args=MunbaArguments(method=method, **extra, **(extra_args or {})),
                           callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)  # its per-run metrics dict would drown the summary lines
    t0 = time.perf_counter()
    trainer.train()
    runtime = time.perf_counter() - t0 - sum(getattr(c, "eval_seconds", 0.0) for c in callbacks)
    model = trainer.accelerator.unwrap_model(trainer.model)
    torch.set_grad_enabled(True)
    return model, runtime


def forget_distance(criterion, acc_forget: float) -> float:
    """How many points an Acc(D_f) is from meeting the criterion (0 when it does)."""
    if criterion.kind == "at_most":
        return max(0.0, acc_forget - criterion.threshold)
    return max(0.0, abs(acc_forget - criterion.target) - criterion.tolerance)


def run_row(a, row, setting, seed, original, sets, criterion, work):
    """One row on one seed: the search (first seed) or the chosen value; curve + end metrics.

    The searched value is the learning rate, or ``iu_alpha`` for ``iu`` (see :func:`searched`).
    A method that does not train (``iu``) has a two-point curve: the original model at step 0
    and its one edit at step 1."""
    from hf_munba.classification.methods import get_method
    from hf_munba.evaluation.classification import evaluate_unlearning
    from hf_munba.evaluation.tradeoff import AccuracyCurveCallback, first_and_best, select_run

    recipe = a.recipes[setting][row]
    name, grid = searched(a, row)
    fixed = recipe.get(name) if name == "lr" else None
    values = [fixed] if fixed is not None else (grid if seed == a.seeds[0] else [a.chosen[setting][row]])
    trains = getattr(get_method(row_spec(row)[0]), "trains", True)
    runs = {}
    for value in values:
        cb = AccuracyCurveCallback(sets, eval_every=a.eval_every)
        lr = value if name == "lr" else recipe.get("lr", a.lr_grid[0])
        model, rt = train(copy.deepcopy(original), row, sets["retain"], sets["forget"], {**recipe, "lr": lr},
                          a.batch_size, seed, work, callbacks=[cb],
                          extra_args=None if name == "lr" else {name: value},
                          retain_objective=a.retain_objective)
        if not trains:
            cb.evaluate(original, 0, 0.0)
            cb.evaluate(model, 1, 1.0)
        end = {**evaluate_unlearning(model, sets["forget"], sets["retain"], sets["test"]), "runtime_s": rt}
        runs[value] = {"lr": lr if trains else None, "searched": {"name": name, "value": value},
                       "curve": cb.points, "end": end, "at_forgetting": first_and_best(cb.points, criterion)}
    if len(runs) > 1:
        chosen = select_run({v: r["at_forgetting"] for v, r in runs.items()},
                            {v: forget_distance(criterion, r["end"]["acc_forget"]) for v, r in runs.items()})
    else:
        chosen = next(iter(runs))
    a.chosen[setting][row] = chosen
    search = None
    if len(runs) > 1:
        search = {f"{v:g}": {"at_forgetting": r["at_forgetting"], "end": r["end"], "curve": r["curve"]}
                  for v, r in runs.items()}
    return runs[chosen], search


def summarise(setting_runs, methods):
    """Per row: end-of-run mean ± std, first/best at equal forgetting, the aggregated curve."""
    from hf_munba.evaluation.classification import aggregate_runs
    from hf_munba.evaluation.tradeoff import aggregate_curves, aggregate_first_best

    table = {}
    for name, per_seed in setting_runs.items():
        row = {"end": aggregate_runs([r["end"] for r in per_seed])}
        if name in methods:
            row["lr"] = per_seed[0]["lr"]
            row["searched"] = per_seed[0].get("searched", {"name": "lr", "value": row["lr"]})
            row["at_forgetting"] = aggregate_first_best([r["at_forgetting"] for r in per_seed])
            row["curve"] = aggregate_curves([r["curve"] for r in per_seed])
            if per_seed[0].get("same_run_as"):
                row["same_run_as"] = per_seed[0]["same_run_as"]
        table[name] = row
    return table


def best_weighted(table, which):
    """The weighted-<lam> row with the highest mean ``which`` ('first'/'best') test accuracy among
    those that met the criterion on every seed (None if none did)."""
    ok = [(n, r) for n, r in table.items() if n.startswith("weighted-")
          and r["at_forgetting"]["reached"] == r["at_forgetting"]["seeds"]]
    if not ok:
        return None
    return max(ok, key=lambda nr: nr[1]["at_forgetting"][which]["mean"])[0]


def _cell(stat, digits=2):
    if stat is None or stat.get("n", 0) == 0 or not math.isfinite(stat["mean"]):
        return "–"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}" if stat["n"] > 1 else f"{stat['mean']:.{digits}f}"


def markdown_table(table, title, criterion_text):
    cols = ("acc_forget", "acc_retain", "acc_test", "mia_efficacy", "avg_gap", "runtime_s")
    lines = [f"**{title}**", "", f"Forget criterion: {criterion_text}. Curve columns: test accuracy at "
             "the first evaluation meeting it and the best over evaluations meeting it (seeds that "
             "reached it), the step of the first, and how many seeds reached it.", "",
             "| Method | searched: won | Acc D_f | Acc D_r | Acc D_t | MIA-efficacy | Avg. Gap | Run-time (s) | "
             "reached | D_t @first | step @first | D_t @best |",
             "|---|" + "---|" * 11]
    for name, row in table.items():
        end = row["end"]
        cells = [_cell(end.get(c)) for c in cols]
        if "at_forgetting" in row:
            af = row["at_forgetting"]
            curve = [f"{af['reached']}/{af['seeds']}", _cell(af["first"]), _cell(af["first_step"], 0),
                     _cell(af["best"])]
            won = row.get("searched", {"name": "lr", "value": row["lr"]})
            lr = f"{won['name']} {won['value']:g}"
        else:
            curve, lr = ["–"] * 4, "–"
        lines.append(f"| {name} | {lr} | " + " | ".join(cells + curve) + " |")
    notes = [f"`{n}` runs exactly the configuration of `{r['same_run_as']}` (identical MunbaArguments and "
             "recipe), so one run serves both rows." for n, r in table.items() if r.get("same_run_as")]
    notes.append("`searched: won`: the value the search on the first seed chose (the learning rate; for "
                 "`iu`, which does not train, its influence scale `iu_alpha`).")
    return "\n".join(lines) + "\n" + "".join(f"\n{x}\n" for x in notes)


def comparison_text(table, subject="munba"):
    """The plain statement: does ``subject`` keep at least the best weighted's test accuracy?"""
    if subject not in table or "at_forgetting" not in table[subject]:
        return ""
    if not any(n.startswith("weighted-") for n in table):
        return ""  # nothing to compare with
    out = []
    for which, label in (("first", "first point"), ("best", "best point")):
        bw = best_weighted(table, which)
        s = table[subject]["at_forgetting"]
        if bw is None:
            out.append(f"- {label}: no weighted-<lam> row met the criterion on every seed.")
            continue
        w = table[bw]["at_forgetting"]
        if s["reached"] < s["seeds"]:
            out.append(f"- {label}: {subject} met the criterion on {s['reached']}/{s['seeds']} seeds only "
                       f"(best weighted: {bw}, {_cell(w[which])}).")
            continue
        diff = s[which]["mean"] - w[which]["mean"]
        verdict = "keeps at least" if diff >= 0 else "does NOT keep"
        out.append(f"- {label}: {subject} {_cell(s[which])} vs best weighted ({bw}) {_cell(w[which])}: "
                   f"{verdict} its test accuracy ({diff:+.2f} points).")
    return "\n".join(out) + "\n"


def criterion_band(criteria):
    """The Acc(D_f) band shaded as "forgotten" in the plot (the seeds' mean target for 'match')."""
    crits = list(criteria.values())
    if crits[0]["kind"] == "at_most":
        return (-1.0, crits[0]["threshold"])
    mid = sum(c["target"] for c in crits) / len(crits)
    return (mid - crits[0]["tolerance"], mid + crits[0]["tolerance"])


def render(payload, output_dir, name):
    """Markdown table + comparison and the trade-off PNG, from a setting's JSON payload."""
    from hf_munba.evaluation.results import atomic_write_text
    from hf_munba.evaluation.tradeoff import plot_tradeoff_curves

    table = payload["table"]
    md = markdown_table(table, payload["title"], payload["criterion"]) + "\n" + comparison_text(table)
    atomic_write_text(os.path.join(output_dir, name + ".md"), md)
    refs = {n: {k: table[n]["end"][k]["mean"] for k in ("acc_forget", "acc_retain", "acc_test")}
            for n in ("retrain", "original") if n in table}
    twins = {}
    for n, r in table.items():
        if r.get("same_run_as"):
            twins.setdefault(r["same_run_as"], []).append(n)
    curves = {" = ".join([n, *twins.get(n, [])]): r["curve"] for n, r in table.items()
              if "curve" in r and not r.get("same_run_as")}  # one line per distinct run
    plot_tradeoff_curves(curves, os.path.join(output_dir, name + ".png"), title=payload["title"],
                         criterion_band=criterion_band(payload["criteria_per_seed"]), references=refs)
    return md


def write_setting(a, setting, table, per_seed_runs, search, criteria, title, criterion_text):
    from hf_munba.evaluation.results import atomic_write_text

    name = f"digits_{setting}"
    payload = {"title": title, "criterion": criterion_text, "criteria_per_seed": criteria,
               "seeds": a.seeds, "lr_grid": a.lr_grid, "iu_alpha_grid": a.iu_alpha_grid,
               "eval_every": a.eval_every, "model": a.model, "retain_objective": a.retain_objective,
               "recipes": a.recipes[setting],
               "best_weighted": {w: best_weighted(table, w) for w in ("first", "best")},
               "table": table, "runs": per_seed_runs, "lr_search": search}
    # compact: every point of every run
    atomic_write_text(os.path.join(a.output_dir, name + ".json"), json.dumps(payload, separators=(",", ":")))
    return render(payload, a.output_dir, name)


def replot(a):
    """--replot: rewrite the markdown and PNGs of --output_dir from its JSON, without training."""
    from hf_munba.evaluation.results import atomic_write_text

    report = []
    for setting in a.settings:
        with open(os.path.join(a.output_dir, f"digits_{setting}.json")) as f:
            report.append(render(json.load(f), a.output_dir, f"digits_{setting}"))
    path = os.path.join(a.output_dir, "digits_benchmark.md")
    footer = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        footer = old[old.rfind("\nOriginal model training:"):] if "\nOriginal model training:" in old else ""
    atomic_write_text(path, "\n".join(report) + footer)


def main(argv=None):
    a = parse_args(argv)
    if a.replot:
        return replot(a)
    import numpy as np
    import torch
    from transformers.utils import logging as hf_logging

    from hf_munba.classification.data import InMemoryDataset, digits_dataset
    from hf_munba.classification.model_io import load_image_classifier
    from hf_munba.testing import CLASSIFIER_SOURCES
    from hf_munba.evaluation.classification import avg_gap, evaluate_unlearning
    from hf_munba.evaluation.tradeoff import ForgetCriterion
    from hf_munba.classification.forget_sets import ForgetSpec, split_forget_retain
    from hf_munba.evaluation.results import atomic_write_text

    torch.set_num_threads(a.threads)
    hf_logging.set_verbosity_error()
    sources = dict(CLASSIFIER_SOURCES)
    data = digits_dataset(seed=0)
    test = InMemoryDataset.from_dataset(data["test"])
    full = InMemoryDataset.from_dataset(data["train"])
    a.chosen = {s: {} for s in a.settings}
    runs = {s: {} for s in a.settings}      # setting -> row -> [per-seed record]
    search = {s: {} for s in a.settings}    # setting -> row -> {lr: ...} (first seed)
    criteria = {s: {} for s in a.settings}  # setting -> seed -> criterion
    originals = []
    t_start = time.perf_counter()
    os.makedirs(a.output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        for seed in a.seeds:
            base, _ = load_image_classifier(a.model, seed=seed, model_sources=sources)
            original, t_orig = train(base, "original", full, None, a.recipes["class"]["original"],
                                     a.batch_size, seed, work)
            originals.append(t_orig)
            for setting in a.settings:
                spec = (ForgetSpec(classes=[a.forget_class]) if setting == "class"
                        else ForgetSpec(fraction=a.forget_fraction, seed=seed))
                f_ds, r_ds = split_forget_retain(data["train"], spec)
                sets = {"forget": InMemoryDataset.from_dataset(f_ds),
                        "retain": InMemoryDataset.from_dataset(r_ds), "test": test}
                results = {"original": {"end": {**evaluate_unlearning(original, sets["forget"], sets["retain"],
                                                                      test), "runtime_s": float("nan")}}}
                fresh, _ = load_image_classifier(a.model, seed=seed + 1000, model_sources=sources)
                model, rt = train(fresh, "retrain", sets["retain"], sets["forget"], a.recipes[setting]["retrain"],
                                  a.batch_size, seed, work)
                results["retrain"] = {"end": {**evaluate_unlearning(model, sets["forget"], sets["retain"], test),
                                              "runtime_s": rt}}
                criterion = (ForgetCriterion.at_most(a.class_threshold) if setting == "class" else
                             ForgetCriterion.match(results["retrain"]["end"]["acc_forget"], a.match_tolerance))
                criteria[setting][seed] = criterion.to_dict()
                done = {}  # configuration -> the row that ran it (identical configurations run once)
                for row in a.methods:
                    key = (config_key(row, a.retain_objective, setting), json.dumps(a.recipes[setting][row], sort_keys=True))
                    if key in done:
                        first = done[key]
                        results[row] = {**copy.deepcopy(results[first]), "same_run_as": first}
                        a.chosen[setting][row] = a.chosen[setting][first]
                        if first in search[setting] and seed == a.seeds[0]:
                            search[setting][row] = {**{k: v for k, v in search[setting][first].items()
                                                       if k != "runs"}, "same_run_as": first}
                        continue
                    done[key] = row
                    results[row], row_search = run_row(a, row, setting, seed, original, sets, criterion, work)
                    if row_search is not None:
                        name = searched(a, row)[0]
                        search[setting][row] = {"searched": name, "chosen": a.chosen[setting][row],
                                                **({"chosen_lr": a.chosen[setting][row]} if name == "lr" else {}),
                                                "runs": row_search}
                for name, r in results.items():
                    r["end"]["avg_gap"] = avg_gap(r["end"], results["retrain"]["end"])
                    r["seed"] = seed
                    runs[setting].setdefault(name, []).append(r)
                print(f"[seed {seed} {setting}, {criterion.describe()}] " + ", ".join(
                    f"{n}: Df {r['end']['acc_forget']:.1f} Dt {r['end']['acc_test']:.1f}"
                    + (f" {r['searched']['name']} {r['searched']['value']:g} first {r['at_forgetting']['first']:.1f}"
                       f"@{r['at_forgetting']['first_step']} best {r['at_forgetting']['best']:.1f}"
                       if "at_forgetting" in r else "")
                    for n, r in results.items()), flush=True)
    total = time.perf_counter() - t_start
    titles = {"class": f"Class-wise forgetting (digit {a.forget_class})",
              "random": f"Random {a.forget_fraction:.0%} forgetting"}
    report = []
    for setting in a.settings:
        table = summarise(runs[setting], a.methods)
        title = f"{titles[setting]}, {a.model}, seeds {a.seeds}"
        if setting == "class":
            text = f"Acc(D_f) <= {a.class_threshold:g}%"
        else:
            targets = [c["target"] for c in criteria[setting].values()]
            text = (f"|Acc(D_f) - Acc_retrain(D_f)| <= {a.match_tolerance:g} points, retrain of the same seed "
                    f"(retrain's Acc(D_f): {', '.join(f'{t:.2f}' for t in targets)})")
        report.append(write_setting(a, setting, table, runs[setting], search[setting], criteria[setting],
                                    title, text))
    footer = (f"\nOriginal model training: {np.mean(originals):.1f} s per seed. Total benchmark wall "
              f"time: {total:.0f} s with {a.threads} thread(s). Learning rates searched on seed "
              f"{a.seeds[0]}: {a.lr_grid} (iu: iu_alpha in {a.iu_alpha_grid}); curve points every "
              f"{a.eval_every} optimizer steps. Retain loss: "
              f"{a.retain_objective or 'the trainer default'} (rows with both a retain and a forget loss).\n"
              f"Recipes: {json.dumps(a.recipes)}\n")
    text = "\n".join(report) + footer
    atomic_write_text(os.path.join(a.output_dir, "digits_benchmark.md"), text)
    print(text)
    return runs


if __name__ == "__main__":
    main()
