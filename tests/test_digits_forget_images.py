"""The per-image view of the forgotten prompt: the same images the evaluation counted, the remap
target drawn from the same noises, the weights swapped back, and the script's refusals."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hf_munba.testing.digits import DigitsRecipe, build_digits_models, digit_prompt, generate_digit_images
from hf_munba.testing.digits_forget_images import (ORIGINAL, REMAP_TARGET, forget_image_probabilities,
                                                   forget_images_markdown)
from hf_munba.testing.digits_unlearning import evaluate_checkpoints, load_digit_evaluator

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
GEN = dict(num_images_per_prompt=3, guidance_scale=2.0, num_inference_steps=2)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return build_digits_models(tmp_path_factory.mktemp("build"),
                               DigitsRecipe(vae_steps=2, unet_steps=2, classifier_epochs=1, num_images=60),
                               eval_guidance_scales=(), log=lambda *_: None)


def _save_unet(folder: Path, state):
    (folder / "unet").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()},
              str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    return str(folder)


@pytest.fixture(scope="module")
def run_folders(build, tmp_path_factory):
    """A 'run' holding the base UNet unchanged and one whose weights were moved."""
    pipe, _ = load_digit_evaluator(build.pipeline_path, build.classifier_path)
    state = pipe.unet.state_dict()
    root = tmp_path_factory.mktemp("runs")
    moved = {k: (v * 1.5 if k.endswith("conv_out.weight") else v) for k, v in state.items()}
    return _save_unet(root / "same", state), _save_unet(root / "moved", moved)


def test_noise_of_redraws_the_evaluation_images_of_one_prompt(build):
    pipe, _ = load_digit_evaluator(build.pipeline_path, build.classifier_path)
    prompts = [digit_prompt(d) for d in range(10)]
    every = generate_digit_images(pipe, prompts, 2, 2.0, seed=0, num_inference_steps=2).view(10, 2, 3, 16, 16)
    three = generate_digit_images(pipe, [digit_prompt(3)], 2, 2.0, seed=0, num_inference_steps=2,
                                  noise_of=[3])
    assert torch.allclose(three, every[3], atol=1e-5)
    # another prompt from the same noises is another image, not image 3's
    four = generate_digit_images(pipe, [digit_prompt(4)], 2, 2.0, seed=0, num_inference_steps=2,
                                 noise_of=[3])
    assert not torch.allclose(four, every[3])
    with pytest.raises(ValueError, match="one index per prompt"):
        generate_digit_images(pipe, prompts[:2], 1, 2.0, noise_of=[3])


def test_rows_are_the_images_the_evaluation_counted(build, run_folders):
    same, moved = run_folders
    report, images = forget_image_probabilities(
        build.pipeline_path, build.classifier_path, [("same", same, False), ("moved", moved, False)],
        forget_digit=2, remap_digit=3, **GEN)
    rows = report["rows"]
    assert list(rows) == [ORIGINAL, REMAP_TARGET, "same", "moved"]
    # the base weights in a run folder draw exactly the original's images
    assert torch.equal(images["same"], images[ORIGINAL]) and rows["same"] == rows[ORIGINAL]
    assert not torch.allclose(images["moved"], images[ORIGINAL])
    # the remap target is the original drawing prompt "3" from prompt "2"'s evaluation noises
    pipe, clf = load_digit_evaluator(build.pipeline_path, build.classifier_path)
    target = generate_digit_images(pipe, [digit_prompt(3)], 3, 2.0, 0, 2, noise_of=[2])
    assert torch.allclose(images[REMAP_TARGET], target, atol=1e-5)
    probs = clf(pixel_values=target).logits.softmax(-1)
    assert rows[REMAP_TARGET]["p_forget"] == pytest.approx(probs[:, 2].tolist(), abs=1e-5)
    assert rows[REMAP_TARGET]["p_remap"] == pytest.approx(probs[:, 3].tolist(), abs=1e-5)
    # each row's forget accuracy is the one evaluate_checkpoints reports for the same weights
    points = evaluate_checkpoints(build.pipeline_path, build.classifier_path,
                                  [(0, None), (1, moved)], lora=False, forget_digit=2, **GEN)
    assert rows[ORIGINAL]["forget_accuracy"] == pytest.approx(points[0]["forget_accuracy"])
    assert rows["moved"]["forget_accuracy"] == pytest.approx(points[1]["forget_accuracy"])
    for row in rows.values():
        assert row["forget_accuracy"] == pytest.approx(
            100 * sum(p == 2 for p in row["predicted"]) / 3)
    md = forget_images_markdown(report)
    assert "| model | forget acc (%) | image 0 | image 1 | image 2 |" in md
    assert md.count("\n| ") == 5  # the header and four rows


def test_bad_arguments_are_refused_before_generation(build, run_folders):
    same, _ = run_folders
    kw = dict(forget_digit=2, **GEN)
    with pytest.raises(ValueError, match="remap_digit must differ"):
        forget_image_probabilities("no-such-pipeline", "x", [], remap_digit=2, **kw)
    with pytest.raises(ValueError, match="unique"):
        forget_image_probabilities("no-such-pipeline", "x", [("a", same, False), ("a", same, False)],
                                   remap_digit=3, **kw)
    with pytest.raises(ValueError, match="unique"):
        forget_image_probabilities("no-such-pipeline", "x", [(ORIGINAL, same, False)], remap_digit=3, **kw)


def _experiment(tmp_path, build, run_folders):
    exp = tmp_path / "exp"
    (exp / "runs").mkdir(parents=True)
    os.symlink(run_folders[1], exp / "runs" / "munba-full-s0")
    results = {"settings": {"forget_digit": 2, "remap_digit": 3, **GEN},
               "build": {"root": build.root},
               "runs": [{"name": "munba-full-s0", "method": "munba", "variant": "full", "seed": 0},
                        {"name": "munba-lora-s0", "method": "munba", "variant": "lora", "seed": 0}]}
    (exp / "results.json").write_text(json.dumps(results))
    return exp


def test_script_end_to_end_and_its_refusals(tmp_path, build, run_folders):
    exp = _experiment(tmp_path, build, run_folders)
    script = [sys.executable, str(ROOT / "eval/digits_sd_forget_images.py")]

    def run(*args):
        return subprocess.run([*script, *map(str, args)], env=ENV, capture_output=True, text=True,
                              timeout=300)

    # the LoRA run's weights are not there: one error naming it, nothing written
    bad = run(exp)
    assert bad.returncode == 2 and "munba-lora-s0" in bad.stderr
    assert not (exp / "forget_images").exists()
    assert run(tmp_path).returncode == 2  # no results.json
    several = tmp_path / "several"
    several.mkdir()
    (several / "results.json").write_text(json.dumps({"settings": {"forget_digits": [2, 5]}}))
    assert "single forgotten digit" in run(several).stderr
    assert "matches" in run(exp, "--methods", "weighted-1").stderr
    assert "build" in run(exp, "--variants", "full", "--models_dir", tmp_path).stderr
    ok = run(exp, "--variants", "full")
    assert ok.returncode == 0, ok.stderr[-3000:]
    out = exp / "forget_images"
    report = json.loads((out / "forget_images.json").read_text())
    assert list(report["rows"]) == [ORIGINAL, REMAP_TARGET, "munba-full-s0"]
    assert (out / "forget_images.md").read_text() in ok.stdout
    from PIL import Image

    with Image.open(out / "forget_images.png") as g:
        assert g.size == (130 + 3 * 48, 3 * 48)
