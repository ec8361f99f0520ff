"""One setting for every case: the shared comparison, and the classifier benchmark's pooling."""

import json

import pytest
from script_helpers import load_script

from hf_munba.evaluation.across_cases import across_cases_markdown, compare_across_cases
from hf_munba.evaluation.tradeoff import aggregate_first_best


def _agg(firsts, bests, steps=None):
    """aggregate_first_best over seeds; None in ``firsts`` = a seed that never met the criterion."""
    steps = steps or [10] * len(firsts)
    return aggregate_first_best([
        {"reached": f is not None, "first": f, "first_step": s if f is not None else None,
         "best": b, "best_step": s} for f, b, s in zip(firsts, bests, steps)])


def _cases():
    # "hard": only λ 1 forgets it; "easy": λ 0.1 keeps the most; ours forgets both
    return {"hard": {"munba": _agg([90, 92], [93, 93]), "weighted-0.1": _agg([None, None], [None, None]),
                     "weighted-1": _agg([88, 88], [91, 91])},
            "easy": {"munba": _agg([95, 95], [96, 96]), "weighted-0.1": _agg([97, 97], [98, 98]),
                     "weighted-1": _agg([93, 93], [94, 94]), "munba-power-0.2": _agg([96, 96], [97, 97])}}


def test_the_best_fixed_setting_must_meet_every_case_and_the_oracle_may_not():
    res = compare_across_cases(_cases())
    assert list(res["rows"]) == ["munba", "munba-power-0.2", "weighted-0.1", "weighted-1"]
    rows = res["rows"]
    assert rows["weighted-0.1"]["cases_forgotten"] == 1 and rows["weighted-0.1"]["first"] is None
    assert rows["weighted-1"]["first"] == pytest.approx(90.5)
    assert rows["munba"]["first"] == pytest.approx(93.0) and rows["munba"]["best"] == pytest.approx(94.5)
    # run on one case only: a row, never a mean
    assert rows["munba-power-0.2"]["cases_run"] == 1 and rows["munba-power-0.2"]["best"] is None
    first = res["verdict"]["first"]
    assert first["best_fixed"] == "weighted-1" and first["met"] is True
    # each case's own λ: 1 on "hard", 0.1 on "easy"
    assert res["oracle"]["cases"]["easy"]["first_setting"] == "weighted-0.1"
    assert res["oracle"]["first"] == pytest.approx((88 + 97) / 2)
    md = across_cases_markdown(res, noun="digit", tag="full")
    assert "0/2 seeds" in md and "not run" in md and "digits forgotten, every seed" in md
    assert "- full, first point: munba 93.0 (2/2 digits forgotten" in md and "met" in md


def test_no_verdict_while_a_lambda_misses_a_case_and_a_missed_case_fails():
    cases = _cases()
    cases["easy"]["weighted-3"] = _agg([90, 90], [90, 90])
    assert compare_across_cases(cases)["verdict"]["best"]["met"] is None
    cases = _cases()
    cases["hard"]["munba"] = _agg([90, None], [93, None])
    v = compare_across_cases(cases)["verdict"]["best"]
    assert v["met"] is False and v["ours_cases_forgotten"] == 1


def _bench_json(path, title, rows, **protocol):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"title": title, "criterion": "Acc(D_f) <= 5%", "seeds": [0, 1],
            "lr_grid": [0.01, 0.1], "eval_every": 2, "model": "tiny-resnet", "retain_objective": None,
            "recipes": {name: {"epochs": 3} for name in rows},
            "table": {name: {"at_forgetting": agg, "lr": 0.1} for name, agg in rows.items()},
            "runs": {}, "lr_search": {}, **protocol}
    path.write_text(json.dumps(data))
    return path


def test_classifier_benchmark_outputs_pool_by_case_and_refuse_incomparable_ones(tmp_path):
    bench = load_script("bench_digits_across_cases")
    c = _cases()
    hard = _bench_json(tmp_path / "a" / "digits_class.json",
                       "Class-wise forgetting (digit 3), tiny-resnet, seeds [0, 1]",
                       {**c["hard"], "ft": _agg([None, None], [None, None])})
    easy = _bench_json(tmp_path / "b" / "digits_class.json",
                       "Class-wise forgetting (digit 7), tiny-resnet, seeds [0, 1]", c["easy"])
    # the same case again, with munba's row repeated unchanged and a new row
    extra = _bench_json(tmp_path / "c" / "digits_class.json",
                        "Class-wise forgetting (digit 7), tiny-resnet, seeds [0, 1]",
                        {"munba": c["easy"]["munba"], "munba-power-0.5": _agg([94, 94], [95, 95])})
    cases = bench.load_cases([hard, easy, extra])
    assert list(cases) == ["class 3, seeds 0,1", "class 7, seeds 0,1"]
    assert "ft" not in cases["class 3, seeds 0,1"] and "munba-power-0.5" in cases["class 7, seeds 0,1"]
    out = tmp_path / "out"
    bench.main([str(hard), str(easy), str(extra), "--output_dir", str(out)])
    res = json.loads((out / "results.json").read_text())
    assert res["verdict"]["first"]["best_fixed"] == "weighted-1" and res["verdict"]["first"]["met"]
    assert "class 7, seeds 0,1: first (step) / best" in (out / "results.md").read_text()

    other_lr = _bench_json(tmp_path / "d" / "digits_random.json",
                           "Random 10% forgetting, tiny-resnet, seeds [0, 1]", c["easy"],
                           lr_grid=[0.1])
    with pytest.raises(ValueError, match="lr_grid"):
        bench.load_cases([hard, other_lr])
    vit = _bench_json(tmp_path / "e" / "digits_random.json",
                      "Random 10% forgetting, tiny-vit, seeds [0, 1]", c["easy"], model="tiny-vit")
    with pytest.raises(ValueError, match="model"):
        bench.load_cases([hard, vit])
    changed = _bench_json(tmp_path / "f" / "digits_class.json",
                          "Class-wise forgetting (digit 7), tiny-resnet, seeds [0, 1]",
                          {"munba": _agg([80, 80], [81, 81])})
    with pytest.raises(ValueError, match="different results"):
        bench.load_cases([easy, changed])
    recipe = tmp_path / "g" / "digits_class.json"
    _bench_json(recipe, "Class-wise forgetting (digit 5), tiny-resnet, seeds [0, 1]", c["easy"])
    data = json.loads(recipe.read_text())
    data["recipes"]["munba"] = {"epochs": 5}
    recipe.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="recipe"):
        bench.load_cases([easy, recipe])
    with pytest.raises(FileNotFoundError):
        bench.load_cases([tmp_path / "missing.json"])
