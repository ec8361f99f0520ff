"""The SD front end's config (the CLI is generated from it) and its methods from the registry.

Each method is checked by what defines it: ``weighted`` writes g_r + lambda g_f (so it scales with
lambda), ``ga`` trains on D_f alone (D_r's content cannot matter), ``ft`` on D_r alone (D_f's
content cannot matter). The runs go through the library's ``train(config)`` in a subprocess.
"""

import dataclasses
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_munba.diffusion.config import (DEFAULT_FORGET_PROMPTS, DIFFUSION_METHODS,
                                       SDUnlearningConfig, add_config_arguments)
from hf_munba.diffusion.objectives import FORGET_OBJECTIVES, TARGET_MODELS
from hf_munba.diffusion.params import UNET_SUBSETS
from hf_munba.evaluation.prompts import NUDITY_PROMPTS
from hf_munba.unlearning import available_methods

ROOT = Path(__file__).resolve().parents[1]


# ---- the config ---------------------------------------------------------------------------------
def test_every_field_has_help_and_literal_choices_match_the_library():
    hints = typing.get_type_hints(SDUnlearningConfig)
    fields = dataclasses.fields(SDUnlearningConfig)
    assert len(fields) >= 70 and all(f.metadata.get("help", "").strip() for f in fields)

    def literal(name):
        tp = hints[name]
        if typing.get_origin(tp) is typing.Union:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        return typing.get_args(tp)

    assert literal("forget_objective") == FORGET_OBJECTIVES
    assert literal("target_model") == TARGET_MODELS
    assert literal("train_params") == UNET_SUBSETS
    assert set(DIFFUSION_METHODS) == set(available_methods("diffusion")) \
        == {"munba", "munba-paper", "weighted", "ft", "ga"}
    assert DEFAULT_FORGET_PROMPTS == list(NUDITY_PROMPTS)


def test_cli_flags_are_the_fields():
    import argparse

    parser = add_config_arguments(argparse.ArgumentParser())
    flags = {a.dest for a in parser._actions if a.option_strings and a.dest != "help"}
    assert flags == {f.name for f in dataclasses.fields(SDUnlearningConfig)}
    ns = parser.parse_args(["--pretrained_model_name_or_path", "p", "--method", "ga",
                            "--center_crop", "--validation_prompts", "a", "b"])
    config = SDUnlearningConfig(**vars(ns))
    assert config.center_crop is True and config.validation_prompts == ["a", "b"]
    assert config.forget_objective == "ga"  # the method's own forget loss when none is named
    with pytest.raises(SystemExit):
        parser.parse_args(["--pretrained_model_name_or_path", "p", "--method", "salun"])


def test_json_round_trip_keeps_everything_but_the_token(tmp_path):
    config = SDUnlearningConfig(pretrained_model_name_or_path="p", method="weighted",
                                forget_weight=0.25, class_names=["a", "b", "c"], forget_class="b",
                                validation_prompts=["x"], hub_token="hf_secret", report_to="none")
    assert config.anchor_prompt == "an image of a c" and config.forget_prompts == ["an image of a b"]
    text = config.to_json_string()
    assert "hf_secret" not in text and "hub_token" not in json.loads(text)
    (tmp_path / "args.json").write_text(text)
    back = SDUnlearningConfig.from_json_file(tmp_path / "args.json")
    assert back == dataclasses.replace(config, hub_token=None)
    assert SDUnlearningConfig.from_dict(config.to_dict()) == back
    with pytest.raises(ValueError, match="unknown SDUnlearningConfig fields"):
        SDUnlearningConfig.from_dict({**config.to_dict(), "learning_rat": 1.0})


