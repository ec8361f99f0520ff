"""hf_munba.unlearn: one call from a pipeline and concept(s) to the unlearned pipeline.

End to end on the tiny pipeline (16x16, 2 steps): the docstring example (a dict of concepts
given as prompts, generated with the base pipeline, each its own player), a single concept from
prompts with a ``datasets.Dataset`` as D_r and an ``output_dir`` that reloads, LoRA; and the
bad inputs, refused before any image is generated or any model trained.
"""

import doctest
import json

import pytest
import torch


def test_the_docstring_example_runs():
    import hf_munba.diffusion.unlearn as module

    torch.set_num_threads(1)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0


@pytest.fixture(scope="module")
def retain_dataset():
    import datasets
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy())
              for _ in range(4)]
    return datasets.Dataset.from_dict({"image": images, "text": ["a person wearing clothes"] * 4},
                                      features=datasets.Features({"image": datasets.Image(),
                                                                  "text": datasets.Value("string")}))


def test_prompts_and_a_dataset_with_output_dir_round_trip(tmp_path, retain_dataset):
    from diffusers import DiffusionPipeline

    import hf_munba
    from hf_munba.testing import tiny_sd_pipeline

    base = tiny_sd_pipeline()
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    out = tmp_path / "out"
    # one named concept is the single forget set; its manifest keys become the flags
    pipe = hf_munba.unlearn(base, forget={"nudity": {"prompts": ["nudity", "naked"],
                                                     "anchor_prompt": "a dressed person"}},
                            retain=retain_dataset,
                            output_dir=out, max_train_steps=2, train_batch_size=2,
                            learning_rate=1e-2, num_images_per_prompt=2,
                            generation_inference_steps=2, seed=3)
    # the caller's pipeline is used as is and left untouched
    assert all(torch.equal(before[k], v) for k, v in base.unet.state_dict().items())
    trained = pipe.unet.state_dict()
    assert any(not torch.equal(before[k], trained[k]) for k in before)
    reloaded = DiffusionPipeline.from_pretrained(out).unet.state_dict()
    assert all(torch.equal(trained[k], reloaded[k]) for k in trained)
    args = json.loads((out / "training_args.json").read_text())
    assert args["forget_prompts"] == ["nudity", "naked"] and args["seed"] == 3
    assert args["anchor_prompt"] == "a dressed person"
    assert args["resolution"] == 16  # the pipeline's native size
    history = [json.loads(l) for l in (out / "history.jsonl").read_text().splitlines()]
    assert {"loss/retain", "loss/forget"} <= set(history[-1])


def test_lora_with_concept_folders_and_no_output_dir(tmp_path, monkeypatch):
    import tempfile

    import hf_munba
    from hf_munba.diffusion.generation import generate_unlearning_data
    from hf_munba.testing import save_tiny_sd_pipeline, tiny_sd_pipeline

    pipe_dir = save_tiny_sd_pipeline(tmp_path / "pipe")
    made = generate_unlearning_data(tiny_sd_pipeline(), tmp_path / "data",
                                    forget={"a": ["apple"], "b": ["banana"]}, retain=["a cat"],
                                    num_images_per_prompt=2, num_inference_steps=2, height=16,
                                    width=16, progress=False)
    manifest = json.loads((tmp_path / "data" / "concepts.json").read_text())
    assert manifest == {"a": {"data_dir": "forget_a", "prompts": ["apple"]},
                        "b": {"data_dir": "forget_b", "prompts": ["banana"]}}
    work = tmp_path / "tmp"
    work.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work))
    pipe = hf_munba.unlearn(str(pipe_dir),
                            forget={"a": made["forget"]["a"],
                                    "b": {"data_dir": made["forget"]["b"],
                                          "anchor_prompt": "a fruit"}},
                            retain=made["retain"], method="weighted", use_lora=True, rank=2,
                            max_train_steps=2, train_batch_size=2, learning_rate=1e-2)
    assert pipe.unet.peft_config  # the adapter is loaded on the base
    images = pipe("apple", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3)
    assert not list(work.iterdir())  # the working folder is gone


@pytest.mark.parametrize("kwargs,error,message", [
    ({"max_train_step": 2}, TypeError, "did you mean max_train_steps"),
    ({"retain_data_dir": "x"}, TypeError, "set by the argument 'retain'"),
    ({"forget": 3}, TypeError, "give prompts (a str or list of str)"),
    ({"forget": {"a b": "x", "c": "y"}}, ValueError, "concept name must be"),
    ({"forget": {"only": "x"}, "forget_players": "pooled"}, ValueError,
     "--forget_players needs several concepts"),
    ({"forget": {"a": "x", "b": "y"}, "forget_prompts": ["z"]}, ValueError,
     "--forget_prompts names a single forget set"),
    ({"learning_rate": -1.0}, ValueError, "--learning_rate must be positive"),
])
def test_bad_input_is_refused_before_any_work(tmp_path, monkeypatch, kwargs, error, message):
    import hf_munba
    from hf_munba.diffusion import generation

    def no_generation(*a, **k):
        raise AssertionError("generated images for a bad call")

    monkeypatch.setattr(generation, "generate_unlearning_data", no_generation)
    call = {"forget": "nudity", "retain": "a person", **kwargs}
    with pytest.raises(error) as e:
        hf_munba.unlearn(str(tmp_path / "no-pipeline"), **call)
    assert message in str(e.value)


def test_a_non_empty_output_dir_is_refused_first(tmp_path):
    import hf_munba

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with pytest.raises(ValueError, match="is not empty"):
        hf_munba.unlearn(str(tmp_path / "p"), forget="a", retain="b", output_dir=tmp_path / "out")
