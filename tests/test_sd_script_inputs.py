"""What a new user of training/train_munba_sd.py trips over, refused before any model work with one
line and nothing written: --help, the base-model path, the schedule, the checkpoint, the Hub; plus
the library pieces behind them (hf_munba.diffusion.inputs, model_card, sd_unlearning.guarded_step)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "training" / "train_munba_sd.py"
TOKEN = "hf_INPUTStoken0123456789abcdef"


def sd():
    sys.path.insert(0, str(ROOT / "training"))
    try:
        import train_munba_sd
    finally:
        sys.path.pop(0)
    return train_munba_sd


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    from hf_munba.testing import save_tiny_sd_pipeline

    return Path(save_tiny_sd_pipeline(tmp_path_factory.mktemp("pipe") / "pipe"))


@pytest.fixture
def data(tmp_path):
    """Valid tiny forget / retain imagefolders (2 square images each)."""
    for role, color in (("forget", 0), ("retain", 255)):
        d = tmp_path / role
        d.mkdir()
        lines = []
        for i in range(2):
            Image.new("RGB", (16, 16), (color, i, 0)).save(d / f"{i}.png")
            lines.append(json.dumps({"file_name": f"{i}.png", "text": f"{role} {i}"}))
        (d / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def argv(data, model, *extra):
    return ["--pretrained_model_name_or_path", str(model), "--forget_data_dir", str(data / "forget"),
            "--retain_data_dir", str(data / "retain"), "--output_dir", str(data / "out"),
            "--resolution", "16", "--report_to", "none", *map(str, extra)]


def one_line_error(args, capsys):
    mod = sd()
    with pytest.raises(SystemExit) as e:
        mod.check_args(mod.parse_args(args))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def run_script(args, **env):
    full = dict(os.environ)
    full.update(PYTHONPATH=os.pathsep.join([str(ROOT), full.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1")
    full.update(env)
    return subprocess.run([sys.executable, str(TRAIN), *map(str, args)], capture_output=True,
                          text=True, env=full, cwd=str(ROOT), timeout=300)


# ---- --help -------------------------------------------------------------------------------------
def test_every_flag_has_help_and_help_shows_defaults():
    parser_actions = []
    mod = sd()
    real = mod.argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        parser_actions.extend(self._actions)
        return real(self, args, namespace)

    mod.argparse.ArgumentParser.parse_args = capture
    try:
        mod.parse_args(["--pretrained_model_name_or_path", "x"])
    finally:
        mod.argparse.ArgumentParser.parse_args = real
    flags = [a for a in parser_actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 70
    missing = [a.option_strings[0] for a in flags if not (a.help or "").strip()]
    assert not missing, f"flags without help: {missing}"
    out = subprocess.run([sys.executable, str(TRAIN), "--help"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120).stdout
    text = " ".join(out.split())
    for flag in ("--validation_epochs", "--tracker_project_name", "--cache_dir", "--center_crop",
                 "--random_flip"):
        assert flag in text
    assert "AdamW learning rate (default: 1e-05)" in text
    assert "(default: munba-sd)" in text and "(default: constant)" in text
    assert "the same seed gives the same run (default: 0)" in text  # 0 is shown, None is not
    assert "(default: None)" not in text and "(default: False)" not in text


# ---- the base model -----------------------------------------------------------------------------
def test_a_classifier_folder_as_the_sd_model_fails_before_anything_is_written(data, tmp_path):
    from hf_munba.testing import tiny_resnet_classifier

    clf = tmp_path / "classifier"
    tiny_resnet_classifier().save_pretrained(str(clf))
    proc = run_script(argv(data, clf))
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "not a diffusers pipeline folder (no model_index.json)" in err and "config.json" in err
    assert not (data / "out").exists()


@pytest.mark.parametrize("path", ["./models/sd14", "~/no-such-model-dir", "models/sd/v14",
                                  "ABS/missing/pipe"])
def test_a_missing_local_looking_path_fails_at_once_without_the_hub(data, capsys, monkeypatch, path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    path = path.replace("ABS", str(data))
    t = time.time()
    err = one_line_error(argv(data, path), capsys)
    assert time.time() - t < 5
    assert "no such folder" in err and path in err
    assert not (data / "out").exists()


def test_partly_existing_path_is_local_and_a_repo_id_stays_a_hub_id(data, capsys, monkeypatch):
    from hf_munba.diffusion.inputs import check_pretrained_pipeline, looks_like_local_path

    monkeypatch.chdir(data)
    assert looks_like_local_path("forget/pipe")  # forget/ exists here: a mistyped local path
    err = one_line_error(argv(data, "forget/pipe"), capsys)
    assert "no such folder" in err
    assert not looks_like_local_path("CompVis/stable-diffusion-v1-4")
    assert check_pretrained_pipeline("CompVis/stable-diffusion-v1-4") is False  # left to the Hub
    for local in ("/abs/x", "./x", "~/x", "a/b/c", "C:\\models\\sd"):
        assert looks_like_local_path(local), local


def test_a_pipeline_folder_missing_a_component_is_named(data, pipe_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(pipe_dir, broken)
    shutil.rmtree(broken / "scheduler")
    err = one_line_error(argv(data, broken), capsys)
    assert "is not a Stable Diffusion pipeline: no scheduler" in err
    (tmp_path / "file.bin").write_bytes(b"x")
    assert "is a file" in one_line_error(argv(data, tmp_path / "file.bin"), capsys)
    sd().check_args(sd().parse_args(argv(data, pipe_dir)))  # the real pipeline passes


def test_a_home_relative_pipeline_path_is_expanded_for_the_loaders(data, pipe_dir, monkeypatch):
    monkeypatch.setenv("HOME", str(pipe_dir.parent))
    args = sd().parse_args(argv(data, "~/pipe"))
    sd().check_args(args)
    assert args.pretrained_model_name_or_path == str(pipe_dir)


# ---- flags checked at parse time ----------------------------------------------------------------
def test_unknown_lr_scheduler_is_one_line_at_parse_time(data, pipe_dir, capsys):
    err = one_line_error(argv(data, pipe_dir, "--lr_scheduler", "cosine_annealing"), capsys)
    assert "argument --lr_scheduler: invalid choice: 'cosine_annealing'" in err
    assert "'cosine_with_restarts'" in err
    args = sd().parse_args(argv(data, pipe_dir, "--lr_scheduler", "cosine_with_restarts"))
    assert args.lr_scheduler == "cosine_with_restarts"


def test_unlisted_image_and_uncacheable_random_crop_are_refused(data, pipe_dir, capsys):
    Image.new("RGB", (16, 16), (1, 2, 3)).save(data / "retain" / "extra.png")
    err = one_line_error(argv(data, pipe_dir), capsys)
    assert "extra.png" in err and "not listed in metadata.jsonl" in err
    (data / "retain" / "extra.png").unlink()
    Image.new("RGB", (24, 16), (9, 9, 9)).save(data / "forget" / "1.png")  # now not square
    err = one_line_error(argv(data, pipe_dir, "--cache_latents"), capsys)
    assert "--cache_latents" in err and "1.png is 24x16, not square" in err and "--center_crop" in err
    sd().check_args(sd().parse_args(argv(data, pipe_dir, "--cache_latents", "--center_crop")))
    sd().check_args(sd().parse_args(argv(data, pipe_dir, "--random_flip")))


def test_cache_dir_reaches_datasets(data, pipe_dir, tmp_path):
    cache = tmp_path / "hf-cache"
    args = argv(data, pipe_dir, "--cache_dir", cache)
    i = args.index("--forget_data_dir")
    args[i:i + 2] = ["--forget_dataset_name", str(data / "forget")]
    forget, _ = sd().check_args(sd().parse_args(args))
    assert len(forget) == 2
    assert any(p.suffix == ".arrow" for p in cache.rglob("*")), list(cache.rglob("*"))[:5]


# ---- resume -------------------------------------------------------------------------------------
def test_resume_from_a_folder_that_is_no_checkpoint(data, pipe_dir, tmp_path, capsys):
    (tmp_path / "my-ckpt").mkdir()
    err = one_line_error(argv(data, pipe_dir, "--resume_from_checkpoint", tmp_path / "my-ckpt"),
                         capsys)
    assert "is not a checkpoint saved by this script (no munba_state.json)" in err
    err = one_line_error(argv(data, pipe_dir, "--resume_from_checkpoint", tmp_path / "nope"), capsys)
    assert "checkpoint does not exist" in err


def test_checkpoint_step_is_read_from_the_checkpoint(tmp_path):
    from hf_munba.diffusion.inputs import checkpoint_step, resolve_checkpoint

    a = tmp_path / "best"
    a.mkdir()
    (a / "munba_state.json").write_text(json.dumps({"global_step": 7, "history": []}))
    assert resolve_checkpoint(str(a), tmp_path / "out") == a and checkpoint_step(a) == 7
    b = tmp_path / "old-style"  # saved before the step was recorded: its history tells
    b.mkdir()
    (b / "munba_state.json").write_text(json.dumps({"history": [{"step": 1}, {"step": 2}]}))
    assert checkpoint_step(b) == 2
    out = tmp_path / "out"
    for n in (2, 10):
        (out / f"checkpoint-{n}").mkdir(parents=True)
    assert resolve_checkpoint("latest", out) == out / "checkpoint-10"
    assert resolve_checkpoint("latest", tmp_path / "empty") is None


# ---- the Hub ------------------------------------------------------------------------------------
@pytest.mark.parametrize("env, message", [
    ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
     "cannot reach the Hub at http://127.0.0.1:9"),
])
def test_push_to_hub_without_the_hub_fails_before_training(data, pipe_dir, env, message):
    t = time.time()
    proc = run_script(argv(data, pipe_dir, "--push_to_hub", "--hub_model_id", "me/sd-munba",
                           "--hub_token", TOKEN), **env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert TOKEN not in proc.stdout + proc.stderr
    assert not (data / "out").exists()
    assert time.time() - t < 60


def test_check_hub_access_answers(monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    from hf_munba.utils.model_card import HubAccessError, check_hub_access

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    who = {"name": "me", "orgs": [{"name": "lab"}], "auth": {"accessToken": {"role": "write"}}}
    monkeypatch.setattr(huggingface_hub, "whoami", lambda token=None: who)
    assert check_hub_access("me/model", TOKEN) == "me"
    assert check_hub_access("lab/model", TOKEN) == "me" and check_hub_access("model") == "me"
    with pytest.raises(HubAccessError, match="cannot write to 'other'"):
        check_hub_access("other/model", TOKEN)
    who["auth"]["accessToken"]["role"] = "read"
    with pytest.raises(HubAccessError, match="read-only"):
        check_hub_access("me/model", TOKEN)

    def no_token(token=None):
        raise errors.LocalTokenNotFoundError("no token")

    monkeypatch.setattr(huggingface_hub, "whoami", no_token)
    with pytest.raises(HubAccessError, match="hf auth login"):
        check_hub_access("me/model")


# ---- model card ---------------------------------------------------------------------------------
def _card_yaml(card):
    return yaml.safe_load(str(card).split("---")[1])  # a ModelCard or a README's text


def test_card_has_a_model_index_and_no_local_paths(tmp_path):
    from huggingface_hub import ModelCard

    from hf_munba.utils.model_card import public_hparams, sd_model_card

    base = tmp_path / "models" / "tiny-pipe"
    base.mkdir(parents=True)
    hp = {"pretrained_model_name_or_path": str(base), "forget_data_dir": str(tmp_path / "f"),
          "validation_prompts": ["nudity", "a person"], "hub_token": TOKEN, "seed": 0,
          "forget_dataset_name": None, "retain_dataset_name": "org/retain-set"}
    metrics = {"before/forget_loss": 0.5, "after/forget_loss": 0.25, "before/retain_loss": 1.0,
               "after/retain_loss": 1.5, "skipped_steps": 0, "nudenet": {"exposed_images": 3},
               "eval_dir": str(tmp_path / "eval")}
    card = sd_model_card(base_model=str(base), forgotten=["nudity"], retained=["a person"],
                         hparams=hp, metrics=metrics, repo_id="me/sd-munba",
                         forget_data=str(tmp_path / "f"), retain_data="org/retain-set")
    text = str(card)
    assert str(tmp_path) not in text and TOKEN not in text
    meta = _card_yaml(card)
    assert "base_model" not in meta  # a local base is no Hub id
    assert "tiny-pipe" in text and "| validation_prompts | nudity a person |" in text
    (index,) = meta["model-index"]
    assert index["name"] == "sd-munba"
    found = {(r["dataset"]["name"], r["dataset"].get("config"), m["type"]): m["value"]
             for r in index["results"] for m in r["metrics"]}
    assert found == {("f", "forget", "before_forget_loss"): 0.5,
                     ("f", "forget", "after_forget_loss"): 0.25,
                     ("org/retain-set", "retain", "before_retain_loss"): 1.0,
                     ("org/retain-set", "retain", "after_retain_loss"): 1.5,
                     ("generated images (evaluation)", "generated", "nudenet_exposed_images"): 3}
    card.save(str(tmp_path / "README.md"))
    loaded = ModelCard.load(str(tmp_path / "README.md"))
    assert {r.metric_type for r in loaded.data.eval_results} >= {"after_forget_loss", "after_retain_loss"}
    hub = sd_model_card(base_model="CompVis/stable-diffusion-v1-4", forgotten=["x"], retained=["y"],
                        hparams={}, metrics=None)
    assert _card_yaml(hub)["base_model"] == "CompVis/stable-diffusion-v1-4"
    assert "model-index" not in _card_yaml(hub)  # nothing measured, nothing claimed
    saved = json.loads(json.dumps(public_hparams(hp)))
    assert saved["validation_prompts"] == ["nudity", "a person"] and "hub_token" not in saved


# ---- skipped steps ------------------------------------------------------------------------------
def _adam_state(opt):
    return {k: (v.clone() if torch.is_tensor(v) else v)
            for st in opt.state.values() for k, v in st.items()}


def _snapshot(model, opt, sched, scaler):
    return ([p.detach().clone() for p in model.parameters()], _adam_state(opt),
            sched.state_dict(), scaler.get_scale())


def _same(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0])), "weights moved"
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        assert torch.equal(torch.as_tensor(a[1][k]), torch.as_tensor(b[1][k])), k
    assert a[2] == b[2], "the lr schedule advanced"


@pytest.mark.parametrize("case", ["bargainer_skipped", "nonfinite_grad", "nonfinite_loss"])
def test_a_skipped_step_leaves_weights_adam_state_and_schedule_untouched(case):
    from diffusers.optimization import get_scheduler

    from hf_munba.unlearning.step import guarded_step

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)

    def clip():
        scaler.unscale_(opt)
        return torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)

    def backward(value=None):
        opt.zero_grad(set_to_none=True)
        loss = model(torch.randn(2, 4)).pow(2).sum() if value is None else value
        scaler.scale(loss).backward()

    wrapped = _AcceleratedLike(opt, scaler)

    def real_step():
        backward()
        stepped, norm = guarded_step(wrapped, sched, clip=clip, scaler=scaler)
        assert stepped and norm > 0

    for _ in range(2):  # momentum and second moments exist
        real_step()
    before = _snapshot(model, opt, sched, scaler)
    if case == "bargainer_skipped":  # e.g. no fallback player: finite (here zero) gradients
        backward(model(torch.randn(2, 4)).sum() * 0.0)
        stepped, _ = guarded_step(wrapped, sched, skip=True, clip=clip, scaler=scaler)
        assert scaler.get_scale() == before[3]  # not an overflow: the scale stays
    elif case == "nonfinite_grad":  # overflow seen only through the clipped norm
        backward(model(torch.full((2, 4), float("inf"))).sum())
        stepped, _ = guarded_step(wrapped, sched, clip=clip, scaler=scaler)
        assert scaler.get_scale() == before[3] / 2  # backs off as GradScaler.update would
    else:  # the caller saw a NaN loss
        backward(model(torch.randn(2, 4)).sum() * float("nan"))
        stepped, _ = guarded_step(wrapped, sched, skip=True, nonfinite=True, clip=clip,
                                  scaler=scaler)
        assert scaler.get_scale() == before[3] / 2
    assert not stepped
    _same(before, _snapshot(model, opt, sched, scaler))
    real_step()  # training goes on: the scaler accepts the next unscale_/step
    assert not torch.equal(before[0][0], model.weight)


class _AcceleratedLike:
    """What accelerate's optimizer does under a GradScaler: step() is scaler.step + update."""

    def __init__(self, opt, scaler):
        self.opt, self.scaler = opt, scaler

    def step(self):
        self.scaler.step(self.opt)
        self.scaler.update()


