"""One setting for every digit: pooling experiments, the fixed-λ selection and the verdict."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hf_munba.testing.digits_comparison import (MULTICONCEPT_PROTOCOL_KEYS, PROTOCOL_KEYS,
                                                across_digits_markdown, across_pairs_markdown,
                                                compare_across_digits, compare_across_pairs,
                                                load_experiments, load_multiconcept_experiments)

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"train_params": "xattn", "max_train_steps": 40, "eval_every": 20, "train_batch_size": 8,
            "learning_rate": 3e-4, "lora_learning_rate": 3e-3, "retain_objective": None,
            "forget_threshold": 5.0, "rank": 4, "guidance_scale": 2.0, "num_images_per_prompt": 10,
            "num_inference_steps": 10, "build_seed": 0, "build_unet_steps": None, "munba_flags": []}
ORIGINAL = {"forget_accuracy": 100.0, "retain_accuracy": 100.0}


def _run(method, seed, forget, retain, variant="full"):
    """A run forgetting as ``forget`` (at steps 20, 40) while keeping ``retain``."""
    curve = [{"step": 0, **ORIGINAL}] + [
        {"step": 20 * (i + 1), "forget_accuracy": f, "retain_accuracy": r}
        for i, (f, r) in enumerate(zip(forget, retain))]
    return {"method": method, "variant": variant, "seed": seed, "curve": curve,
            "forget_accuracy": forget[-1], "retain_accuracy": retain[-1]}


def _write(path, digit, runs, **settings):
    path.mkdir(parents=True)
    data = {"settings": {**SETTINGS, "forget_digit": digit, **settings},
            "build": {"root": "/cache/x", "metrics": {"vae_reconstruction_mse": 0.0016}},
            "original": dict(ORIGINAL), "runs": runs}
    (path / "results.json").write_text(json.dumps(data))
    return path


def _digits(tmp_path):
    """Digit 2 is hard (λ 0.01 never forgets it), digit 3 easy (λ 0.01 keeps the most)."""
    two = _write(tmp_path / "two", 2, [
        *[_run("munba", s, [0, 0], [95, 97]) for s in (0, 1)],
        *[_run("weighted-0.01", s, [60, 40], [100, 100]) for s in (0, 1)],
        *[_run("weighted-0.3", s, [0, 0], [94, 96]) for s in (0, 1)]])
    three_lam = _write(tmp_path / "three_lam", 3, [
        *[_run("weighted-0.01", s, [30, 0], [100, 99]) for s in (0, 1)],
        *[_run("weighted-0.3", s, [0, 0], [90, 92]) for s in (0, 1)]])
    three_munba = _write(tmp_path / "three_munba", 3, [
        *[_run("munba", s, [0, 0], [97, 99]) for s in (0, 1)]])
    return [two, three_lam, three_munba]


def test_a_fixed_lambda_counts_only_if_it_forgets_every_digit(tmp_path):
    experiments = load_experiments(_digits(tmp_path))
    assert list(experiments) == [2, 3] and len(experiments[3]["runs"]) == 6
    res = compare_across_digits(experiments)
    full = res["variants"]["full"]
    rows = full["rows"]
    assert rows["weighted-0.01"]["cases_forgotten"] == 1 and not rows["weighted-0.01"]["every_case"]
    assert rows["weighted-0.01"]["first"] is None
    assert rows["weighted-0.3"]["first"] == pytest.approx((94 + 90) / 2)
    assert rows["munba"]["first"] == pytest.approx((95 + 97) / 2)
    assert rows["munba"]["best"] == pytest.approx((97 + 99) / 2)
    v = full["verdict"]["first"]
    assert v["best_fixed"] == "weighted-0.3" and v["met"] is True
    # the oracle picks each digit's own λ: 0.3 on "two", 0.01 on "three" (first point 99, step 40)
    assert full["oracle"]["cases"]["3"]["first_setting"] == "weighted-0.01"
    assert full["oracle"]["first"] == pytest.approx((94 + 99) / 2)
    md = across_digits_markdown(res)
    assert "1/2 seeds" not in md and "0/2 seeds" in md  # λ 0.01 on "two": no seed forgot
    assert "best single λ weighted-0.3" in md and ": met" in md


def test_munba_that_misses_a_digit_does_not_meet_it(tmp_path):
    paths = _digits(tmp_path)
    misses = _write(tmp_path / "five", 5, [
        _run("munba", 0, [0, 0], [99, 99]), _run("munba", 1, [20, 10], [99, 99]),
        *[_run(m, s, [0, 0], [98, 98]) for m in ("weighted-0.01", "weighted-0.3") for s in (0, 1)]])
    res = compare_across_digits(load_experiments(paths + [misses]))
    v = res["variants"]["full"]["verdict"]["best"]
    assert v["ours_cases_forgotten"] == 2 and v["met"] is False
    assert "1/2 seeds" in across_digits_markdown(res)


def test_a_lambda_missing_on_a_digit_is_not_compared(tmp_path):
    two, three_lam, three_munba = _digits(tmp_path)
    extra = _write(tmp_path / "three_extra", 3, [_run("weighted-1", s, [0, 0], [99, 100])
                                                  for s in (0, 1)])
    res = compare_across_digits(load_experiments([two, three_lam, three_munba, extra]))
    v = res["variants"]["full"]["verdict"]["first"]
    assert v["baselines_not_on_every_case"] == ["weighted-1"] and v["best_fixed"] == "weighted-0.3"
    assert v["met"] is None  # weighted-1 might have beaten munba on "two": no verdict yet
    assert "not run" in across_digits_markdown(res)
    assert "n/a: run every λ on every digit" in across_digits_markdown(res)
    only_three = compare_across_digits(load_experiments([three_munba, extra]))
    assert only_three["variants"]["full"]["verdict"]["first"]["best_fixed"] == "weighted-1"
    no_lambda = compare_across_digits(load_experiments([three_munba]))
    assert no_lambda["variants"]["full"]["verdict"]["first"]["met"] is None


@pytest.mark.parametrize("change", [{"learning_rate": 1e-4}, {"num_images_per_prompt": 30},
                                    {"munba_flags": ["--satisfied_power_forget", "0.01"]}])
def test_incomparable_experiments_are_refused(tmp_path, change):
    paths = _digits(tmp_path)
    other = _write(tmp_path / "other", 7, [_run("munba", 0, [0, 0], [99, 99])], **change)
    key = next(iter(change))
    with pytest.raises(ValueError, match=key if key in PROTOCOL_KEYS else "munba_flags"):
        load_experiments(paths + [other])


def test_the_same_run_twice_and_another_build_are_refused(tmp_path):
    paths = _digits(tmp_path)
    again = _write(tmp_path / "again", 3, [_run("munba", 1, [0, 0], [90, 90])])
    with pytest.raises(ValueError, match="munba full seed 1 on digit 3 is in both"):
        load_experiments(paths + [again])
    build = tmp_path / "build"
    _write(build, 7, [])
    data = json.loads((build / "results.json").read_text())
    data["build"]["metrics"]["vae_reconstruction_mse"] = 0.0017
    (build / "results.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="different builds"):
        load_experiments(paths + [build])
    with pytest.raises(FileNotFoundError, match="no results.json"):
        load_experiments([tmp_path / "missing"])


def test_script_writes_the_tables(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "eval" / "digits_sd_across_digits.py"),
                           *map(str, _digits(tmp_path)), "--output_dir", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["variants"]["full"]["verdict"]["first"]["best_fixed"] == "weighted-0.3"
    assert res["sources"]["3"][0].endswith("three_lam/results.json")
    assert "# One setting for every digit" in (out / "results.md").read_text()


# --- several digits at once (eval/digits_sd_multiconcept.py outputs) ---------------------------

MULTI_SETTINGS = {k: v for k, v in SETTINGS.items() if k in MULTICONCEPT_PROTOCOL_KEYS}
MULTI_ORIGINAL = {"forget_accuracy": 100.0, "retain_accuracy": 100.0,
                  "per_class": {str(d): 100.0 for d in range(10)}}


def _multi_run(method, mode, seed, forget, retain, params="full"):
    run = _run(method, seed, forget, retain, variant=f"{params}/{mode}")
    return {**run, "mode": mode, "params": params}


def _write_multi(path, digits, runs, **settings):
    path.mkdir(parents=True)
    data = {"settings": {**MULTI_SETTINGS, "forget_digits": list(digits), **settings},
            "original": json.loads(json.dumps(MULTI_ORIGINAL)), "runs": runs}
    (path / "results.json").write_text(json.dumps(data))
    return path


def _pairs(tmp_path):
    """3+7 is easy (pooled λ 0.3 forgets it and keeps the most), 2+5 hard (it does not)."""
    easy = _write_multi(tmp_path / "easy", (3, 7), [
        *[_multi_run("munba", "per_concept", s, [0, 0], [96, 97]) for s in (0, 1)],
        *[_multi_run("weighted-0.3", "pooled", s, [0, 0], [98, 99]) for s in (0, 1)],
        *[_multi_run("weighted-1", "pooled", s, [0, 0], [90, 93]) for s in (0, 1)]])
    hard = _write_multi(tmp_path / "hard", (2, 5), [
        *[_multi_run("munba", "per_concept", s, [10, 0], [95, 96]) for s in (0, 1)],
        *[_multi_run("weighted-0.3", "pooled", s, [30, 10], [97, 97]) for s in (0, 1)]])
    hard_lam1 = _write_multi(tmp_path / "hard_lam1", (2, 5), [
        *[_multi_run("weighted-1", "pooled", s, [0, 0], [85, 88]) for s in (0, 1)]])
    return [easy, hard, hard_lam1]


def test_one_method_and_mode_for_every_pair(tmp_path):
    experiments = load_multiconcept_experiments(_pairs(tmp_path))
    assert list(experiments) == ["3+7", "2+5"] and len(experiments["2+5"]["runs"]) == 6
    full = compare_across_pairs(experiments)["variants"]["full"]
    rows = full["rows"]
    assert list(rows)[0] == "munba/per_concept"
    assert rows["weighted-0.3/pooled"]["cases_forgotten"] == 1
    assert rows["weighted-1/pooled"]["first"] == pytest.approx((90 + 85) / 2)
    assert rows["munba/per_concept"]["best"] == pytest.approx((97 + 96) / 2)
    # each pair's own best: λ 0.3 on the easy pair, λ 1 (the only one that forgets) on the hard
    assert full["oracle"]["cases"]["3+7"]["first_setting"] == "weighted-0.3/pooled"
    assert full["oracle"]["cases"]["2+5"]["first_setting"] == "weighted-1/pooled"
    for point in ("first", "best"):
        assert full["verdict"][point]["best_fixed"] == "weighted-1/pooled"
        assert full["verdict"][point]["met"] is True
    md = across_pairs_markdown(compare_across_pairs(experiments))
    assert "forget 3+7: first (step) / best" in md and "1/2" in md


def test_incomparable_or_repeated_multiconcept_runs_are_refused(tmp_path):
    paths = _pairs(tmp_path)
    steps = _write_multi(tmp_path / "steps", (0, 8), [], max_train_steps=50)
    with pytest.raises(ValueError, match="max_train_steps"):
        load_multiconcept_experiments(paths + [steps])
    build = _write_multi(tmp_path / "build", (0, 8), [])
    data = json.loads((build / "results.json").read_text())
    data["original"]["per_class"]["4"] = 90.0
    (build / "results.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="different builds"):
        load_multiconcept_experiments(paths + [build])
    again = _write_multi(tmp_path / "again", (3, 7), [_multi_run("munba", "per_concept", 1,
                                                                 [0, 0], [90, 90])])
    with pytest.raises(ValueError, match="munba full/per_concept seed 1 forgetting 3\\+7 is in both"):
        load_multiconcept_experiments(paths + [again])
    single = _write(tmp_path / "single", 3, [_run("munba", 0, [0, 0], [99, 99])])
    with pytest.raises(ValueError, match="no forget_digits"):
        load_multiconcept_experiments([single])


def test_multiconcept_script_writes_the_tables(tmp_path):
    out = tmp_path / "out"
    script = ROOT / "eval" / "digits_sd_multiconcept_across_pairs.py"
    proc = subprocess.run([sys.executable, str(script), *map(str, _pairs(tmp_path)),
                           "--output_dir", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["variants"]["full"]["verdict"]["best"]["best_fixed"] == "weighted-1/pooled"
    assert res["sources"]["2+5"][1].endswith("hard_lam1/results.json")
    assert "# One setting for every set of forgotten digits" in (out / "results.md").read_text()
    bad = subprocess.run([sys.executable, str(script), str(tmp_path / "missing"),
                          "--output_dir", str(tmp_path / "never")],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "no results.json" in bad.stderr
    assert not (tmp_path / "never").exists()
