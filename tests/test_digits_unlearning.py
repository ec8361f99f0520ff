"""The digits class-forgetting experiment: real D_f / D_r folders, run arguments, summaries, and
one end-to-end run of eval/digits_sd_experiment.py on a drastically shortened build."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from script_helpers import load_script

from hf_munba.testing.digits import DigitsRecipe, build_digits_models, digit_prompt
from hf_munba.testing.digits_unlearning import (METHODS, best_weighted, curve_markdown,
                                        method_args, summarize_curves, summarize_runs, summary_markdown,
                                        train_script_args, write_digit_imagefolders,
                                        write_digit_prompt_csv)
from hf_munba.diffusion.data import check_disjoint, load_imagefolder

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def test_imagefolders_hold_real_disjoint_digits(tmp_path):
    paths = write_digit_imagefolders(tmp_path / "d", forget_digit=7)
    forget = load_imagefolder(paths["forget"], role="forget")
    retain = load_imagefolder(paths["retain"], role="retain")
    assert len(forget) + len(retain) == 1797
    assert set(forget.captions) == {digit_prompt(7)}
    assert digit_prompt(7) not in set(retain.captions) and len(set(retain.captions)) == 9
    check_disjoint(forget, retain)  # raises on a shared image
    from PIL import Image

    with Image.open(forget.images[0]) as im:
        assert im.mode == "RGB" and im.size == (16, 16)
    # same digit: reused; another digit: refused
    assert write_digit_imagefolders(tmp_path / "d", forget_digit=7) == paths
    with pytest.raises(ValueError, match="forget_digit"):
        write_digit_imagefolders(tmp_path / "d", forget_digit=2)
    with pytest.raises(ValueError, match="0..9"):
        write_digit_imagefolders(tmp_path / "e", forget_digit=10)
    assert not (tmp_path / "e").exists()


def test_prompt_csv_labels_every_digit(tmp_path):
    from hf_munba.evaluation.prompts import load_prompt_set

    recs = load_prompt_set(write_digit_prompt_csv(tmp_path / "p.csv"), num_images_per_prompt=2)
    assert [(r.prompt, r.label) for r in recs[::2]] == [(digit_prompt(d), str(d)) for d in range(10)]


def test_train_script_args_remap_to_next_digit_by_default():
    data = {"forget": "F", "retain": "R"}
    a = train_script_args(method="munba", pretrained="P", data=data, output_dir="O",
                          forget_digit=9, use_lora=True)
    assert a[a.index("--forget_class") + 1] == "nine" and a[a.index("--remap_class") + 1] == "zero"
    assert a[a.index("--prompt_template") + 1].format("nine") == digit_prompt(9)
    assert "--use_lora" in a and a[a.index("--method") + 1] == "munba"
    ga = train_script_args(method="weighted-ga", pretrained="P", data=data, output_dir="O", forget_digit=1)
    assert ga[ga.index("--forget_objective") + 1] == "ga" and "--use_lora" not in ga
    with pytest.raises(ValueError, match="unknown method"):
        train_script_args(method="salun", pretrained="P", data=data, output_dir="O", forget_digit=1)
    with pytest.raises(ValueError, match="differ"):
        train_script_args(method="weighted-ga", pretrained="P", data=data, output_dir="O", forget_digit=1,
                          remap_digit=1)


def test_summary_is_mean_and_std_over_seeds():
    runs = [{"method": "munba", "variant": "full", "seed": s, "forget_accuracy": f,
             "retain_accuracy": r, "seconds": 10.0} for s, f, r in [(0, 0.0, 90.0), (1, 10.0, 94.0)]]
    base = {"forget_accuracy": 100.0, "retain_accuracy": 100.0}
    (row,) = summarize_runs(runs, base)
    assert row["forget_accuracy"] == 5.0 and row["retain_accuracy"] == 92.0
    assert abs(row["forget_accuracy_std"] - 7.0711) < 1e-3 and row["retain_ratio"] == 92.0
    md = summary_markdown([row], base)
    assert "| munba | full | 5.0 ± 7.1 | 92.0 ± 2.8 | 92% | 10 |" in md


def test_experiment_end_to_end_on_a_tiny_build(tmp_path):
    build = build_digits_models(tmp_path / "build", DigitsRecipe(vae_steps=2, unet_steps=2,
                                                                 classifier_epochs=1, num_images=60),
                                eval_guidance_scales=(), log=lambda *_: None)
    out = tmp_path / "exp"
    cmd = [sys.executable, str(ROOT / "eval/digits_sd_experiment.py"), "--output_dir", str(out),
           "--models_dir", build.root, "--methods", "munba", "weighted-1", "--variants", "lora",
           "--seeds", "0", "--max_train_steps", "2", "--eval_every", "1",
           "--num_images_per_prompt", "1", "--num_inference_steps", "2", "--forget_digit", "5"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["original"]["name"] == "original"
    run = res["runs"][0]
    assert run["name"] == "munba-lora-s0"
    # one image per prompt: each digit's accuracy is 0 or 100; forget = digit 5's, retained = the
    # mean of the other nine
    per_class = run["per_class"]
    assert set(per_class) == {str(d) for d in range(10)}
    assert set(per_class.values()) <= {0.0, 100.0}
    assert run["forget_accuracy"] == per_class["5"]
    assert run["retain_accuracy"] == pytest.approx(
        sum(v for d, v in per_class.items() if d != "5") / 9)
    assert run["training_metrics"]["skipped_steps"] == 0
    # every evaluation point is kept: the original (step 0), checkpoint 1, the final model (2)
    assert [p["step"] for p in run["curve"]] == [0, 1, 2]
    assert run["curve"][-1]["retain_accuracy"] == run["retain_accuracy"]
    assert run["curve"][0]["forget_accuracy"] == res["original"]["forget_accuracy"]
    assert (out / "runs" / "munba-lora-s0" / "pytorch_lora_weights.safetensors").is_file()
    assert not list((out / "runs" / "munba-lora-s0").glob("checkpoint-*"))
    assert {(c["method"], c["variant"]) for c in res["curves"]} == {("munba", "lora"),
                                                                   ("weighted-1", "lora")}
    assert set(res["verdict"]["lora"]) == {"first_retain", "best_retain"}
    md = (out / "results.md").read_text()
    assert "| munba | lora |" in md and "first point" in md and "End of run" in md
    assert (out / "curves.png").is_file() and (out / "grid.png").is_file()
    # 1 image per prompt: the forget digit's image + one per other digit, for original + 2 runs
    from PIL import Image

    with Image.open(out / "grid.png") as g:
        assert g.size == (130 + 10 * 48, 3 * 48)
    # a non-empty output dir is refused before any work
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "not empty" in again.stderr


def test_curve_summary_first_and_best_points_over_seeds():
    def run(seed, method, pts):
        return {"method": method, "variant": "full", "seed": seed,
                "curve": [{"step": 10 * i, "forget_accuracy": f, "retain_accuracy": r}
                          for i, (f, r) in enumerate(pts)]}

    runs = [run(0, "munba", [(100, 94), (4, 80), (0, 90), (10, 92)]),
            run(1, "munba", [(100, 94), (50, 85), (5, 86), (0, 88)]),
            run(0, "weighted-1", [(100, 94), (0, 70), (0, 75), (0, 76)]),
            run(1, "weighted-1", [(100, 94), (0, 72), (0, 77), (0, 78)]),
            run(0, "weighted-3", [(100, 94), (0, 95), (0, 95), (0, 95)]),
            run(1, "weighted-3", [(100, 94), (20, 95), (20, 95), (20, 95)])]
    rows = {r["method"]: r for r in summarize_curves(runs, threshold=5.0)}
    m = rows["munba"]
    assert m["first_retain"] == 83.0 and m["first_step"] == 15.0  # 80 at step 10, 86 at step 20
    assert m["best_retain"] == 89.0 and m["reached"] == 2  # 90 (seed 0), 88 (seed 1)
    assert m["curve"][1]["forget_accuracy"] == 27.0
    assert rows["weighted-3"]["reached"] == 1
    # weighted-3 missed the threshold in one seed: it cannot be the best lambda
    assert best_weighted(list(rows.values()), "full", "best_retain")["method"] == "weighted-1"
    md = curve_markdown(list(rows.values()), [], {"forget_accuracy": 100.0, "retain_accuracy": 94.0})
    assert "| munba | full | – | – | 83.0 ± 4.2 | 15 | 89.0 ± 1.4 | 2/2 |" in md


def test_methods_registry_is_what_the_docs_compare():
    assert list(METHODS) == ["munba", "munba-paper", "weighted-0.01", "weighted-0.03",
                             "weighted-0.1", "weighted-0.3", "weighted-1", "weighted-3",
                             "weighted-ga", "retain"]
    # munba: the training script's defaults (the distilled retain loss); munba-paper: the paper's
    assert METHODS["munba"] == ["--method", "munba", "--forget_objective", "remap"]
    assert METHODS["munba-paper"][-2:] == ["--retain_objective", "denoise"]
    assert METHODS["weighted-0.3"][:4] == ["--method", "weighted", "--forget_weight", "0.3"]


def test_a_weighted_sum_at_any_lambda_is_a_row_and_bad_names_are_refused():
    # a λ between the sweep's values checks a gap in the baseline's search
    assert method_args("weighted-0.2") == ["--method", "weighted", "--forget_weight", "0.2",
                                           "--forget_objective", "remap"]
    assert method_args("weighted-0.3") == METHODS["weighted-0.3"]
    assert method_args("munba") == METHODS["munba"] and method_args("munba") is not METHODS["munba"]
    for bad in ("weighted", "weighted-0", "weighted--1", "weighted-nan", "weighted-inf",
                "weighted-0.20", "weighted-1e-1", "weighted-x", "salun"):
        with pytest.raises(ValueError, match="unknown method"):
            method_args(bad)
    a = train_script_args(method="weighted-0.2", pretrained="P", data={"forget": "F", "retain": "R"},
                          output_dir="O", forget_digit=3)
    assert a[a.index("--forget_weight") + 1] == "0.2"


@pytest.mark.parametrize("script", ["digits_sd_experiment", "digits_sd_multiconcept",
                                    "digits_attack_experiment"])
def test_experiment_scripts_take_only_known_methods_and_default_to_known_ones(script, capsys):
    mod = load_script(script)
    base = ["--output_dir", "unused-missing-dir"]
    for m in mod.parse_args(base).methods:  # argparse checks no default against a type
        method_args(m)
    assert mod.parse_args(base + ["--methods", "munba", "weighted-0.2"]).methods == ["munba", "weighted-0.2"]
    with pytest.raises(SystemExit):
        mod.parse_args(base + ["--methods", "weighted"])
    assert "unknown method 'weighted'" in capsys.readouterr().err
    assert not Path("unused-missing-dir").exists()


def test_experiment_retain_objective_reaches_every_row_but_the_papers_and_ft():
    exp = load_script("digits_sd_experiment")
    args = exp.parse_args(["--output_dir", "unused-missing-dir", "--retain_objective", "denoise",
                           "--munba_flags", "--bargaining_power_forget 0.1"])
    assert exp.method_flags(args, "munba") == ["--bargaining_power_forget", "0.1",
                                               "--retain_objective", "denoise"]
    assert exp.method_flags(args, "weighted-0.3") == ["--retain_objective", "denoise"]
    assert exp.method_flags(args, "munba-paper") == exp.method_flags(args, "retain") == []
    default = exp.parse_args(["--output_dir", "unused-missing-dir"])
    assert exp.method_flags(default, "weighted-1") == []  # the training script's default: distill


def test_curve_summary_is_the_shared_tradeoff_math():
    """The digits numbers are evaluation.tradeoff's first_and_best / aggregate_first_best, so the
    SD and classifier experiments judge "forgotten" by one rule: the start (step 0) never counts."""
    from hf_munba.evaluation.tradeoff import ForgetCriterion, aggregate_first_best, first_and_best

    curve = [{"step": 0, "forget_accuracy": 0.0, "retain_accuracy": 99.0},  # already "forgotten"
             {"step": 5, "forget_accuracy": 3.0, "retain_accuracy": 80.0},
             {"step": 9, "forget_accuracy": 9.0, "retain_accuracy": 95.0}]
    never = [{**p, "forget_accuracy": 50.0} for p in curve]
    runs = [{"method": "munba", "variant": "lora", "seed": 0, "curve": curve},
            {"method": "munba", "variant": "lora", "seed": 1, "curve": never}]
    (row,) = summarize_curves(runs, threshold=5.0)
    assert (row["first_retain"], row["first_step"], row["best_retain"]) == (80.0, 5.0, 80.0)
    assert row["reached"] == 1 and row["first_retain_std"] == 0.0
    assert row["per_seed"]["1"] == {"first_retain": None, "first_step": None, "best_retain": None}
    crit = ForgetCriterion.at_most(5.0)
    per_seed = [first_and_best(c, crit, key="retain_accuracy", forget_key="forget_accuracy")
                for c in (curve, never)]
    # compared as JSON: the unreached seed's NaNs are equal there
    assert json.dumps(row["at_forgetting"]) == json.dumps(aggregate_first_best(per_seed))
    assert row["curve"][1] == {"step": 5, "forget_accuracy": 26.5,
                               "forget_accuracy_std": pytest.approx(33.234, abs=1e-3),
                               "retain_accuracy": 80.0, "retain_accuracy_std": 0.0}
    # unequal evaluation steps between seeds cannot be averaged point by point
    with pytest.raises(ValueError, match="different steps"):
        summarize_curves([runs[0], {**runs[1], "curve": never[:2]}])
    # no weighted row reached the threshold on every seed: no best lambda
    weighted = [{**r, "method": "weighted-1"} for r in runs]
    assert best_weighted(summarize_curves(weighted), "lora", "first_retain") is None


def test_digit_curves_plot_is_written_atomically(tmp_path):
    from hf_munba.testing.digits_unlearning import plot_digit_curves, plot_tradeoff_curves

    def run(method, variant, seed, f):
        return {"method": method, "variant": variant, "seed": seed,
                "curve": [{"step": 0, "forget_accuracy": 100.0, "retain_accuracy": 95.0},
                          {"step": 4, "forget_accuracy": f, "retain_accuracy": 90.0}]}

    rows = summarize_curves([run("munba", "full", 0, 2.0), run("weighted-1", "full", 0, 8.0),
                             run("munba", "lora", 0, 4.0)])
    base = {"forget_accuracy": 100.0, "retain_accuracy": 95.0}
    path = plot_digit_curves(rows, base, tmp_path / "c.png", 5.0, title="forget 3")
    from PIL import Image

    with Image.open(path) as im:
        assert im.size == (int(6.2 * 2 * 110), 5 * 110)  # one panel per variant
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.warns(FutureWarning, match="plot_digit_curves"):
        plot_tradeoff_curves(rows, base, tmp_path / "old.png", 5.0)
    assert (tmp_path / "old.png").stat().st_size > 0
