"""Prompt sets and evaluation-image generation: exact seeds, batch-size independence, resume,
per-prompt guidance, LoRA loading, and refusals."""

import csv

import numpy as np
import pytest
from PIL import Image

from hf_munba.evaluation.generate import (evaluation_plan, generate_evaluation_images,
                                          load_pipeline)
from hf_munba.evaluation.prompts import NUDITY_PROMPTS, load_prompt_set
from hf_munba.diffusion.generation import read_manifest
from hf_munba.testing import save_tiny_sd_pipeline

from eval_generation_helpers import assert_same_image, one_torch_thread, save_tiny_lora  # noqa: F401

KW = dict(num_inference_steps=2, height=16, width=16)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


@pytest.fixture(scope="module")
def pipe(sd_dir):
    return load_pipeline(sd_dir)


def _px(path):
    return np.asarray(Image.open(path))


# ---------------------------------------------------------------- prompt sets
def test_builtin_sets_and_seeds():
    recs = load_prompt_set("nudity", num_images_per_prompt=3, seed=10)
    assert [r.prompt for r in recs[::3]] == list(NUDITY_PROMPTS)
    assert [r.seed for r in recs] == list(range(10, 22))
    assert [(r.prompt_index, r.image_index) for r in recs[:4]] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert [r.prompt for r in load_prompt_set("clothed")] == ["a person wearing clothes"]
    nette = load_prompt_set("imagenette")
    assert len(nette) == 10 and nette[0].label == "tench"
    assert nette[0].prompt == "an image of a tench"


def test_i2p_csv_columns(tmp_path):
    path = tmp_path / "i2p.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_number", "prompt", "categories", "evaluation_seed", "evaluation_guidance"])
        w.writerow([7, "a nude figure", "sexual", 4242, 7])
        w.writerow([8, "a beach", "", "", ""])
    recs = load_prompt_set(path, num_images_per_prompt=2, seed=100)
    assert [(r.prompt, r.seed, r.guidance_scale, r.case_number, r.categories) for r in recs] == [
        ("a nude figure", 4242, 7.0, "7", "sexual"), ("a nude figure", 4243, 7.0, "7", "sexual"),
        ("a beach", 102, None, "8", None), ("a beach", 103, None, "8", None)]


def test_original_i2p_column_names(tmp_path):
    path = tmp_path / "i2p.csv"
    path.write_text("prompt,categories,hard,sd_seed,sd_guidance_scale\nx,violence,1,99,12\n")
    (rec,) = load_prompt_set(path)
    assert (rec.seed, rec.guidance_scale, rec.categories) == (99, 12.0, "violence")


def test_txt_and_list_and_max_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert [r.prompt for r in load_prompt_set(tmp_path / "p.txt")] == ["a cat", "a dog"]
    assert [r.prompt for r in load_prompt_set(["x", "y", "z"], max_prompts=2)] == ["x", "y"]


@pytest.mark.parametrize("content,match", [
    ("text,evaluation_seed\nhello,1\n", "needs a 'prompt' column"),
    ("prompt,evaluation_seed\nhello,abc\n", "must be a number"),
    ("prompt\n\"\"\n", "empty prompt"),
])
def test_bad_csv(tmp_path, content, match):
    (tmp_path / "bad.csv").write_text(content)
    with pytest.raises(ValueError, match=match):
        load_prompt_set(tmp_path / "bad.csv")


def test_unknown_prompt_set():
    with pytest.raises(ValueError, match="neither a built-in"):
        load_prompt_set("no_such_set")
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        load_prompt_set("nudity", num_images_per_prompt=0)


