"""The shared evaluation pieces: one results writer, one table helper, one image grid, one model
argument parser, one NudeNet box rule; the old names stay importable (with a FutureWarning)."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hf_munba.evaluation import attack, classification, nudity, report
from hf_munba.evaluation.cli import model_specs, parse_name_path
from hf_munba.evaluation.grid import image_grid
from hf_munba.evaluation.results import format_cell, markdown_table, write_results

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- writer and table
def test_write_results_writes_json_and_markdown_atomically(tmp_path, monkeypatch):
    res = {"a": 1.5, "b": [1, 2], "path": Path("x")}
    paths = write_results(tmp_path / "new", res, name="r", markdown=lambda r: f"# {r['a']}",
                          json_default=str)
    assert paths == {"json": str(tmp_path / "new" / "r.json"),
                     "markdown": str(tmp_path / "new" / "r.md")}
    assert json.loads(Path(paths["json"]).read_text()) == {"a": 1.5, "b": [1, 2], "path": "x"}
    assert Path(paths["markdown"]).read_text() == "# 1.5\n"
    # no markdown: only the JSON
    assert write_results(tmp_path / "j", {"x": 1}) == {"json": str(tmp_path / "j" / "results.json")}
    assert sorted(p.name for p in (tmp_path / "j").iterdir()) == ["results.json"]

    # a crash while replacing the markdown keeps the previous file whole and leaves the new JSON
    old = {"json": Path(paths["json"]).read_text(), "md": Path(paths["markdown"]).read_text()}
    real_replace = os.replace

    def crash_on_md(src, dst):
        if str(dst).endswith(".md"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_md)
    with pytest.raises(OSError, match="disk full"):
        write_results(tmp_path / "new", {"a": 2.0}, name="r", markdown="# 2")
    assert Path(paths["markdown"]).read_text() == old["md"]
    assert json.loads(Path(paths["json"]).read_text()) == {"a": 2.0}


def test_cells_and_tables():
    assert format_cell(3) == "3" and format_cell(2.0) == "2.00" and format_cell("x") == "x"
    assert format_cell(None) == "–" and format_cell(float("nan")) == "–"
    assert format_cell({"mean": 5.0, "std": 1.414, "n": 2}) == "5.00 ± 1.41"
    assert format_cell({"mean": 5.0, "std": 0.0, "n": 1}) == "5.00"
    assert format_cell({"mean": float("nan"), "std": float("nan"), "n": 0}) == "–"
    assert format_cell(1.25, digits=1) == "1.2"
    assert markdown_table(["m", "v"], [["a", 1.0], ["b", None]]) == (
        "| m | v |\n|---|---|\n| a | 1.00 |\n| b | – |")


def test_classification_tables_through_the_one_writer(tmp_path):
    res = {"retrain": {"acc_forget": 0.0, "acc_retain": 100, "runtime_s": float("nan")},
           "munba": {"acc_forget": {"mean": 5.0, "std": 1.0, "n": 3}}}
    md = classification.classification_markdown(res, title="t")
    assert md.startswith("**t**\n\n| Method | Acc D_f | Acc D_r | Acc D_t |")
    assert "| retrain | 0.00 | 100.00 | – | – | – | – |" in md  # an int metric still 2 decimals
    assert "| munba | 5.00 ± 1.00 | – |" in md
    paths = classification.write_classification_results(tmp_path, res, name="cls", title="t")
    assert set(paths) == {"json", "markdown", "png"}
    assert Path(paths["markdown"]).read_text() == md
    assert open(paths["png"], "rb").read(4) == b"\x89PNG"
    assert not list(tmp_path.glob(".*.tmp"))


def test_old_names_warn_and_do_what_they_did(tmp_path):
    res = {"munba": {"acc_forget": 1.0}}
    with pytest.warns(FutureWarning, match="write_classification_results"):
        old = classification.write_results(res, str(tmp_path / "c"), name="x", title="t")
    assert old["md"] == old["markdown"] == str(tmp_path / "c" / "x.md") and Path(old["png"]).is_file()
    with pytest.warns(FutureWarning, match="classification_markdown"):
        assert classification.results_markdown(res) == classification.classification_markdown(res)
    gen = {"prompt_set": "p", "num_images": 1, "models": {"sd": {}},
           "generation": {"guidance_scale": 7.5, "num_inference_steps": 2}, "metrics": {}}
    with pytest.warns(FutureWarning, match="generation_markdown"):
        assert report.results_markdown(gen) == report.generation_markdown(gen)
    with pytest.warns(FutureWarning, match="results.write_results"):
        paths = report.write_results(tmp_path / "g", gen)
    assert Path(paths["markdown"]).read_text() == report.generation_markdown(gen)
    with pytest.warns(FutureWarning, match="attack_markdown"):
        assert attack.results_markdown(_attack_results(), []) == attack.attack_markdown(
            _attack_results(), [])
    # the shared pieces are the same objects under their old homes, not copies
    assert report.image_grid is image_grid and report.markdown_table is markdown_table
    assert attack.AttackModel is model_specs(["a=b"])[0].__class__


def _attack_results():
    return {"detector": {"detector": "nudenet", "classes": ["X"], "class_list": "benchmark",
                         "threshold": 0.45},
            "attack": {"num_adv_tokens": 5, "num_blocks": 2, "steps_per_block": 1,
                       "learning_rate": 0.01, "weight_decay": 0.1},
            "generation": {"guidance_scale": 7.5, "num_inference_steps": 2},
            "prompt_set": "nudity", "n": 1, "original": "o", "seed": 0,
            "models": {"m": {"n": 1, "asr_pre": 0.0, "asr_post": 100.0, "attack_successes": 1,
                             "mean_steps_to_success": 40.0}}}


def test_attack_markdown_uses_the_shared_table():
    md = attack.attack_markdown(_attack_results(), [])
    assert "| m | 1 | 0.00 | 100.00 | 1 | 40.00 |" in md


# ---------------------------------------------------------------- grid
def _png(path, color, size=(16, 16)):
    Image.new("RGB", size, color).save(path)
    return path


def test_grid_pads_short_rows_labels_rows_and_accepts_pil_images(tmp_path):
    red = _png(tmp_path / "r.png", (255, 0, 0), (10, 20))  # resized to the cell
    blue = Image.new("RGB", (16, 16), (0, 0, 255))
    grid = image_grid({"first": [red, blue], "second": [blue]}, tmp_path / "g.png", cell=16,
                      label_width=30)
    on_disk = np.asarray(Image.open(tmp_path / "g.png"))
    assert np.array_equal(on_disk, np.asarray(grid)) and on_disk.shape == (32, 30 + 32, 3)
    assert on_disk[8, 38].tolist() == [255, 0, 0] and on_disk[8, 54].tolist() == [0, 0, 255]
    assert on_disk[24, 38].tolist() == [0, 0, 255] and on_disk[24, 54].tolist() == [255] * 3
    label = on_disk[:, :30]
    assert (label < 128).any()  # the row names are drawn in the strip
    assert not list(tmp_path.glob(".*.tmp"))


def test_grid_without_labels_keeps_native_size_like_the_training_grid(tmp_path):
    a = _png(tmp_path / "a.png", (0, 255, 0), (12, 8))
    grid = image_grid({0: [a, a, a], 1: [a]}, cell=None, label_width=0, background="black")
    px = np.asarray(grid)
    assert px.shape == (16, 36, 3)
    assert px[12, 30].tolist() == [0, 0, 0] and px[12, 4].tolist() == [0, 255, 0]
    with pytest.raises(ValueError, match="no images"):
        image_grid({"x": []})


# ---------------------------------------------------------------- CLI model arguments
def test_model_and_lora_arguments():
    specs = model_specs(["sd=/m/sd", "/m/munba/"], ["munba=/l/munba"])
    assert [(s.name, s.model_dir, s.lora_dir) for s in specs] == [
        ("sd", "/m/sd", None), ("munba", "/m/munba/", "/l/munba")]
    assert parse_name_path("a=b=c", "--model") == ("a", "b=c")
    with pytest.raises(ValueError, match="NAME=PATH or PATH"):
        parse_name_path("=x", "--model")
    with pytest.raises(ValueError, match="NAME must be one of"):
        model_specs(["sd=/m"], ["/l/munba"])  # a LoRA is never attached by a guessed name
    with pytest.raises(ValueError, match="NAME must be one of"):
        model_specs(["sd=/m"], ["other=/l"])


@pytest.mark.parametrize("script", ["evaluate_generation.py", "attack_unlearned.py"])
def test_both_scripts_report_a_malformed_model_as_one_error_line(script, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(script[:-3], ROOT / "eval" / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = ["--model", "sd=", "--prompts", "nudity", "--output_dir", str(tmp_path / "o")]
    if script == "attack_unlearned.py":
        argv += ["--original", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        mod.main(argv)
    assert str(e.value).startswith("error: --model must be NAME=PATH or PATH")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- NudeNet boxes
def test_one_box_rule_for_the_table_and_the_attack():
    dets = [{"class": "BELLY_EXPOSED", "score": 0.6}, {"class": "BELLY_EXPOSED", "score": 0.7},
            {"class": "FACE_FEMALE", "score": 0.99}, {"class": "ANUS_EXPOSED", "score": 0.8}]
    paper = [lab for _, lab in nudity.EXPOSED_CLASSES]
    assert nudity.exposed_detections(dets, 0.6, paper) == dets[:2]
    assert nudity.exposed_detections(dets, 0.6, paper, strict=True) == dets[1:2]
    assert nudity.exposed_detections(dets, 0.6, attack.NUDENET_BENCHMARK_CLASSES) == [dets[0],
                                                                                      dets[1],
                                                                                      dets[3]]
    assert nudity.count_exposed(dets, 0.6)["belly"] == 2
    assert attack.nudenet_success(dets, 0.6, paper) == (True, {"hits": {"BELLY_EXPOSED": 0.7}})


# ---------------------------------------------------------------- import graph
def _imports(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod
            yield from (f"{mod}.{a.name}" for a in node.names)


def test_evaluation_never_imports_the_testing_package():
    offenders = {str(p.relative_to(ROOT)): m for p in (ROOT / "hf_munba" / "evaluation").glob("*.py")
                 for m in _imports(p) if m.startswith("hf_munba.testing")}
    assert offenders == {}
    # the walk resolves relative imports (``from .nudity``, ``from ..testing``) to full names
    seen = set(_imports(ROOT / "hf_munba" / "evaluation" / "report.py"))
    assert "hf_munba.evaluation.nudity" in seen and "hf_munba.nudity" not in seen
    assert "hf_munba.utils.atomic_save" in set(_imports(ROOT / "hf_munba" / "testing" / "digits.py"))
    code = ("import sys, hf_munba.evaluation.attack, hf_munba.evaluation.generative, "
            "hf_munba.evaluation.classification, hf_munba.evaluation.tradeoff, "
            "hf_munba.evaluation.cli, hf_munba.evaluation.grid, hf_munba.evaluation.report; "
            "print(sorted(m for m in sys.modules if m.startswith('hf_munba.testing')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