def test_evaluation_numbers_join_the_training_losses_in_the_model_index(tmp_path):
    """evaluate_generation --model_card: its numbers go into the same model-index, replacing an
    earlier evaluation's and keeping the run's losses, the other metadata and the text."""
    from hf_munba.evaluation.report import CARD_BEGIN, update_model_card
    from hf_munba.utils.model_card import sd_model_card

    card = sd_model_card(base_model="CompVis/stable-diffusion-v1-4", forgotten=["nudity"],
                         retained=["a person"], hparams={}, repo_id="me/sd-munba",
                         metrics={"before/forget_loss": 0.5, "after/forget_loss": 0.25})
    card.save(str(tmp_path / "README.md"))
    for exposed in (7, 3):  # a second evaluation replaces the first one's numbers
        update_model_card(tmp_path, "## Eval", eval_results={
            "nudity": {"total_exposed": exposed}, "clip": {"clip_score": 30.5}},
            dataset_name="images generated from the nudity prompts")
    text = (tmp_path / "README.md").read_text()
    meta = _card_yaml(text)
    assert meta["base_model"] == "CompVis/stable-diffusion-v1-4" and "munba" in meta["tags"]
    (index,) = meta["model-index"]
    assert index["name"] == "sd-munba"
    found = {(r["dataset"]["config"], m["type"]): m["value"]
             for r in index["results"] for m in r["metrics"]}
    assert found == {("forget", "before_forget_loss"): 0.5, ("forget", "after_forget_loss"): 0.25,
                     ("generated", "nudity_total_exposed"): 3,
                     ("generated", "clip_clip_score"): 30.5}
    assert "# Unlearned with MUNBa" in text and text.count(CARD_BEGIN) == 1
    bare = tmp_path / "bare"  # a card without metadata gets some
    bare.mkdir()
    update_model_card(bare, "## Eval", eval_results={"nudity": {"total_exposed": 1}})
    (index,) = _card_yaml((bare / "README.md").read_text())["model-index"]
    assert index["name"] == "bare" and index["results"][0]["metrics"][0]["value"] == 1


def test_generate_script_flags_have_help_and_a_missing_local_model_fails_at_once(tmp_path):
    gen = ROOT / "training" / "generate_unlearning_data.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "0",
           "HF_ENDPOINT": "http://127.0.0.1:9"}
    sys.path.insert(0, str(ROOT / "training"))
    try:
        import generate_unlearning_data as mod
    finally:
        sys.path.pop(0)
    import argparse

    seen = []
    real = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = lambda self, *a, **k: (seen.extend(self._actions),
                                                                real(self, *a, **k))[1]
    try:
        mod.parse_args(["--pretrained_model_name_or_path", "x", "--output_dir", "y"])
    finally:
        argparse.ArgumentParser.parse_args = real
    missing = [a.option_strings[0] for a in seen if a.option_strings and a.dest != "help"
               and not (a.help or "").strip()]
    assert not missing, missing
    t = time.time()
    proc = subprocess.run([sys.executable, str(gen), "--pretrained_model_name_or_path",
                           "./models/sd14", "--output_dir", str(tmp_path / "data")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and "no such folder" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "data").exists() and time.time() - t < 60
