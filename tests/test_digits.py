"""The digits build: real data, determinism, caching, save/from_pretrained round trips, bad input.

A drastically shortened recipe (a few optimizer steps) keeps this fast; the full recipe's numbers
come from ``training/build_digits_sd.py`` and are reported in docs/digits.md.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hf_munba.testing.digits import (
    DigitsRecipe,
    build_digits_models,
    classify_digit_images,
    digit_prompt,
    generate_digit_images,
    load_digits,
    load_or_build_digits_models,
    recipe_hash,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = DigitsRecipe(seed=3, vae_steps=3, unet_steps=3, classifier_epochs=1, num_images=100)
TINY_ARGS = ["--seed", "3", "--vae_steps", "3", "--unet_steps", "3", "--classifier_epochs", "1",
             "--num_images", "100"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def _weights(folder):
    out = {}
    for f in sorted(Path(folder).rglob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.relative_to(folder)}:{k}"] = v
    return out


@pytest.fixture(scope="module")
def script_build(tmp_path_factory):
    """The real build script, run once in a subprocess, into a cache dir."""
    cache = tmp_path_factory.mktemp("cache")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "training/build_digits_sd.py"), "--cache_dir", str(cache),
         *TINY_ARGS, "--eval_guidance_scales", "2", "--eval_images_per_digit", "1"],
        env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cache, json.loads(proc.stdout[proc.stdout.index("{"):])


def test_load_digits_is_real_data_in_range():
    images, labels, captions = load_digits(16)
    assert images.shape == (1797, 3, 16, 16)
    assert torch.equal(images[:, 0], images[:, 2])  # gray repeated over RGB
    assert images.min() == -1.0 and images.max() == 1.0
    assert sorted(set(labels.tolist())) == list(range(10))
    assert captions[0] == digit_prompt(int(labels[0])) == f"a handwritten digit {['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine'][int(labels[0])]}"
    assert torch.bincount(labels).min() >= 170


def test_build_lands_in_recipe_hash_dir_and_is_reused(script_build):
    cache, out = script_build
    target = cache / recipe_hash(TINY)
    assert Path(out["root"]) == target
    assert {p.name for p in target.iterdir()} == {"pipeline", "classifier", "build_info.json"}
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp dir left
    info = json.loads((target / "build_info.json").read_text())
    assert info["recipe"] == TINY.to_dict()
    # the recorded test accuracy is the saved classifier's on the held-out split, recomputed here
    from transformers import AutoModelForImageClassification

    from hf_munba.testing.digits import _split

    images, labels, _ = load_digits(TINY.resolution)
    keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(TINY.seed))
    keep = keep[:TINY.num_images].sort().values
    images, labels = images[keep], labels[keep]
    _, test_idx = _split(len(images), TINY.test_fraction, TINY.seed)
    clf = AutoModelForImageClassification.from_pretrained(target / "classifier").eval()
    acc = (classify_digit_images(clf, images[test_idx]) == labels[test_idx]).float().mean().item()
    assert info["metrics"]["classifier_test_accuracy"] == pytest.approx(acc, abs=1e-6)
    messages = []
    arts = load_or_build_digits_models(TINY, cache_dir=cache, log=messages.append)
    assert arts.root == str(target) and messages == [f"reusing cached digits models in {target}"]
    assert recipe_hash(TINY) != recipe_hash(dataclasses.replace(TINY, seed=4))


def test_build_is_deterministic_by_seed(script_build, tmp_path):
    cache, _ = script_build
    again = build_digits_models(tmp_path / "again", TINY, eval_guidance_scales=(),
                                log=lambda *_: None)
    a, b = _weights(cache / recipe_hash(TINY)), _weights(again.root)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_saved_pipeline_and_classifier_round_trip(script_build):
    from diffusers import StableDiffusionPipeline
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    cache, _ = script_build
    root = cache / recipe_hash(TINY)
    pipe = StableDiffusionPipeline.from_pretrained(root / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.in_channels == 3 and pipe.vae.config.scaling_factor != 0.18215
    kw = dict(num_inference_steps=3, guidance_scale=2.0)
    pt = pipe(digit_prompt(3), generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images
    npy = pipe(digit_prompt(3), generator=torch.Generator().manual_seed(0), output_type="np", **kw).images
    pil = pipe(digit_prompt(3), generator=torch.Generator().manual_seed(0), **kw).images
    assert pt.shape == (1, 3, 16, 16) and npy.shape == (1, 16, 16, 3)
    assert pil[0].mode == "RGB" and pil[0].size == (16, 16)
    assert np.allclose(pt.permute(0, 2, 3, 1).numpy(), npy, atol=1e-6)
    again = generate_digit_images(pipe, [digit_prompt(3)], 1, 2.0, seed=0, num_inference_steps=3)
    assert torch.allclose(again, pt * 2 - 1, atol=1e-6)

    clf = AutoModelForImageClassification.from_pretrained(root / "classifier").eval()
    proc = AutoImageProcessor.from_pretrained(root / "classifier")
    images, labels, _ = load_digits(16)
    # the processor maps uint8 RGB PIL images to the [-1, 1] range the classifier trained on
    from PIL import Image

    u8 = ((images[:8] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    pv = proc(images=[Image.fromarray(a.numpy(), mode="RGB") for a in u8],
              return_tensors="pt")["pixel_values"]
    assert pv.shape == (8, 3, 16, 16)
    assert torch.allclose(pv, images[:8], atol=1 / 127.5)
    assert torch.equal(classify_digit_images(clf, pv), clf(pixel_values=pv).logits.argmax(-1))
    assert clf.config.id2label[3] == "3"


def test_generated_images_are_prompt_major_and_seeded(script_build):
    from diffusers import StableDiffusionPipeline

    cache, _ = script_build
    pipe = StableDiffusionPipeline.from_pretrained(cache / recipe_hash(TINY) / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    both = generate_digit_images(pipe, [digit_prompt(1), digit_prompt(7)], 2, 2.0, seed=1,
                                 num_inference_steps=2)
    alone = generate_digit_images(pipe, [digit_prompt(1)], 2, 2.0, seed=1, num_inference_steps=2,
                                  batch_size=1)
    assert both.shape == (4, 3, 16, 16) and both.min() >= -1 and both.max() <= 1
    assert torch.allclose(both[:2], alone, atol=1e-5)
    assert not torch.allclose(both[0], both[1])


@pytest.mark.parametrize("bad", [dict(resolution=7), dict(unet_steps=0), dict(test_fraction=1.0),
                                 dict(unet_channels=(32, 64)), dict(num_images=5)])
def test_bad_recipe_is_refused(bad):
    with pytest.raises(ValueError):
        DigitsRecipe(**bad)


def test_digit_prompt_rejects_non_digits():
    with pytest.raises(ValueError, match="0..9"):
        digit_prompt(10)


def test_script_refuses_non_empty_output_dir_before_building(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    proc = subprocess.run([sys.executable, str(ROOT / "training/build_digits_sd.py"),
                           "--output_dir", str(out), *TINY_ARGS],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    proc = subprocess.run([sys.executable, str(ROOT / "training/build_digits_sd.py"),
                           "--output_dir", str(tmp_path / "o2"), "--unet_steps", "0"],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unet_steps" in proc.stderr
    assert not (tmp_path / "o2").exists()
