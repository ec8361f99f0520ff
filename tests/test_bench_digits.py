"""Trade-off curves of the classifier digits benchmark: the curve callback, the first/best numbers at
equal forgetting on scripted curves, the lr-selection rule, and one tiny end-to-end benchmark run
(one seed, two rows, a few steps) whose JSON must agree with those functions."""

import json
import math
from pathlib import Path

import pytest
import torch
from script_helpers import load_script

from hf_munba.evaluation.tradeoff import (AccuracyCurveCallback, ForgetCriterion, aggregate_curves,
                                          aggregate_first_best, first_and_best, select_run)

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    return load_script("bench_digits_unlearning")


def _curve(rows):
    return [{"step": s, "acc_forget": f, "acc_test": t, "acc_retain": r} for s, f, t, r in rows]


# A scripted class-wise curve: the start (step 0) meets nothing; forgetting first reached at
# step 6 (test 80), the best test accuracy while forgotten is at step 12 (88, tied at 15 ->
# the earlier one), step 9 rebounds above the threshold and must not count.
SCRIPTED = _curve([(0, 100.0, 97.0, 100.0), (3, 40.0, 95.0, 99.0), (6, 5.0, 80.0, 97.0),
                   (9, 6.0, 90.0, 98.0), (12, 0.0, 88.0, 98.5), (15, 1.0, 88.0, 98.0),
                   (18, 2.0, 86.0, 97.5)])


def test_first_and_best_on_a_scripted_curve():
    r = first_and_best(SCRIPTED, ForgetCriterion.at_most(5.0))
    assert r["reached"] is True
    assert (r["first"], r["first_step"]) == (80.0, 6)
    assert (r["best"], r["best_step"]) == (88.0, 12)
    assert r["first_point"]["acc_retain"] == 97.0 and r["best_point"]["acc_retain"] == 98.5
    # another key: the best retained accuracy while forgotten
    rr = first_and_best(SCRIPTED, ForgetCriterion.at_most(5.0), key="acc_retain")
    assert (rr["first"], rr["best"], rr["best_step"]) == (97.0, 98.5, 12)
    # a stricter threshold: the first point moves to step 12
    strict = first_and_best(SCRIPTED, ForgetCriterion.at_most(0.5))
    assert (strict["first_step"], strict["best_step"], strict["first"]) == (12, 12, 88.0)


def test_match_criterion_and_the_start_never_counts():
    # random-sample forgetting: equal forgetting = within 2 points of retrain's 97.0
    curve = _curve([(0, 98.0, 97.0, 100.0), (2, 98.5, 96.0, 100.0), (4, 96.5, 94.0, 99.0),
                    (6, 95.1, 96.2, 99.0), (8, 94.9, 96.5, 98.0), (10, 97.2, 93.0, 99.0)])
    c = ForgetCriterion.match(97.0, 2.0)
    assert c.met(95.0) and c.met(99.0) and not c.met(94.9) and not c.met(99.1) and not c.met(float("nan"))
    r = first_and_best(curve, c)
    # step 0 is within the window but is the original model: it must not count
    assert (r["first_step"], r["first"]) == (2, 96.0)
    assert (r["best_step"], r["best"]) == (6, 96.2)  # 96.5 at step 8 is outside the window
    never = first_and_best(curve, ForgetCriterion.at_most(5.0))
    assert never["reached"] is False and math.isnan(never["first"]) and never["best_step"] is None
    with pytest.raises(ValueError, match="increasing"):
        first_and_best(list(reversed(curve)), c)
    with pytest.raises(ValueError):
        ForgetCriterion("match", target=97.0)
    with pytest.raises(ValueError):
        ForgetCriterion("below", threshold=1.0)