@pytest.mark.parametrize("kwargs, message", [
    ({"fuse_lora": True}, "--fuse_lora needs --use_lora"),
    ({"method": "ga", "forget_objective": "remap"}, "--method ga is gradient ascent on D_f"),
    ({"method": "weighted", "forget_weight": -1.0}, "--forget_weight must be >= 0"),
    ({"method": "ft", "forget_target": 0.1}, "--forget_target applies to --method munba only"),
    ({"train_params": "nope"}, "--train_params 'nope' is not one of"),
    ({"method": "retrain"}, "--method 'retrain' is not one of"),  # a classifier-only method
    ({"learning_rate": 0.0}, "--learning_rate must be positive"),
    ({"retain_objective": "prior"}, "--retain_objective 'prior' is not one of"),
    ({"method": "ft", "retain_objective": "distill"}, "--method ft trains on D_r alone"),
])
def test_post_init_refuses_bad_values_with_one_message(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        SDUnlearningConfig(pretrained_model_name_or_path="p", report_to="none", **kwargs)


def test_retain_objective_defaults_to_distill_where_there_is_a_forget_player():
    def resolved(**kw):
        return SDUnlearningConfig(pretrained_model_name_or_path="p", report_to="none",
                                  **kw).retain_objective

    assert resolved() == resolved(method="munba-paper") == resolved(method="weighted") == "distill"
    assert resolved(method="ft") == "denoise"  # distilling toward the original would not move it
    assert resolved(method="munba", retain_objective="denoise") == "denoise"


def test_distributed_refusal_is_the_shared_one(monkeypatch):
    from hf_munba.unlearning.distributed import DEEPSPEED_MESSAGE, FSDP_UNSHARDED_MESSAGE

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    # the SD trainer saves whole weights: FSDP is refused for every method, bargaining or not
    for method in ("munba", "weighted"):
        with pytest.raises(ValueError) as e:
            SDUnlearningConfig(pretrained_model_name_or_path="p", report_to="none", method=method)
        assert str(e.value) == FSDP_UNSHARDED_MESSAGE
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError) as e:
        SDUnlearningConfig(pretrained_model_name_or_path="p", report_to="none", method="weighted")
    assert str(e.value) == DEEPSPEED_MESSAGE


# ---- what each method writes into .grad -----------------------------------------------------------
def _tiny_unlearner():
    from diffusers import DDPMScheduler

    from hf_munba import testing
    from hf_munba.diffusion import params as sd_params
    from hf_munba.diffusion.unlearner import SDUnlearner

    torch.manual_seed(0)
    tok = testing.tiny_clip_tokenizer()
    unet, vae, text = testing.tiny_unet(), testing.tiny_vae(), testing.tiny_clip_text_model(tok)
    vae.requires_grad_(False)
    text.requires_grad_(False)
    params = sd_params.freeze_all_but(unet, sd_params.select_parameter_names(unet, "noxattn"))
    g = torch.Generator().manual_seed(1)
    batch = {f"{r}_latent_mean": torch.randn(2, 4, 8, 8, generator=g) for r in ("retain", "forget")}
    batch.update({f"{r}_latent_std": 0.1 * torch.ones(2, 4, 8, 8) for r in ("retain", "forget")})
    batch.update({f"{r}_embeddings": torch.randn(2, 77, 32, generator=g)
                  for r in ("retain", "forget", "anchor")})
    unlearner = SDUnlearner(unet, text, vae, DDPMScheduler(num_train_timesteps=1000),
                            forget_objective="remap")
    return unlearner, params, batch


def _grads_of(method_name, **settings):
    """.grad after one micro-batch of the training loop's per-player code and the combine."""
    from hf_munba.diffusion.trainer import backward_players
    from hf_munba.unlearning import get_method

    unlearner, params, batch = _tiny_unlearner()
    config = SDUnlearningConfig(pretrained_model_name_or_path="p", report_to="none",
                                method=method_name, **settings)
    unlearner.forget_objective = config.forget_objective
    method = get_method(method_name)(config)
    bargainer = method.make_bargainer(params)
    torch.manual_seed(5)
    losses = backward_players(bargainer, method.players(), {"retain": unlearner.retain_loss,
                                                            "forget": unlearner.forget_loss},
                              batch)
    bargainer.combine()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params], losses


def _player_grad(name):
    unlearner, params, batch = _tiny_unlearner()
    torch.manual_seed(5)
    if name == "forget":
        unlearner.retain_loss(batch)  # the same RNG draws as in the two-player loop
    getattr(unlearner, f"{name}_loss")(batch).backward()
    return [p.grad.clone() for p in params]


