"""Bad inputs the other test files do not cover, refused before any model is loaded with one
clear message (the model path does not even exist here: nothing gets that far), and the Hub token
kept out of the tracker config and the model card."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_RELIABILITYtoken0123456789"


def _module(name, path):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def sd():
    return _module("train_munba_sd", ROOT / "training" / "train_munba_sd.py")


@pytest.fixture
def data(tmp_path):
    """Valid tiny forget / retain imagefolders (2 images each)."""
    from PIL import Image

    for role, color in (("forget", 0), ("retain", 255)):
        d = tmp_path / role
        d.mkdir()
        lines = []
        for i in range(2):
            Image.new("RGB", (16, 16), (color, i, 0)).save(d / f"{i}.png")
            lines.append(json.dumps({"file_name": f"{i}.png", "text": f"{role} {i}"}))
        (d / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def sd_argv(data, *extra):
    return ["--pretrained_model_name_or_path", str(data / "no-model-here"),
            "--forget_data_dir", str(data / "forget"), "--retain_data_dir", str(data / "retain"),
            "--output_dir", str(data / "out"), "--resolution", "16", "--report_to", "none",
            *map(str, extra)]


def sd_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        mod = sd()
        mod.check_args(mod.parse_args(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("flag, value", [("--method", "salun"), ("--train_params", "lora"),
                                         ("--forget_objective", "kl"),
                                         ("--train_component", "vae")])
def test_sd_unknown_method_subset_objective(data, capsys, flag, value):
    err = sd_error(sd_argv(data, flag, value), capsys)
    assert f"argument {flag}: invalid choice: '{value}'" in err.splitlines()[-1]


def test_sd_folder_without_images_or_metadata(data, capsys):
    (data / "forget" / "0.png").unlink()
    (data / "forget" / "1.png").unlink()
    (data / "forget" / "notes.txt").write_text("no images here")
    err = sd_error(sd_argv(data), capsys)
    assert err.startswith("error:") and "contains no images" in err and len(err.splitlines()) == 1
    (data / "retain" / "metadata.jsonl").unlink()
    err = sd_error(sd_argv(data, "--forget_data_dir", data / "retain"), capsys)
    assert "has no metadata.jsonl" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("extra, message", [
    (["--use_lora", "--rank", -3], "--rank must be a positive integer"),
    (["--use_lora", "--lora_alpha", 0], "--lora_alpha must be positive"),
    (["--train_batch_size", 0], "--train_batch_size must be >= 1"),
    (["--learning_rate", 0], "--learning_rate must be positive"),
])
def test_sd_bad_numbers(data, capsys, extra, message):
    err = sd_error(sd_argv(data, *extra), capsys)
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("env, message", [("ACCELERATE_USE_DEEPSPEED", "DeepSpeed is not supported"),
                                          ("ACCELERATE_USE_FSDP", "FSDP is not supported")])
def test_sd_refuses_engines_whose_backward_steps(data, capsys, monkeypatch, env, message):
    """What `accelerate launch` sets for a DeepSpeed / FSDP `accelerate config`."""
    monkeypatch.setenv(env, "true")
    err = sd_error(sd_argv(data), capsys)
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1
    assert not (data / "out").exists()


def test_classifier_refuses_the_deepspeed_flag(tmp_path, capsys):
    mod = _module("train_munba_classifier", ROOT / "training" / "train_munba_classifier.py")
    (tmp_path / "ds.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        mod.main(["--model_name_or_path", "tiny-resnet", "--dataset", "digits", "--forget_classes",
                  "3", "--output_dir", str(tmp_path / "out"), "--deepspeed", str(tmp_path / "ds.json"),
                  "--use_cpu"])
    assert e.value.code == 2
    assert "DeepSpeed is not supported" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_token_not_in_tracker_config_saved_args_or_card(data):
    """The SD script sends public_hparams(vars(args)) to init_trackers and training_args.json,
    and vars(args) to the model card."""
    from hf_munba.utils.model_card import public_hparams, sd_model_card

    mod = sd()
    args = mod.parse_args(sd_argv(data, "--hub_token", TOKEN, "--push_to_hub", "--hub_model_id",
                                  "me/model"))
    hp = public_hparams(vars(args))
    assert TOKEN not in json.dumps(hp) and "hub_token" not in hp
    assert hp["hub_model_id"] == "me/model"
    card = sd_model_card(base_model="tiny", forgotten=["nudity"], retained=["a dog"],
                         hparams=vars(args), metrics={"after/forget_loss": 0.1},
                         repo_id="me/model")
    assert TOKEN not in str(card)
    card.save(str(data / "README.md"))
    assert TOKEN not in (data / "README.md").read_text()