def test_aggregation_over_seeds():
    a = _curve([(0, 100.0, 96.0, 100.0), (3, 10.0, 90.0, 99.0)])
    b = _curve([(0, 100.0, 98.0, 100.0), (3, 0.0, 86.0, 97.0), (6, 0.0, 85.0, 97.0)])
    agg = aggregate_curves([a, b])
    assert [p["step"] for p in agg] == [0, 3, 6]
    assert agg[1]["acc_test"]["mean"] == 88.0 and agg[1]["acc_test"]["std"] == pytest.approx(2 ** 0.5 * 2)
    assert agg[2]["acc_test"] == {"mean": 85.0, "std": 0.0, "n": 1}
    c = ForgetCriterion.at_most(5.0)
    fb = aggregate_first_best([first_and_best(x, c) for x in (a, b)])
    assert (fb["reached"], fb["seeds"]) == (1, 2)
    assert fb["first"]["mean"] == 86.0 and fb["first"]["n"] == 1 and fb["best"]["mean"] == 86.0


def test_select_run_rule():
    c = ForgetCriterion.at_most(5.0)
    hi = _curve([(0, 100, 97, 100), (3, 0, 85, 99), (6, 0, 90, 99)])      # best 90, first 85
    lo = _curve([(0, 100, 97, 100), (3, 0, 88, 99), (6, 0, 90, 99)])      # best 90, first 88
    never = _curve([(0, 100, 97, 100), (3, 50, 96, 100)])
    cands = {0.1: first_and_best(hi, c), 0.03: first_and_best(lo, c), 0.01: first_and_best(never, c)}
    assert select_run(cands, {0.1: 0, 0.03: 0, 0.01: 45}) == 0.03       # best tied -> first point
    none = {0.1: first_and_best(never, c), 0.01: first_and_best(never, c)}
    assert select_run(none, {0.1: 45.0, 0.01: 20.0}) == 0.01          # closest to the criterion
    assert select_run(none, {0.1: 20.0, 0.01: 20.0}) == 0.1           # full tie: first listed


