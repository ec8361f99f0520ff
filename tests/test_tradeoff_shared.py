"""The shared trade-off helpers added for the digits experiment: mean +- std, the best weighted
candidate at equal forgetting, and the curve panels of both trade-off figures."""

import math

import pytest
from PIL import Image

from hf_munba.evaluation.tradeoff import (aggregate_curves, aggregate_first_best,
                                          best_at_forgetting, mean_std, plot_tradeoff_curves)


def test_mean_std_skips_missing_values():
    assert mean_std([1.0, 3.0, None, float("nan")]) == {"mean": 2.0, "std": pytest.approx(2 ** 0.5),
                                                        "n": 2}
    assert mean_std([4.0]) == {"mean": 4.0, "std": 0.0, "n": 1}
    empty = mean_std([None])
    assert empty["n"] == 0 and math.isnan(empty["mean"]) and math.isnan(empty["std"])


def _fb(first, best, step=10):
    ok = first is not None
    return {"reached": ok, "first": first if ok else float("nan"), "first_step": step if ok else None,
            "best": best if ok else float("nan"), "best_step": step if ok else None}


def test_best_at_forgetting_needs_every_seed():
    cands = {"weighted-0.3": aggregate_first_best([_fb(80, 90), _fb(82, 88)]),
             "weighted-1": aggregate_first_best([_fb(85, 86), _fb(85, 86)]),
             "weighted-3": aggregate_first_best([_fb(99, 99), _fb(None, None)])}
    assert best_at_forgetting(cands, "best") == "weighted-0.3"  # 89 vs 86; weighted-3 missed a seed
    assert best_at_forgetting(cands, "first") == "weighted-1"
    tie = {"a": aggregate_first_best([_fb(1, 5)]), "b": aggregate_first_best([_fb(1, 5)])}
    assert best_at_forgetting(tie, "best") == "a"
    assert best_at_forgetting({"w": cands["weighted-3"]}, "best") is None
    assert best_at_forgetting({}, "best") is None


def test_classifier_tradeoff_figure_from_seed_means(tmp_path):
    curve = lambda f: [{"step": 0, "acc_forget": 100.0, "acc_retain": 99.0, "acc_test": 95.0},  # noqa: E731
                       {"step": 3, "acc_forget": f, "acc_retain": 97.0, "acc_test": 93.0}]
    curves = {"munba": aggregate_curves([curve(1.0), curve(3.0)]), "weighted-1": curve(6.0)}
    refs = {"retrain": {"acc_forget": 0.0, "acc_retain": 99.0, "acc_test": 94.0}}
    path = plot_tradeoff_curves(curves, str(tmp_path / "t.png"), title="t",
                                criterion_band=(-1.0, 5.0), references=refs)
    with Image.open(path) as im:
        assert im.size == (13 * 80, 10 * 80)
    assert not list(tmp_path.glob(".*.tmp"))
