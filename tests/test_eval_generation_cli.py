"""eval/evaluate_generation.py end to end on tiny models: every metric, two models (one with a
LoRA) side by side, model card, resume, and bad input refused before any model work."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hf_munba.evaluation.image_classification import load_classifier, predict
from hf_munba.evaluation.prompts import IMAGENETTE_CLASSES
from hf_munba.evaluation.report import CARD_BEGIN
from hf_munba.testing import (save_tiny_sd_pipeline, tiny_clip_model, tiny_clip_processor,
                              tiny_vit_classifier)

from eval_generation_helpers import one_torch_thread, save_tiny_lora  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "eval" / "evaluate_generation.py"


def _script_module():
    spec = importlib.util.spec_from_file_location("evaluate_generation", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from sklearn.datasets import load_sample_images
    from transformers import ViTImageProcessor

    root = tmp_path_factory.mktemp("assets")
    sd = save_tiny_sd_pipeline(root / "sd")
    lora = save_tiny_lora(sd, root / "lora")
    clf = root / "clf"
    tiny_vit_classifier(num_labels=10, image_size=16, num_channels=3,
                        label_names=IMAGENETTE_CLASSES).save_pretrained(clf)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(clf)
    clip = root / "clip"
    tiny_clip_model().save_pretrained(clip)
    tiny_clip_processor().save_pretrained(clip)
    ref = root / "ref"
    ref.mkdir()
    for i, arr in enumerate(load_sample_images().images * 2):
        Image.fromarray(arr).resize((32, 32)).rotate(90 * i).save(ref / f"{i}.png")
    return {"sd": sd, "lora": str(lora), "clf": str(clf), "clip": str(clip), "ref": str(ref),
            "root": root}


def _argv(a, out, *extra):
    return ["--model", f"sd={a['sd']}", "--model", f"munba={a['sd']}",
            "--lora", f"munba={a['lora']}", "--prompts", "imagenette", "--max_prompts", "2",
            "--num_images_per_prompt", "2", "--num_inference_steps", "1", "--height", "16",
            "--width", "16", "--output_dir", str(out), *extra]


ALL = ["--metrics", "nudity", "classification", "clip", "fid"]


def _metric_args(a):
    return ["--classifier", a["clf"], "--forget_classes", "tench", "--clip_model", a["clip"],
            "--fid_reference_dir", a["ref"], "--fid_feature_extractor", f"hf:{a['clip']}",
            "--model_card", "munba", "--grid_images", "3"]


def test_one_command_end_to_end(assets, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), *_argv(assets, out), *ALL,
                           *_metric_args(assets)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert list(res["models"]) == ["sd", "munba"] and res["num_images"] == 4
    assert res["models"]["munba"]["lora_dir"] == assets["lora"]

    # images: same seeds for both models, the LoRA really changes them
    man = [json.loads(l) for l in (out / "images" / "sd" / "metadata.jsonl").read_text().splitlines()]
    assert [(m["text"], m["seed"], m["label"]) for m in man] == [
        ("an image of a tench", 0, "tench"), ("an image of a tench", 1, "tench"),
        ("an image of a English springer", 2, "English springer"),
        ("an image of a English springer", 3, "English springer")]
    px = lambda model, m: np.asarray(Image.open(out / "images" / model / m["file_name"]))
    assert any(not np.array_equal(px("sd", m), px("munba", m)) for m in man)

    # nudity: one CSV row per (model, image) at the recorded threshold, table agrees with it
    with open(out / "nudenet_per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["threshold"] for r in rows} == {"0.6"}
    nud = res["metrics"]["nudity"]
    assert nud["threshold"] == 0.6
    for model in ("sd", "munba"):
        mine = [r for r in rows if r["model"] == model]
        assert nud["table"][model]["images"] == 4
        assert nud["table"][model]["belly"] == sum(int(r["belly"]) > 0 for r in mine)

    # classification: recompute the shares from the classifier's own predictions
    model, processor = load_classifier(assets["clf"])
    for name in ("sd", "munba"):
        preds = predict(model, processor, [out / "images" / name / m["file_name"] for m in man])
        want = [0, 0, 1, 1]
        table = res["metrics"]["classification"]["table"][name]
        hits = [int(p == w) for p, w in zip(preds, want)]
        assert table["forget_accuracy"] == pytest.approx(100 * sum(hits[:2]) / 2)
        assert table["retain_accuracy"] == pytest.approx(100 * sum(hits[2:]) / 2)
        assert (table["forget_images"], table["retain_images"]) == (2, 2)

    clip = res["metrics"]["clip"]["table"]
    fid = res["metrics"]["fid"]["table"]
    from hf_munba.evaluation.clip_score import clip_scores, load_clip, summarize_clip_scores

    clip_model, clip_processor = load_clip(assets["clip"])
    for name in ("sd", "munba"):  # recomputed from the saved images and their prompts
        want = summarize_clip_scores(clip_scores(
            clip_model, clip_processor, [out / "images" / name / m["file_name"] for m in man],
            [m["text"] for m in man]))
        assert clip[name] == pytest.approx(want)
        assert np.isfinite(fid[name]["fid"]) and fid[name]["reference_images"] == 4

    md = (out / "results.md").read_text()
    assert "NudeNet exposed-part counts (threshold 0.6)" in md and "| munba |" in md
    grid = Image.open(out / "grid.png")
    assert grid.size == (160 + 3 * 128, 2 * 128)
    card = (Path(assets["lora"]) / "README.md").read_text()
    assert CARD_BEGIN in card and "| munba |" in card
    # the munba numbers also reach the card's metadata (model-index), which the Hub renders
    import yaml

    (index,) = yaml.safe_load(card.split("---")[1])["model-index"]
    found = {m["type"]: m["value"] for r in index["results"] for m in r["metrics"]}
    assert found["nudity_belly"] == nud["table"]["munba"]["belly"]
    assert found["clip_clip_score"] == pytest.approx(clip["munba"]["clip_score"])
    assert found["classification_forget_accuracy"] == pytest.approx(
        res["metrics"]["classification"]["table"]["munba"]["forget_accuracy"])
    assert {r["dataset"]["name"] for r in index["results"]} == {
        "images generated from the imagenette prompts"}
    assert not (Path(assets["sd"]) / "README.md").exists()

    # a second run into the same folder: refused without --resume, reuses everything with it
    mod = _script_module()
    with pytest.raises(SystemExit, match="not empty"):
        mod.main(_argv(assets, out, "--metrics", "nudity"))
    stamps = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    mod.main(_argv(assets, out, "--metrics", "nudity", "--resume"))
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == stamps
    assert len((out / "nudenet_per_image.csv").read_text().splitlines()) == 9
    with pytest.raises(SystemExit, match="cannot resume"):
        mod.main(_argv(assets, out, "--metrics", "nudity", "--resume", "--seed", "5"))


@pytest.mark.parametrize("extra,match", [
    (["--metrics", "fid", "--fid_reference_dir", "{ref}"], "feature-extractor weights"),
    (["--metrics", "fid", "--fid_reference_dir", "{ref}", "--fid_feature_extractor",
      "pytorch-fid:/nowhere/pt_inception.pth"], "does not exist locally"),
    (["--metrics", "classification"], "needs --classifier"),
    (["--metrics", "classification", "--classifier", "{clf}", "--forget_classes", "parachute"],
     "no prompts"),
    (["--metrics", "clip"], "needs --clip_model"),
    (["--metrics", "nudity", "--nudenet_threshold", "0"], "threshold"),
    (["--metrics", "nudity", "--model_card", "other"], "not among the models"),
    (["--metrics", "nudity", "--output_dir", "{sd}"], "would contain the input"),
])
def test_bad_input_is_refused_before_any_work(assets, tmp_path, extra, match):
    out = tmp_path / "out"
    extra = [e.format(ref=assets["ref"], clf=assets["clf"], sd=assets["root"]) for e in extra]
    with pytest.raises(SystemExit, match=match):
        _script_module().main(_argv(assets, out, *extra))
    assert not out.exists()


def test_bad_model_arguments(assets, tmp_path):
    mod = _script_module()
    with pytest.raises(SystemExit, match="NAME must be one of"):
        mod.main(["--model", f"sd={assets['sd']}", "--lora", f"x={assets['lora']}",
                  "--prompts", "nudity", "--output_dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="not a saved diffusers pipeline"):
        mod.main(["--model", f"sd={tmp_path}", "--prompts", "nudity",
                  "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_every_model_family_is_evaluated_with_the_same_command(assets, tmp_path):
    """SDXL, SD 3 and Flux pipelines go through the same generation and metrics as SD 1.x."""
    from hf_munba.testing.families import save_tiny_family_pipeline

    models = []
    for family in ("sdxl", "sd3", "flux"):
        models += ["--model", f"{family}={save_tiny_family_pipeline(family, tmp_path / family)}"]
    out = tmp_path / "out"
    _script_module().main(models + [
        "--prompts", "imagenette", "--max_prompts", "1", "--num_images_per_prompt", "1",
        "--num_inference_steps", "1", "--height", "16", "--width", "16", "--output_dir", str(out),
        "--metrics", "classification", "--classifier", assets["clf"], "--forget_classes", "tench"])
    for family in ("sdxl", "sd3", "flux"):
        assert len(list((out / "images" / family).glob("*.png"))) == 1, family
    assert all(f in (out / "results.md").read_text() for f in ("sdxl", "sd3", "flux"))
