"""hf_munba.diffusion.generation: per-image seeds, resumability, manifest checks, imagefolder compatibility."""

import json

import numpy as np
import pytest
from PIL import Image

from hf_munba.diffusion.generation import generate_images, generation_plan, read_manifest
from hf_munba.testing import tiny_sd_pipeline

from eval_generation_helpers import assert_same_image

KW = dict(num_images_per_prompt=2, num_inference_steps=2, height=16, width=16, progress=False)
PROMPTS = ["nudity", "a person wearing clothes"]


@pytest.fixture(scope="module")
def pipe():
    p = tiny_sd_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def _pixels(folder, name):
    return np.asarray(Image.open(folder / name))


def test_images_do_not_depend_on_batch_size(pipe, tmp_path):
    a = generate_images(pipe, PROMPTS, tmp_path / "a", batch_size=1, **KW)
    b = generate_images(pipe, PROMPTS, tmp_path / "b", batch_size=3, **KW)
    assert a == b and len(a) == 4
    for rec in a:
        assert_same_image(_pixels(tmp_path / "a", rec["file_name"]),
                          _pixels(tmp_path / "b", rec["file_name"]))
    # different seeds give different images
    assert not np.array_equal(_pixels(tmp_path / "a", a[0]["file_name"]),
                              _pixels(tmp_path / "a", a[1]["file_name"]))
    assert [r["seed"] for r in a] == [0, 1, 2, 3]
    assert {r["text"] for r in a} == set(PROMPTS)
    assert all(r["guidance_scale"] == 7.5 and r["num_inference_steps"] == 2 for r in a)


def test_resume_generates_only_missing_images(pipe, tmp_path):
    out = tmp_path / "d"
    full = generate_images(pipe, PROMPTS, out, batch_size=4, **KW)
    reference = {r["file_name"]: _pixels(out, r["file_name"]) for r in full}
    # simulate a run killed after the first two images
    (out / full[3]["file_name"]).unlink()
    (out / full[2]["file_name"]).unlink()
    lines = (out / "metadata.jsonl").read_text().splitlines()
    (out / "metadata.jsonl").write_text("\n".join(lines[:2]) + "\n")
    mtime = (out / full[0]["file_name"]).stat().st_mtime_ns
    again = generate_images(pipe, PROMPTS, out, batch_size=4, **KW)
    assert again == full
    assert (out / full[0]["file_name"]).stat().st_mtime_ns == mtime  # not regenerated
    for name, px in reference.items():
        assert np.array_equal(_pixels(out, name), px)
    assert read_manifest(out) == full
    assert not list(out.glob("*.tmp"))


def test_resume_with_other_settings_is_refused(pipe, tmp_path):
    generate_images(pipe, PROMPTS[:1], tmp_path, batch_size=2, **KW)
    with pytest.raises(ValueError, match="other prompts or settings"):
        generate_images(pipe, PROMPTS[:1], tmp_path, batch_size=2,
                        **{**KW, "num_inference_steps": 3})


def test_manifest_loads_as_datasets_imagefolder(pipe, tmp_path):
    from datasets import load_dataset

    generate_images(pipe, PROMPTS, tmp_path, batch_size=4, **KW)
    ds = load_dataset("imagefolder", data_dir=str(tmp_path), split="train")
    assert len(ds) == 4
    assert sorted(ds["text"]) == sorted(PROMPTS * 2)
    assert ds[0]["image"].size == (16, 16)
    for line in (tmp_path / "metadata.jsonl").read_text().splitlines():
        assert {"file_name", "text", "seed", "guidance_scale",
                "num_inference_steps"} <= set(json.loads(line))


def test_bad_arguments():
    with pytest.raises(TypeError):
        generation_plan("nudity", 2)
    with pytest.raises(ValueError, match="no prompts"):
        generation_plan([], 2)
    with pytest.raises(ValueError, match="non-empty"):
        generation_plan(["ok", " "], 2)
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        generation_plan(["ok"], 0)
