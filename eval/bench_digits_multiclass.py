#!/usr/bin/env python
"""Forgetting several digits at once: one player per class vs one pooled forget player vs one
class after the other, for ``munba`` and the weighted sum, on scikit-learn digits.

The question: with several classes to forget, does making each class its own bargaining player
(``MunbaTrainer(forget_dataset={"3": ..., "7": ...})``) forget every class while keeping more of
the rest than pooling them into one forget loss, or than two single-class runs in a row? Per
seed it trains the original classifier and the retrained reference exactly as
``eval/bench_digits_unlearning.py`` does (its ``train`` and recipes; nothing is copied), then
from the original weights:

* ``per_class``: one run, each class its own forget player (K = 1 + #classes);
* ``pooled``: one run, all classes in one forget player;
* ``sequential``: one single-class run per class in the given order, each from the previous
  run's weights, the retain set shrinking as classes are forgotten (how separate deletion
  requests arrive); it trains #classes times as many steps.

Every run uses the single-class benchmark's unlearning recipe (3 epochs over D_r, SGD momentum
0.9, clip 1.0, batch 64) and its chosen learning rate (0.1 for ``munba`` and every
``weighted-<lam>`` in docs/bench_digits/digits_class.json); no search here. Reported at the end
of each run, mean ± std over seeds: Acc on each forgotten class's training samples, Acc D_r,
test accuracy on the kept classes and on all classes. ``--bn_on_retain`` adds each unlearned
model once more after re-estimating its BatchNorm statistics on D_r (``<row> +BN(D_r)``): a
per-class forget batch holds one class only, and every forward pass in train mode moves the
running statistics, so this separates what the weights forgot from what the statistics moved.
Single-threaded.

    python eval/bench_digits_multiclass.py --forget_classes 3,7 --output_dir docs/bench_digits/multiclass
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = ("per_class", "pooled", "sequential")


def parse_args(argv=None):
    from bench_digits_unlearning import RECIPES, _TRAIN, row_spec

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--forget_classes", default="3,7", help="comma-separated digits (at least two)")
    p.add_argument("--rows", default="munba,weighted-1", help="rows of bench_digits_unlearning")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--lr", type=float, default=0.1, help="unlearning learning rate (every row)")
    p.add_argument("--epochs", type=float, default=RECIPES["class"]["epochs"])
    p.add_argument("--original_epochs", type=float, default=_TRAIN["epochs"],
                   help="epochs of the original and the retrained model (the benchmark's 30)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--model", default="tiny-resnet", choices=["tiny-resnet", "tiny-vit"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bn_on_retain", action="store_true",
                   help="also measure every unlearned model with BatchNorm statistics re-estimated on D_r")
    p.add_argument("--output_dir", default="bench_digits_multiclass_out")
    a = p.parse_args(argv)
    a.forget_classes = [int(c) for c in a.forget_classes.split(",") if c.strip()]
    a.rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    if len(a.forget_classes) < 2 or len(set(a.forget_classes)) != len(a.forget_classes):
        p.error("--forget_classes needs at least two different digits")
    bad = [m for m in a.modes if m not in MODES]
    if bad or not a.modes or not a.rows or not a.seeds:
        p.error(f"--modes from {list(MODES)}; --rows and --seeds must not be empty")
    for r in a.rows:
        try:
            row_spec(r)
        except ValueError as e:
            p.error(str(e))
    a.original_recipe = {**_TRAIN, "epochs": a.original_epochs}
    return a


def measure(model, forget_by_class, retain, test_kept, test):
    """Acc per forgotten class (training samples), on D_r, on the kept test classes, on all test."""
    from hf_munba.evaluation.classification import predict_confidences

    def acc(ds):
        pred, _, lab = predict_confidences(model, ds)
        return 100.0 * float((pred == lab).mean())

    out = {f"acc_forget_{c}": acc(ds) for c, ds in forget_by_class.items()}
    out.update(acc_retain=acc(retain), acc_test_kept=acc(test_kept), acc_test=acc(test))
    return out


def bn_on_retain(model, retain, batch_size: int = 64):
    """A copy of ``model`` whose BatchNorm running statistics are the plain average over D_r's
    batches (weights untouched), in eval mode."""
    import torch

    model = copy.deepcopy(model)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for i in range(0, len(retain), batch_size):
            model(pixel_values=retain["pixel_values"][i: i + batch_size])
    return model.eval()


def main(argv=None):
    a = parse_args(argv)
    import torch
    from transformers.utils import logging as hf_logging

    from bench_digits_unlearning import train
    from hf_munba.classification.data import InMemoryDataset, digits_dataset
    from hf_munba.classification.forget_sets import ForgetSpec, split_forget_retain
    from hf_munba.classification.model_io import load_image_classifier
    from hf_munba.evaluation.classification import aggregate_runs
    from hf_munba.evaluation.results import atomic_write_text, markdown_table
    from hf_munba.testing import CLASSIFIER_SOURCES

    torch.set_num_threads(a.threads)
    hf_logging.set_verbosity_error()
    data = digits_dataset(seed=0)
    mem = InMemoryDataset.from_dataset
    full, test = mem(data["train"]), mem(data["test"])
    classes = a.forget_classes
    forget_by_class = {c: mem(split_forget_retain(data["train"], ForgetSpec(classes=[c]))[0]) for c in classes}
    union, retain = (mem(d) for d in split_forget_retain(data["train"], ForgetSpec(classes=classes)))
    test_kept = mem(split_forget_retain(data["test"], ForgetSpec(classes=classes))[1])
    recipe = {"lr": a.lr, "epochs": a.epochs}
    runs = {}  # row label -> [per-seed metrics]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        for seed in a.seeds:
            base, _ = load_image_classifier(a.model, seed=seed, model_sources=dict(CLASSIFIER_SOURCES))
            original, _ = train(base, "original", full, None, a.original_recipe, a.batch_size, seed, work)
            results = {"original": measure(original, forget_by_class, retain, test_kept, test)}
            fresh, _ = load_image_classifier(a.model, seed=seed + 1000, model_sources=dict(CLASSIFIER_SOURCES))
            model, rt = train(fresh, "retrain", retain, union, a.original_recipe, a.batch_size, seed, work)
            results["retrain"] = {**measure(model, forget_by_class, retain, test_kept, test), "runtime_s": rt}
            for row in a.rows:
                for mode in a.modes:
                    if mode == "sequential":
                        model, rt = copy.deepcopy(original), 0.0
                        for i, c in enumerate(classes):  # one deletion request after the other
                            gone = ForgetSpec(classes=classes[: i + 1])  # D_r shrinks request by request
                            r_c = mem(split_forget_retain(data["train"], gone)[1])
                            model, t = train(model, row, r_c, forget_by_class[c], recipe, a.batch_size,
                                             seed, work)
                            rt += t
                    else:
                        forget = ({str(c): forget_by_class[c] for c in classes} if mode == "per_class"
                                  else union)
                        model, rt = train(copy.deepcopy(original), row, retain, forget, recipe,
                                          a.batch_size, seed, work)
                    results[f"{row} {mode}"] = {**measure(model, forget_by_class, retain, test_kept, test),
                                                "runtime_s": rt}
                    if a.bn_on_retain:
                        results[f"{row} {mode} +BN(D_r)"] = measure(bn_on_retain(model, retain),
                                                                    forget_by_class, retain, test_kept, test)
            for name, m in results.items():
                runs.setdefault(name, []).append(m)
            print(f"[seed {seed}] " + "; ".join(
                f"{n}: " + " ".join(f"{k.replace('acc_', '')} {v:.1f}" for k, v in m.items() if k != "runtime_s")
                for n, m in results.items()), flush=True)
    total = time.perf_counter() - t0
    table = {name: aggregate_runs(per_seed) for name, per_seed in runs.items()}
    cols = [*(f"acc_forget_{c}" for c in classes), "acc_retain", "acc_test_kept", "acc_test", "runtime_s"]
    heads = ["Run", *(f"Acc D_f digit {c}" for c in classes), "Acc D_r", "Acc D_t (kept classes)",
             "Acc D_t (all)", "Train s"]
    md = (f"**Forgetting digits {', '.join(map(str, classes))} together, {a.model}, seeds {a.seeds}** "
          f"(lr {a.lr:g}, {a.epochs:g} epochs per run; mean ± std over seeds)\n\n"
          + markdown_table(heads, [[n, *(t.get(c) for c in cols)] for n, t in table.items()])
          + f"\n\nTotal wall time {total:.0f} s with {a.threads} thread(s).\n")
    os.makedirs(a.output_dir, exist_ok=True)
    atomic_write_text(os.path.join(a.output_dir, "digits_multiclass.json"), json.dumps(
        {"forget_classes": classes, "seeds": a.seeds, "lr": a.lr, "epochs": a.epochs, "model": a.model,
         "table": table, "runs": runs}, indent=1))
    atomic_write_text(os.path.join(a.output_dir, "digits_multiclass.md"), md)
    print(md)
    return table


if __name__ == "__main__":
    main()