# ---------------------------------------------------------------- generation
def test_seeds_reproduce_exactly_and_batch_size_is_irrelevant(pipe, sd_dir, tmp_path):
    recs = load_prompt_set(["nudity", "naked"], num_images_per_prompt=2)
    a = generate_evaluation_images(pipe, recs, tmp_path / "a", batch_size=1, **KW)
    b = generate_evaluation_images(pipe, recs, tmp_path / "b", batch_size=3, **KW)
    # a freshly loaded pipeline reproduces the same pixels
    c = generate_evaluation_images(load_pipeline(sd_dir), recs, tmp_path / "c", batch_size=4, **KW)
    assert a == b == c and [m["seed"] for m in a] == [0, 1, 2, 3]
    for m in a:
        ref = _px(tmp_path / "a" / m["file_name"])
        assert ref.shape == (16, 16, 3)
        assert_same_image(ref, _px(tmp_path / "b" / m["file_name"]))
        assert_same_image(ref, _px(tmp_path / "c" / m["file_name"]))
    assert not np.array_equal(_px(tmp_path / "a" / a[0]["file_name"]),
                              _px(tmp_path / "a" / a[1]["file_name"]))
    assert read_manifest(tmp_path / "a") == a
    assert set(a[0]) >= {"file_name", "text", "seed", "guidance_scale", "num_inference_steps"}


def test_resume_skips_finished_images(pipe, tmp_path):
    recs = load_prompt_set(["nudity", "naked", "erotic"])
    out = tmp_path / "run"
    generate_evaluation_images(pipe, recs[:2], out, batch_size=2, **KW)
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    calls = []

    class Counting:
        def __call__(self, **kw):
            calls.append(list(kw["prompt"]))
            return pipe(**kw)

    man = generate_evaluation_images(Counting(), recs, out, batch_size=4, **KW)
    assert calls == [["erotic"]]
    assert [m["text"] for m in man] == ["nudity", "naked", "erotic"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png") if p.name in first} == first
    assert not list(out.glob("*.tmp"))
    # everything done: nothing is generated again
    calls.clear()
    generate_evaluation_images(Counting(), recs, out, **KW)
    assert calls == []
    # other settings in the same folder are refused
    with pytest.raises(ValueError, match="other prompts or settings"):
        generate_evaluation_images(pipe, recs, out, num_inference_steps=3, height=16, width=16)


def test_per_prompt_guidance_splits_batches(pipe, tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,evaluation_seed,evaluation_guidance\na,5,3\nb,6,3\nc,7,9\n")
    seen = []

    class Recording:
        def __call__(self, **kw):
            seen.append((kw["guidance_scale"], len(kw["prompt"])))
            return pipe(**kw)

    man = generate_evaluation_images(Recording(), load_prompt_set(path), tmp_path / "o",
                                     batch_size=8, **KW)
    assert seen == [(3.0, 2), (9.0, 1)]
    assert [(m["seed"], m["guidance_scale"]) for m in man] == [(5, 3.0), (6, 3.0), (7, 9.0)]
    # the same image as when generated alone with that seed and guidance
    alone = generate_evaluation_images(pipe, load_prompt_set(path)[2:], tmp_path / "alone",
                                       batch_size=1, **KW)
    assert np.array_equal(_px(tmp_path / "o" / man[2]["file_name"]),
                          _px(tmp_path / "alone" / alone[0]["file_name"]))


def test_plan_refuses_duplicates_and_empty():
    recs = load_prompt_set(["a"])
    with pytest.raises(ValueError, match="duplicate"):
        evaluation_plan(recs + recs)
    with pytest.raises(ValueError, match="no prompts"):
        evaluation_plan([])


def test_lora_is_applied_and_never_silently_dropped(sd_dir, pipe, tmp_path):
    lora = save_tiny_lora(sd_dir, tmp_path / "lora")
    recs = load_prompt_set(["nudity"])
    base = generate_evaluation_images(pipe, recs, tmp_path / "base", **KW)
    lora_pipe = load_pipeline(sd_dir, lora)
    assert "unlearned" in lora_pipe.get_list_adapters()["unet"]
    tuned = generate_evaluation_images(lora_pipe, recs, tmp_path / "lora_out", **KW)
    assert not np.array_equal(_px(tmp_path / "base" / base[0]["file_name"]),
                              _px(tmp_path / "lora_out" / tuned[0]["file_name"]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pipeline(sd_dir, tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(tmp_path)
