#!/usr/bin/env python
"""Evaluate unlearned classifiers: Acc on D_f / D_r / D_t, MIA-efficacy, Avg. Gap vs retrain, run-time.

    python eval/evaluate_classifiers.py --dataset digits --forget_classes 3 \\
        --models munba=out/munba ft=out/ft --retrain out/retrain --output_dir eval_out

Each model is a folder written by training/train_munba_classifier.py (or any safetensors
image classifier / saved CLIP zero-shot classifier); run-time is read from its
unlearning_metrics.json when present. Writes results.{md,json,png} into --output_dir.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def model_sources(paths):
    """The CLIs' named test models (``tiny-resnet``, ``tiny-vit``: ``hf_munba.testing`` factories,
    which the library never imports); looked up only when a model is not a path, so evaluating
    saved folders imports no test code."""
    if all(os.path.exists(p) for p in paths):
        return {}
    from hf_munba.testing import CLASSIFIER_SOURCES

    return dict(CLASSIFIER_SOURCES)


class OneLineErrorParser(argparse.ArgumentParser):
    """Bad input: one ``error: ...`` line (exit status 2), without the usage block above it."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    p = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", required=True, help="name=path pairs")
    p.add_argument("--retrain", default=None, help="the model retrained from scratch on D_r (Avg. Gap reference)")
    p.add_argument("--dataset", default=None, help="'digits'")
    p.add_argument("--train_dir", default=None, help="local imagefolder (as used for training)")
    p.add_argument("--test_size", type=float, default=0.2)
    p.add_argument("--split_seed", type=int, default=0)
    p.add_argument("--forget_classes", default=None)
    p.add_argument("--forget_fraction", type=float, default=None)
    p.add_argument("--forget_indices", default=None)
    p.add_argument("--forget_seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--title", default=None)
    a = p.parse_args(argv)
    models = {}
    for item in a.models:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            p.error(f"--models entries must be name=path, got {item!r}")
        if name in models or name == "retrain":
            p.error(f"duplicate or reserved model name {name!r}")
        models[name] = path
    if a.retrain:
        models = {"retrain": a.retrain, **models}
    from hf_munba.classification.data import require_sklearn
    from hf_munba.classification.model_io import validate_model_source

    try:
        require_sklearn("eval/evaluate_classifiers.py (MIA-efficacy)")
        a.model_sources = model_sources(models.values())
        for name, path in models.items():
            try:
                validate_model_source(path, a.model_sources)
            except ValueError as e:
                if name != "retrain":
                    raise
                raise ValueError(f"--retrain: {e}; it is the model trained from scratch on D_r "
                                 "(training/train_munba_classifier.py --method retrain, as in the README)") from None
        if (a.dataset is None) == (a.train_dir is None):
            raise ValueError("give exactly one of --dataset digits or --train_dir")
        if a.dataset not in (None, "digits"):
            raise ValueError(f"unknown --dataset {a.dataset!r}")
    except (ValueError, ImportError) as e:
        p.error(str(e))
    a.model_paths = models
    return a, p


def main(argv=None):
    a, parser = parse_args(argv)
    from hf_munba.classification.data import digits_dataset, imagefolder_dataset, validate_imagefolder
    from hf_munba.classification.model_io import load_image_classifier
    from hf_munba.evaluation.classification import evaluate_models, results_markdown, write_results
    from hf_munba.classification.forget_sets import forget_spec_from_strings, split_forget_retain

    try:
        if a.train_dir:
            validate_imagefolder(a.train_dir)
            data = None
        else:
            data = digits_dataset(test_size=a.test_size, seed=a.split_seed)
            names = data["train"].features["labels"].names
            spec = forget_spec_from_strings(a.forget_classes, a.forget_fraction, a.forget_indices,
                                            a.forget_seed, {n: i for i, n in enumerate(names)})
            split_forget_retain(data["train"], spec)
    except ValueError as e:
        parser.error(str(e))
    models, runtimes = {}, {}
    for name, path in a.model_paths.items():
        model, processor = load_image_classifier(path, model_sources=a.model_sources)
        models[name] = model.eval()
        rec = os.path.join(path, "unlearning_metrics.json")
        if os.path.isfile(rec):
            with open(rec) as f:
                runtimes[name] = json.load(f).get("metrics", {}).get("runtime_s", float("nan"))
        if data is None:
            if processor is None:
                parser.error(f"model {path} has no image processor (preprocessor_config.json); needed for --train_dir")
            data = imagefolder_dataset(a.train_dir, processor, test_size=a.test_size, seed=a.split_seed)
            names = data["train"].features["labels"].names
            spec = forget_spec_from_strings(a.forget_classes, a.forget_fraction, a.forget_indices,
                                            a.forget_seed, {n: i for i, n in enumerate(names)})
    forget, retain = split_forget_retain(data["train"], spec)
    results = evaluate_models(models, forget, retain, data["test"], reference="retrain" if a.retrain else None,
                              runtimes=runtimes, batch_size=a.batch_size)
    title = a.title or f"Unlearning {spec.describe()}"
    paths = write_results(results, a.output_dir, name="results", title=title)
    print(results_markdown(results, title=title))
    print(json.dumps(paths))


if __name__ == "__main__":
    main()