def test_weighted_writes_retain_plus_lambda_forget_and_ft_ga_one_player():
    g_r, g_f = _player_grad("retain"), _player_grad("forget")
    for lam in (0.0, 0.3, 2.0):
        got, losses = _grads_of("weighted", forget_weight=lam)
        assert losses.shape == (2,)
        for a, r, f in zip(got, g_r, g_f):
            torch.testing.assert_close(a, r + lam * f, rtol=1e-5, atol=1e-7)
    ft, losses = _grads_of("ft")
    assert losses.shape == (1,) and all(torch.equal(a, r) for a, r in zip(ft, g_r))
    # ga: its forget loss is the negated denoising loss, and no retain forward pass runs first
    unlearner, params, batch = _tiny_unlearner()
    unlearner.forget_objective = "ga"
    torch.manual_seed(5)
    unlearner.forget_loss(batch).backward()
    expected = [p.grad.clone() for p in params]
    ga, losses = _grads_of("ga", forget_objective="ga")
    assert losses.shape == (1,) and all(torch.equal(a, e) for a, e in zip(ga, expected))


# ---- whole runs through train(config) -------------------------------------------------------------
@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """A tiny pipeline; two forget sets and two retain sets of the same sizes, other images."""
    from hf_munba.diffusion.generation import generate_images
    from hf_munba.testing import save_tiny_sd_pipeline, tiny_sd_pipeline

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sdm")
    save_tiny_sd_pipeline(root / "pipe")
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=1, height=16, width=16, batch_size=8, progress=False)
    for tag, seed in (("a", 0), ("b", 50)):
        generate_images(pipe, ["nudity", "naked"], root / f"forget_{tag}", seed=seed, **kw)
        generate_images(pipe, ["a person wearing clothes"], root / f"retain_{tag}",
                        num_images_per_prompt=4, seed=100 + seed, **kw)
    return root


def _train(sets, out, method, forget="a", retain="a", **extra):
    config = dict(pretrained_model_name_or_path=str(sets / "pipe"),
                  forget_data_dir=str(sets / f"forget_{forget}"),
                  retain_data_dir=str(sets / f"retain_{retain}"), output_dir=str(out),
                  resolution=16, train_batch_size=2, max_train_steps=2, learning_rate=1e-3,
                  report_to="none", seed=0, method=method, eval_batches=1, **extra)
    code = ("import json, sys; from hf_munba.diffusion import SDUnlearningConfig, train; "
            "print(train(SDUnlearningConfig(**json.loads(sys.argv[1]))))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(config)], capture_output=True,
                          text=True, env=env, cwd=str(ROOT), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)  # train returns the output folder
    weights = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return weights, history


def test_ga_trains_on_the_forget_set_only(sets, tmp_path):
    base = load_file(str(sets / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"))
    a, hist = _train(sets, tmp_path / "ga_a", "ga", retain="a")
    b, _ = _train(sets, tmp_path / "ga_b", "ga", retain="b")
    c, _ = _train(sets, tmp_path / "ga_c", "ga", forget="b")
    assert any(not torch.equal(a[k], base[k]) for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)  # other retain images: the very same run
    assert any(not torch.equal(a[k], c[k]) for k in a)  # other forget images: another run
    assert "loss/forget" in hist[0] and "loss/retain" not in hist[0]
    saved = json.loads((tmp_path / "ga_a" / "training_args.json").read_text())
    assert saved["method"] == "ga" and saved["forget_objective"] == "ga"


def test_ft_trains_on_the_retain_set_only(sets, tmp_path):
    a, hist = _train(sets, tmp_path / "ft_a", "ft", forget="a")
    b, _ = _train(sets, tmp_path / "ft_b", "ft", forget="b")
    c, _ = _train(sets, tmp_path / "ft_c", "ft", retain="b")
    assert all(torch.equal(a[k], b[k]) for k in a)  # other forget images: the very same run
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert "loss/retain" in hist[0] and "loss/forget" not in hist[0]
    assert "fine-tune on D_r only" in (tmp_path / "ft_a" / "README.md").read_text()