def _same(a, b):
    """Equality of JSON-like values, NaN equal to NaN (a criterion never met stores NaN)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


@pytest.fixture(scope="module")
def digit_sets():
    from hf_munba.classification.data import InMemoryDataset, digits_dataset
    from hf_munba.classification.forget_sets import ForgetSpec, split_forget_retain

    data = digits_dataset()
    f, r = split_forget_retain(data["train"], ForgetSpec(classes=[3]))
    return {"forget": InMemoryDataset.from_dataset(f), "retain": InMemoryDataset.from_dataset(r),
            "test": InMemoryDataset.from_dataset(data["test"])}


def _tiny_run(sets, callbacks, max_steps=5):
    from transformers import TrainingArguments

    from hf_munba.testing import tiny_resnet_classifier
    from hf_munba.classification.trainer import MunbaTrainer

    model = tiny_resnet_classifier(seed=0)
    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=32, learning_rate=0.1,
                             max_steps=max_steps, optim="sgd", max_grad_norm=1.0, seed=0,
                             save_strategy="no", report_to=[], logging_strategy="no",
                             disable_tqdm=True, use_cpu=True)
    MunbaTrainer(model=model, args=args, train_dataset=sets["retain"], forget_dataset=sets["forget"],
                 method="munba", callbacks=list(callbacks)).train()
    return model


def test_curve_callback_points_and_no_effect_on_training(tmp_path, monkeypatch, digit_sets):
    monkeypatch.chdir(tmp_path)
    sets = {"forget": digit_sets["forget"], "test": digit_sets["test"]}
    cb = AccuracyCurveCallback(sets, eval_every=2)
    with_cb = _tiny_run(digit_sets, [cb])
    without = _tiny_run(digit_sets, [])
    # steps 0 (the start), every 2nd, and the last one; in order; every accuracy a percentage
    assert [p["step"] for p in cb.points] == [0, 2, 4, 5]
    for p in cb.points:
        assert set(p) == {"step", "epoch", "acc_forget", "acc_test"}
        assert 0.0 <= p["acc_forget"] <= 100.0 and 0.0 <= p["acc_test"] <= 100.0
    first, last = cb.points[0], cb.points[-1]
    assert (first["acc_forget"], first["acc_test"]) != (last["acc_forget"], last["acc_test"])  # it trained
    assert cb.eval_seconds > 0
    # evaluating in between draws no random numbers and leaves train mode: identical weights
    for a, b in zip(with_cb.state_dict().values(), without.state_dict().values()):
        assert torch.equal(a, b)
    # the last point is the final model
    from hf_munba.evaluation.classification import evaluate_unlearning

    end = evaluate_unlearning(with_cb, sets["forget"], sets["forget"], sets["test"])
    assert cb.points[-1]["acc_forget"] == pytest.approx(end["acc_forget"])
    assert cb.points[-1]["acc_test"] == pytest.approx(end["acc_test"])
    with pytest.raises(ValueError):
        AccuracyCurveCallback(sets, eval_every=0)


def test_row_names_and_arguments():
    bench = _bench()
    assert bench.row_spec("weighted-0.3") == ("weighted", {"forget_weight": 0.3})
    assert bench.row_spec("ft") == ("ft", {})
    assert bench.row_spec("munba") == ("munba", {})
    assert bench.row_spec("munba-target-2.5") == ("munba", {"forget_target": 2.5, "forget_target_mode": "absolute"})
    assert bench.row_spec("munba-power-0.5") == ("munba", {"bargaining_power_forget": 0.5})
    # the paper's plain rule: power 1, no satisfaction rule built for the classifiers' forget loss
    method, extra = bench.row_spec("munba-paper")
    from hf_munba.classification.trainer import MunbaArguments

    paper = MunbaArguments(method=method, **extra)
    assert paper.make_forget_rule() is None and paper.bargaining_power_forget == 1.0
    assert bench.config_key("munba-target-2.5") != bench.config_key("munba")
    # the power the trainer picks per forget set: munba is munba-paper on classes, power 0.2 on samples
    assert bench.config_key("munba", setting="class") == bench.config_key("munba-paper", setting="class")
    assert bench.config_key("munba", setting="random") == bench.config_key("munba-power-0.2", setting="random")
    assert bench.config_key("munba", setting="random") != bench.config_key("munba-paper", setting="random")
    assert bench.config_key("weighted-1") != bench.config_key("weighted-0.3")
    # --retain_objective reaches every row with both players, and only those
    assert bench.row_spec("weighted-0.3", "distill") == ("weighted", {"forget_weight": 0.3,
                                                                     "retain_objective": "distill"})
    assert bench.row_spec("munba-power-0.5", "distill")[1]["retain_objective"] == "distill"
    assert bench.row_spec("ft", "distill") == ("ft", {}) and bench.row_spec("ga", "distill") == ("ga", {})
    assert bench.config_key("munba", "distill") != bench.config_key("munba")
    for bad in ("weighted-x", "weighted--1", "munba-power-0", "munba-target-", "retrain", "nope"):
        with pytest.raises(ValueError):
            bench.row_spec(bad)
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "munba,munba"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--recipes", '{"random:nope": {"lr": 1}}'])
    a = bench.parse_args(["--recipes", '{"random:munba": {"lr": 0.02}}'])
    assert a.recipes["random"]["munba"] == {"epochs": 3, "lr": 0.02} and "lr" not in a.recipes["class"]["munba"]
    # the default rows: munba, the lambda sweep (at least 0.1, 0.3, 1, 3), the baselines
    assert {"munba", "munba-paper", "weighted-0.1", "weighted-0.3", "weighted-1", "weighted-3"} <= set(a.methods)
    assert len(a.lr_grid) >= 3 and all(1e-4 <= lr <= 1e-1 for lr in a.lr_grid)


def test_comparison_statement_names_the_best_weighted():
    bench = _bench()
    s = lambda m: {"mean": m, "std": 0.0, "n": 2}  # noqa: E731
    row = lambda first, best, reached=2: {"at_forgetting": {  # noqa: E731
        "reached": reached, "seeds": 2, "first": s(first), "best": s(best)}}
    table = {"munba": row(85.0, 88.0), "weighted-0.3": row(84.0, 89.0), "weighted-1": row(86.0, 87.0),
             "weighted-3": row(99.0, 99.0, reached=1)}  # not on every seed: never the best
    assert bench.best_weighted(table, "first") == "weighted-1"
    assert bench.best_weighted(table, "best") == "weighted-0.3"
    text = bench.comparison_text(table)
    assert "first point: munba 85.00 ± 0.00 vs best weighted (weighted-1)" in text and "does NOT keep" in text
    assert "best point: munba 88.00 ± 0.00 vs best weighted (weighted-0.3)" in text and "(-1.00 points)" in text


def test_tiny_benchmark_end_to_end(tmp_path):
    bench = _bench()
    out = tmp_path / "out"
    recipes = {"original": {"epochs": 4}, "retrain": {"epochs": 1}, "munba": {"max_steps": 5},
               "munba-paper": {"max_steps": 5}, "weighted-1": {"max_steps": 5}}
    bench.main(["--seeds", "0", "--methods", "munba,munba-paper,weighted-1", "--settings", "class",
                "--lr_grid", "0.1,0.03", "--eval_every", "2", "--output_dir", str(out),
                "--recipes", json.dumps(recipes)])
    res = json.loads((out / "digits_class.json").read_text())
    assert (out / "digits_class.png").stat().st_size > 0
    md = (out / "digits_class.md").read_text()
    # --replot rebuilds the markdown and the PNG from the JSON alone
    (out / "digits_class.md").unlink()
    (out / "digits_class.png").unlink()
    bench.main(["--replot", "--settings", "class", "--output_dir", str(out)])
    assert (out / "digits_class.md").read_text() == md and (out / "digits_class.png").stat().st_size > 0
    assert "| munba | " in md and "| weighted-1 | " in md and "D_t @first" in md
    assert set(res["table"]) == {"original", "retrain", "munba", "munba-paper", "weighted-1"}
    # munba-paper is the default munba configuration for the classifiers' forget loss: one run, two rows
    if bench.config_key("munba-paper") == bench.config_key("munba"):
        assert res["table"]["munba-paper"]["same_run_as"] == "munba"
        assert res["runs"]["munba-paper"][0]["curve"] == res["runs"]["munba"][0]["curve"]
        assert "`munba-paper` runs exactly the configuration of `munba`" in md
    criterion = ForgetCriterion(**res["criteria_per_seed"]["0"])
    for row in ("munba", "weighted-1"):
        (run,) = res["runs"][row]
        steps = [p["step"] for p in run["curve"]]
        assert steps == [0, 2, 4, 5]
        for p in run["curve"]:
            assert {"acc_forget", "acc_retain", "acc_test"} <= set(p)
        # the numbers at equal forgetting are those of first_and_best on the stored curve
        assert _same(run["at_forgetting"], first_and_best(run["curve"], criterion))
        # the end-of-run Acc(D_f) is the curve's last point
        assert run["end"]["acc_forget"] == pytest.approx(run["curve"][-1]["acc_forget"])
        # the lr search ran both values on seed 0 and the winner follows the stated rule
        search = res["lr_search"][row]
        assert set(search["runs"]) == {"0.1", "0.03"}
        cands = {float(lr): r["at_forgetting"] for lr, r in search["runs"].items()}
        dist = {float(lr): bench.forget_distance(criterion, r["end"]["acc_forget"])
                for lr, r in search["runs"].items()}
        assert search["chosen_lr"] == run["lr"] == res["table"][row]["lr"] == select_run(cands, dist)
        assert search["runs"][f"{run['lr']:g}"]["curve"] == run["curve"]
        agg = res["table"][row]["curve"]
        assert [p["step"] for p in agg] == steps and agg[-1]["acc_test"]["mean"] == run["curve"][-1]["acc_test"]


def test_default_rows_come_from_the_method_registry():
    """Every registered classifier method is a default row (weighted as its lambda sweep), so a
    new method is benchmarked without editing the benchmark."""
    from hf_munba.unlearning.methods import METHODS, UnlearningMethod, available_methods, register_method

    bench = _bench()
    rows = bench.default_rows()
    assert set(available_methods("classification")) - {"retrain", "rl", "weighted"} <= set(rows)
    assert {f"weighted-{w:g}" for w in bench.WEIGHTS} <= set(rows) and "retrain" not in rows
    assert rows.index("munba") < rows.index("weighted-1") < rows.index("ft")
    try:
        @register_method("test-new-baseline")
        class NewBaseline(UnlearningMethod):
            front_ends = ("classification",)

        assert "test-new-baseline" in bench.default_rows()
        assert bench.row_spec("test-new-baseline") == ("test-new-baseline", {})
    finally:
        METHODS.pop("test-new-baseline", None)


def test_the_paper_baselines_are_rows_and_iu_searches_its_influence_scale(tmp_path):
    """iu, be, bs and shs are default rows; iu (which does not train) searches iu_alpha, not the
    learning rate, has a two-point curve (the original model, then its one edit) and the table
    names the value that won."""
    bench = _bench()
    assert {"iu", "be", "bs", "shs"} <= set(bench.default_rows())
    out = tmp_path / "out"
    recipes = {"original": {"max_steps": 10}, "retrain": {"max_steps": 2}, "be": {"max_steps": 3}}
    bench.main(["--seeds", "0", "--methods", "iu,be", "--settings", "class", "--lr_grid", "0.1",
                "--iu_alpha_grid", "1,20", "--eval_every", "2", "--output_dir", str(out),
                "--recipes", json.dumps(recipes)])
    res = json.loads((out / "digits_class.json").read_text())
    search = res["lr_search"]["iu"]
    assert search["searched"] == "iu_alpha" and set(search["runs"]) == {"1", "20"}
    assert "chosen_lr" not in search and search["chosen"] in (1.0, 20.0)
    (run,) = res["runs"]["iu"]
    assert [p["step"] for p in run["curve"]] == [0, 1] and run["lr"] is None
    assert run["curve"][0]["acc_forget"] == pytest.approx(res["runs"]["original"][0]["end"]["acc_forget"])
    assert run["end"]["acc_forget"] == pytest.approx(run["curve"][-1]["acc_forget"])
    assert res["table"]["iu"]["searched"] == {"name": "iu_alpha", "value": search["chosen"]}
    assert res["table"]["be"]["searched"] == {"name": "lr", "value": 0.1} and "be" not in res["lr_search"]
    md = (out / "digits_class.md").read_text()
    assert f"| iu | iu_alpha {search['chosen']:g} |" in md and "| be | lr 0.1 |" in md


def test_default_rows_in_a_fresh_process_include_the_classifier_only_methods():
    """The CLI builds its default rows at import, before anything imported hf_munba.classification
    (which registers salun, l1, iu, be, bs, shs): they must be there all the same."""
    import subprocess
    import sys

    code = ("import importlib.util as u; s = u.spec_from_file_location('b', %r); m = u.module_from_spec(s); "
            "s.loader.exec_module(m); print(','.join(m.ALL_METHODS))" % str(ROOT / "eval" / "bench_digits_unlearning.py"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    rows = out.stdout.strip().splitlines()[-1].split(",")
    assert {"salun", "l1", "iu", "be", "bs", "shs"} <= set(rows)
    assert rows.index("ft") < rows.index("ga") < rows.index("iu") < rows.index("be") < rows.index("shs")
