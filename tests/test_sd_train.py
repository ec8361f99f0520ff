"""End-to-end runs of training/train_munba_sd.py (real script, subprocess) on the tiny pipeline.

One module-scoped tiny pipeline + D_f/D_r is shared by every run; each run is 2-4 steps at 16x16.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "training" / "train_munba_sd.py"
GENERATE = ROOT / "training" / "generate_unlearning_data.py"
TOKEN = "hf_SECRETtoken1234567890abcdef"


def _env(extra_pythonpath=None, **extra):
    env = dict(os.environ)
    paths = [str(ROOT)] + ([str(extra_pythonpath)] if extra_pythonpath else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               ACCELERATE_USE_CPU="true")
    env.update(extra)
    return env


def _run(script, args, expect_ok=True, extra_pythonpath=None, **env):
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True,
                          text=True, env=_env(extra_pythonpath, **env), cwd=str(ROOT), timeout=300)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{script.name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A saved tiny pipeline and tiny D_f (4 nudity prompts x 1) / D_r (4 images)."""
    from hf_munba.diffusion.generation import generate_images
    from hf_munba.testing import save_tiny_sd_pipeline, tiny_sd_pipeline

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sd")
    pipe_dir = save_tiny_sd_pipeline(root / "pipe")
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, height=16, width=16, batch_size=8, progress=False)
    generate_images(pipe, ["nudity", "naked", "erotic", "sexual"], root / "forget", **kw)
    generate_images(pipe, ["a person wearing clothes"], root / "retain", num_images_per_prompt=4,
                    seed=100, **kw)
    return {"root": root, "pipe": Path(pipe_dir), "forget": root / "forget",
            "retain": root / "retain"}


def common(assets, out, steps=2):
    return ["--pretrained_model_name_or_path", assets["pipe"], "--forget_data_dir",
            assets["forget"], "--retain_data_dir", assets["retain"], "--output_dir", out,
            "--resolution", 16, "--train_batch_size", 2, "--max_train_steps", steps,
            "--learning_rate", 1e-3, "--report_to", "none", "--seed", 0]


@pytest.fixture(scope="module")
def noxattn_run(assets):
    """The paper's default subset, 4 steps with checkpoints at 2 and 4, plus validation."""
    out = assets["root"] / "noxattn"
    proc = _run(TRAIN, common(assets, out, steps=4) + [
        "--checkpointing_steps", 2, "--validation_prompts", "nudity", "a person wearing clothes",
        "--validation_inference_steps", 2])
    return out, proc


def _unet_state(folder):
    return load_file(str(Path(folder) / "unet" / "diffusion_pytorch_model.safetensors"))


def _te_state(folder):
    return load_file(str(Path(folder) / "text_encoder" / "model.safetensors"))


def test_noxattn_trains_only_the_subset_and_reloads(assets, noxattn_run):
    from diffusers import DiffusionPipeline

    out, proc = noxattn_run
    base, new = _unet_state(assets["pipe"]), _unet_state(out)
    changed = {k for k in base if not torch.equal(base[k], new[k])}
    assert changed, "no UNet weight moved"
    assert not any("attn2" in k or k.startswith(("time_embedding", "conv_out")) for k in changed)
    assert any("attn1" in k for k in changed) and any("resnets" in k for k in changed)
    assert all(torch.equal(a, b) for a, b in zip(_te_state(assets["pipe"]).values(),
                                                  _te_state(out).values()))
    pipe = DiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    img = pipe("nudity", num_inference_steps=2, height=16, width=16,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert img.shape == (1, 16, 16, 3)
    # the run's artefacts: card, plot, metrics, history, validation grid, checkpoints
    for name in ("README.md", "training_curves.png", "training_metrics.json", "history.jsonl",
                 "validation_grid.png", "checkpoint-2", "checkpoint-4"):
        assert (out / name).exists(), name
    card = (out / "README.md").read_text()
    assert "machine-unlearning" in card and "munba" in card and "nudity" in card
    assert "validation_grid.png" in card and "after/forget_loss" in card
    assert "remap the forget prompts onto `a photo of a person wearing clothes`" in card
    history = [json.loads(l) for l in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    # the distilled retain loss is zero at the original model: at step 1 the retain player has no
    # proposal (zero gradient) and the step follows the forget player alone; then both bargain
    first = history[0]
    assert first["loss/retain"] == 0.0 and first["munba/grad_norm_retain"] == 0.0
    assert first["munba/weight_retain"] == 0.0 and first["munba/weight_forget"] > 0
    for h in history[1:]:
        assert {"loss/retain", "loss/forget", "munba/cos", "munba/weight_retain",
                "munba/weight_forget", "munba/grad_norm_retain", "munba/grad_norm_forget"} <= set(h)
        assert h["munba/weight_retain"] > 0 and h["munba/weight_forget"] > 0
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert metrics["skipped_steps"] == 0
    assert not list(out.parent.glob(".noxattn.staging-*"))
    # the original model is the trained parameters' first values, not a copy of the UNet
    assert "keeping the original values of the trained parameters" in proc.stdout + proc.stderr


@pytest.mark.parametrize("subset, kept", [
    ("xattn", "keeping the original values of the trained parameters"),
    ("full", "keeping a frozen bfloat16 copy of the unet")])
def test_bf16_keeps_the_cheaper_original(assets, tmp_path, subset, kept):
    """Under bf16 mixed precision a subset keeps its fp32 first values, the whole UNet a bf16
    copy (2 bytes per parameter beat 4); either way the first distilled loss is exactly zero."""
    out = tmp_path / "out"
    proc = _run(TRAIN, common(assets, out, steps=1) + ["--mixed_precision", "bf16",
                                                       "--train_params", subset])
    assert kept in proc.stdout + proc.stderr
    first = json.loads((out / "history.jsonl").read_text().splitlines()[0])
    assert first["loss/retain"] == 0.0 and first["munba/grad_norm_retain"] == 0.0


def test_card_metadata_and_saved_args(assets, noxattn_run):
    """The card's model-index holds the run's measured losses; no local path is published."""
    import yaml

    out, _ = noxattn_run
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert "base_model" not in meta  # the base is a local folder, not a Hub id
    assert str(assets["root"]) not in card and str(ROOT) not in card
    measured = json.loads((out / "training_metrics.json").read_text())
    (index,) = meta["model-index"]
    assert index["name"] == "pipe-munba"  # no hub_model_id: named after the base
    found = {m["type"]: m["value"] for r in index["results"] for m in r["metrics"]}
    for when in ("before", "after"):
        for loss in ("forget_loss", "retain_loss"):
            assert found[f"{when}_{loss}"] == pytest.approx(measured[f"{when}/{loss}"])
    datasets = {r["dataset"]["config"]: r["dataset"]["name"] for r in index["results"]}
    assert datasets == {"forget": "forget", "retain": "retain"}
    saved = json.loads((out / "training_args.json").read_text())
    assert saved["validation_prompts"] == ["nudity", "a person wearing clothes"]
    assert saved["pretrained_model_name_or_path"] == str(assets["pipe"])  # local file: as given


def test_cache_latents_matches_encoding_every_step(assets, noxattn_run, tmp_path):
    out, _ = noxattn_run
    cached = tmp_path / "cached"
    _run(TRAIN, common(assets, cached, steps=4) + ["--checkpointing_steps", 100, "--cache_latents"])
    # Same random draws; only float round-off differs (the VAE / text encoder see other batch
    # compositions), which Adam can amplify to a few percent of one step (lr 1e-3) on
    # near-zero gradient entries.
    a, b = _unet_state(out), _unet_state(cached)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-4)
    base = _unet_state(assets["pipe"])
    assert any((a[k] - base[k]).abs().max() > 1e-3 for k in a)  # the tolerance is below a step
    h_a = [json.loads(l) for l in (out / "history.jsonl").read_text().splitlines()]
    h_b = [json.loads(l) for l in (cached / "history.jsonl").read_text().splitlines()]
    for x, y in zip(h_a, h_b):
        # no cos at step 1: the distilled retain gradient is zero there (no proposal)
        assert ("munba/cos" in x) == ("munba/cos" in y) == (x["step"] > 1)
        for key in ("loss/retain", "loss/forget", "munba/cos"):
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-3, abs=1e-6), key


def test_resume_from_checkpoint_ends_with_the_same_weights(assets, noxattn_run, tmp_path):
    out, _ = noxattn_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    _run(TRAIN, common(assets, resumed, steps=4) + ["--checkpointing_steps", 2,
                                                    "--resume_from_checkpoint", "latest"])
    a, b = _unet_state(out), _unet_state(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full = [json.loads(l) for l in (out / "history.jsonl").read_text().splitlines()]
    again = [json.loads(l) for l in (resumed / "history.jsonl").read_text().splitlines()]
    assert full == again


def test_resume_from_a_checkpoint_folder_with_any_name(assets, noxattn_run, tmp_path):
    """A checkpoint copied away and renamed (e.g. the best one) resumes: its step is recorded."""
    out, _ = noxattn_run
    best = tmp_path / "best-so-far"
    shutil.copytree(out / "checkpoint-2", best)
    resumed = tmp_path / "resumed"
    proc = _run(TRAIN, common(assets, resumed, steps=4) + ["--checkpointing_steps", 2,
                                                           "--resume_from_checkpoint", best])
    assert f"resuming from {best}" in proc.stderr
    a, b = _unet_state(out), _unet_state(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full = [json.loads(l) for l in (out / "history.jsonl").read_text().splitlines()]
    again = [json.loads(l) for l in (resumed / "history.jsonl").read_text().splitlines()]
    assert full == again


def _recorder(tmp_path):
    """sitecustomize recording the tracker project name and, on the training call number
    MUNBA_TEST_NAN_CALL of the forget loss, making that loss NaN."""
    d = tmp_path / "recorder"
    d.mkdir()
    log = tmp_path / "recorded.json"
    (d / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import json, os, torch, accelerate
        import hf_munba.diffusion.unlearner as su
        _init = accelerate.Accelerator.init_trackers
        def init_trackers(self, project_name, *a, **kw):
            open({str(log)!r}, "w").write(json.dumps({{"project_name": project_name}}))
            return _init(self, project_name, *a, **kw)
        accelerate.Accelerator.init_trackers = init_trackers
        _forget = su.SDUnlearner.forget_loss
        CALLS = [0]
        def forget_loss(self, batch, *args, **kwargs):
            loss = _forget(self, batch, *args, **kwargs)
            if torch.is_grad_enabled():  # training, not the before/after evaluation
                CALLS[0] += 1
                if str(CALLS[0]) == os.environ.get("MUNBA_TEST_NAN_CALL"):
                    loss = loss * float("nan")
            return loss
        su.SDUnlearner.forget_loss = forget_loss
    """))
    return d, log


def test_frozen_target_with_ga_runs_and_random_flip_validation_epochs_tracker_name(assets, tmp_path):
    """--target_model frozen --forget_objective ga without LoRA used to crash after loading the
    models; --random_flip changes what is trained on; --validation_epochs validates at each
    epoch's end; --tracker_project_name reaches the trackers."""
    rec, log = _recorder(tmp_path)
    base = common(assets, tmp_path / "plain", steps=4) + [
        "--target_model", "frozen", "--forget_objective", "ga", "--checkpointing_steps", 100,
        "--validation_prompts", "nudity", "--validation_epochs", 1,
        "--validation_inference_steps", 1]
    proc = _run(TRAIN, base, extra_pythonpath=rec)
    assert "--target_model frozen has no effect with --forget_objective ga" in proc.stderr
    assert json.loads(log.read_text())["project_name"] == "munba-sd"
    plain = tmp_path / "plain"
    # 4 retain images, batch 2: 2 steps an epoch, 2 epochs -> validation after steps 2 and 4
    assert sorted(p.name for p in (plain / "validation").iterdir()) == ["step-000002",
                                                                        "step-000004"]
    flipped = tmp_path / "flipped"
    args = list(base)
    args[args.index("--output_dir") + 1] = flipped
    _run(TRAIN, args + ["--random_flip", "--tracker_project_name", "my-unlearning"],
         extra_pythonpath=rec)
    assert json.loads(log.read_text())["project_name"] == "my-unlearning"
    a, b, orig = _unet_state(plain), _unet_state(flipped), _unet_state(assets["pipe"])
    assert any(not torch.equal(a[k], orig[k]) for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # other (flipped) images were trained on


def test_a_skipped_step_leaves_weights_adam_state_and_schedule_untouched(assets, tmp_path):
    """A NaN forget loss on step 2: checkpoint-2 equals checkpoint-1 in weights, AdamW state
    (with weight decay) and lr schedule; step 3 trains again."""
    rec, _ = _recorder(tmp_path)
    out = tmp_path / "nan2"
    proc = _run(TRAIN, common(assets, out, steps=3) + [
        "--checkpointing_steps", 1, "--adam_weight_decay", 0.1, "--lr_scheduler", "linear"],
        extra_pythonpath=rec, MUNBA_TEST_NAN_CALL="2")
    assert "step 2: non-finite loss or gradient, update skipped" in proc.stderr
    ck = [out / f"checkpoint-{i}" for i in (1, 2, 3)]
    w = [_unet_state(c) for c in ck]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])
    assert any(not torch.equal(w[1][k], w[2][k]) for k in w[1])
    opt = [torch.load(c / "optimizer.bin", weights_only=True) for c in ck]
    assert opt[0]["state"] and opt[0]["state"].keys() == opt[1]["state"].keys()
    for i, st in opt[0]["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(torch.as_tensor(st[key]), torch.as_tensor(opt[1]["state"][i][key])), key
    assert any(not torch.equal(torch.as_tensor(opt[1]["state"][i]["step"]),
                               torch.as_tensor(opt[2]["state"][i]["step"])) for i in opt[1]["state"])
    sched = [torch.load(c / "scheduler.bin", weights_only=True) for c in ck]
    assert sched[0]["last_epoch"] == sched[1]["last_epoch"] < sched[2]["last_epoch"]
    history = [json.loads(l) for l in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step_skipped"] for h in history] == [0.0, 1.0, 0.0]
    assert history[0]["lr"] == history[1]["lr"] > history[2]["lr"]


def test_lora_with_alpha_not_rank_and_fused_pipeline(assets, tmp_path):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    out = tmp_path / "lora"
    lora_args = common(assets, out) + ["--use_lora", "--rank", 2, "--lora_alpha", 6, "--fuse_lora",
                                       "--target_model", "frozen", "--train_params", "full",
                                       "--checkpointing_steps", 1, "--gradient_checkpointing"]
    _run(TRAIN, lora_args)
    # resuming from the LoRA checkpoint of step 1 ends with the same adapter
    resumed = tmp_path / "lora_resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-1", resumed / "checkpoint-1")
    lora_args[lora_args.index("--output_dir") + 1] = resumed
    _run(TRAIN, lora_args + ["--resume_from_checkpoint", "latest"])
    again = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("unet.") for k in lora)
    assert lora.keys() == again.keys() and all(torch.equal(lora[k], again[k]) for k in lora)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora.up" in k)
    # The fused weights are W + (alpha / rank) B A: the alpha survived the round trip.
    base, fused = _unet_state(assets["pipe"]), _unet_state(out)
    ups = [k for k in lora if k.endswith(".lora.up.weight")]
    assert ups and any("attn2" in k for k in ups)  # --train_params full: cross-attention too
    for up in ups:
        down = up.replace(".lora.up.", ".lora.down.")
        layer = up[len("unet."):].replace(".lora.up.weight", ".weight")
        expected = base[layer] + 3.0 * lora[up] @ lora[down]
        torch.testing.assert_close(fused[layer], expected, rtol=1e-5, atol=1e-6)
    # base + load_lora_weights(output_dir) gives the same predictions as the fused pipeline
    pipe = StableDiffusionPipeline.from_pretrained(str(assets["pipe"]))
    pipe.load_lora_weights(str(out))
    fused_pipe = DiffusionPipeline.from_pretrained(str(out))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = pipe.unet(x, 10, emb).sample
        b = fused_pipe.unet(x, 10, emb).sample
        base_pred = StableDiffusionPipeline.from_pretrained(str(assets["pipe"])).unet(x, 10, emb).sample
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, base_pred)
    assert "lora" not in (out / "README.md").read_text().split("---")[1]  # fused: a full pipeline


def _fake_hub(tmp_path):
    """sitecustomize replacing the three Hub calls (the access check before training, then the
    push); records their arguments as JSON."""
    d = tmp_path / "fakehub"
    d.mkdir()
    log = tmp_path / "hub_calls.json"
    (d / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import json, huggingface_hub
        CALLS = []
        def _save():
            open({str(log)!r}, "w").write(json.dumps(CALLS))
        def create_repo(repo_id, **kw):
            CALLS.append({{"fn": "create_repo", "repo_id": repo_id, **{{k: str(v) for k, v in kw.items()}}}}); _save()
            return huggingface_hub.RepoUrl("https://huggingface.co/" + repo_id)
        def upload_folder(**kw):
            import os
            kw["files"] = sorted(os.listdir(kw["folder_path"]))
            CALLS.append({{"fn": "upload_folder", **{{k: (v if k == "files" else str(v)) for k, v in kw.items()}}}}); _save()
        def whoami(token=None, **kw):
            CALLS.append({{"fn": "whoami", "token": str(token)}}); _save()
            return {{"name": "me", "orgs": [], "auth": {{"accessToken": {{"role": "write"}}}}}}
        huggingface_hub.create_repo = create_repo
        huggingface_hub.upload_folder = upload_folder
        huggingface_hub.whoami = whoami
    """))
    return d, log


def test_text_encoder_standalone_and_push_to_hub_without_leaking_the_token(assets, tmp_path):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    fake, log = _fake_hub(tmp_path)
    out = tmp_path / "te"
    (tmp_path / "eval.json").write_text(json.dumps({"nudenet/exposed_images": 3}))
    proc = _run(TRAIN, common(assets, out) + ["--model_card_metrics", tmp_path / "eval.json",
        "--train_component", "text_encoder", "--train_params", "full", "--forget_objective", "esd",
        "--target_model", "frozen", "--gradient_checkpointing", "--push_to_hub", "--hub_model_id", "me/sd-munba-te",
        "--hub_token", TOKEN], extra_pythonpath=fake,
        HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9")  # online for the fake Hub only
    base_te, new_te = _te_state(assets["pipe"]), _te_state(out)
    assert any(not torch.equal(base_te[k], new_te[k]) for k in base_te)
    base_unet, new_unet = _unet_state(assets["pipe"]), _unet_state(out)
    assert all(torch.equal(base_unet[k], new_unet[k]) for k in base_unet)
    # the scrubbed encoder alone plugs into another SD 1.x pipeline
    te = CLIPTextModel.from_pretrained(str(out / "text_encoder"))
    pipe = StableDiffusionPipeline.from_pretrained(str(assets["pipe"]), text_encoder=te)
    pipe.set_progress_bar_config(disable=True)
    pipe("nudity", num_inference_steps=1, height=16, width=16, output_type="np")
    calls = json.loads(log.read_text())
    assert [c["fn"] for c in calls] == ["whoami", "create_repo", "upload_folder"]
    assert calls[0]["token"] == TOKEN  # the access check, before training
    calls = calls[1:]
    assert calls[0]["repo_id"] == "me/sd-munba-te" and calls[0]["token"] == TOKEN
    assert calls[1]["repo_id"] == "me/sd-munba-te" and Path(calls[1]["folder_path"]) == out
    assert "model_index.json" in calls[1]["files"] and "README.md" in calls[1]["files"]
    card = (out / "README.md").read_text()
    assert "nudenet/exposed_images | 3" in card and "'me/sd-munba-te'" in card
    # the token is nowhere: not in any output file, not in the logs
    assert TOKEN not in proc.stdout + proc.stderr
    for f in out.rglob("*"):
        if f.is_file():
            assert TOKEN.encode() not in f.read_bytes(), f


def test_classwise_remaps_to_the_next_class(tmp_path, assets):
    data = tmp_path / "classes"
    _run(GENERATE, ["--pretrained_model_name_or_path", assets["pipe"], "--output_dir", data,
                    "--class_names", "tench", "chain saw", "church", "--forget_class", "chain saw",
                    "--num_images_per_prompt", 2, "--num_inference_steps", 1, "--resolution", 16,
                    "--batch_size", 8])
    meta = [json.loads(l) for l in (data / "forget" / "metadata.jsonl").read_text().splitlines()]
    assert {m["text"] for m in meta} == {"an image of a chain saw"}
    retain = [json.loads(l) for l in (data / "retain" / "metadata.jsonl").read_text().splitlines()]
    assert {m["text"] for m in retain} == {"an image of a tench", "an image of a church"}
    out = tmp_path / "cls"
    args = common(assets, out) + ["--class_names", "tench", "chain saw", "church",
                                  "--forget_class", "chain saw", "--train_params", "xattn",
                                  "--method", "weighted", "--forget_weight", 0.5]
    # read through `datasets` this time (a local imagefolder by path), with accumulation
    args[args.index("--forget_data_dir"):args.index("--forget_data_dir") + 2] = \
        ["--forget_dataset_name", data / "forget"]
    args[args.index("--retain_data_dir"):args.index("--retain_data_dir") + 2] = \
        ["--retain_dataset_name", data / "retain"]
    _run(TRAIN, args + ["--gradient_accumulation_steps", 2])
    saved = json.loads((out / "training_args.json").read_text())
    assert saved["anchor_prompt"] == "an image of a church"
    base, new = _unet_state(assets["pipe"]), _unet_state(out)
    changed = {k for k in base if not torch.equal(base[k], new[k])}
    assert changed and all("attn2" in k for k in changed)
    assert "chain saw" in (out / "README.md").read_text()
    assert len((out / "history.jsonl").read_text().splitlines()) == 2  # optimizer steps, not batches


def _check(argv):
    """check_args in-process: the validation that runs before any model is loaded."""
    sys.path.insert(0, str(ROOT / "training"))
    try:
        import train_munba_sd
    finally:
        sys.path.pop(0)
    return train_munba_sd.check_args(train_munba_sd.parse_args([str(a) for a in argv]))


@pytest.mark.parametrize("mutate, message", [
    (lambda a, t: a.__setitem__(a.index("--forget_data_dir") + 1, t / "nope"), "does not exist"),
    (lambda a, t: (t / "empty").mkdir() or a.__setitem__(a.index("--forget_data_dir") + 1,
                                                         t / "empty"), "is empty"),
    (lambda a, t: a.__setitem__(a.index("--resolution") + 1, 15), "not divisible"),
    (lambda a, t: a.__setitem__(a.index("--retain_data_dir") + 1, a[a.index("--forget_data_dir") + 1]),
     "overlap"),
    (lambda a, t: a.extend(["--use_lora", "--rank", 0]), "rank"),
    (lambda a, t: a.extend(["--fuse_lora"]), "--fuse_lora needs --use_lora"),
    (lambda a, t: a.extend(["--train_component", "text_encoder", "--train_params", "noxattn"]),
     "UNet subset"),
    (lambda a, t: a.extend(["--mixed_precision", "fp16"]), "fp16"),
    (lambda a, t: a.extend(["--class_names", "a", "b", "--forget_class", "c"]), "not one of"),
    (lambda a, t: a.extend(["--push_to_hub"]), "hub_model_id"),
    (lambda a, t: a.extend(["--model_card_metrics", t / "missing.json"]), "cannot read"),
])
def test_bad_input_fails_with_one_message(assets, tmp_path, capsys, mutate, message):
    if message == "fp16" and torch.cuda.is_available():
        pytest.skip("fp16 is valid with a GPU")
    args = common(assets, tmp_path / "out")
    mutate(args, tmp_path)
    with pytest.raises(SystemExit) as e:
        _check(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1


def test_bad_data_files_are_named(assets, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(assets["forget"], bad)
    first = json.loads((bad / "metadata.jsonl").read_text().splitlines()[0])["file_name"]
    (bad / first).write_bytes(b"not a png")
    args = common(assets, tmp_path / "out")
    args[args.index("--forget_data_dir") + 1] = bad
    with pytest.raises(SystemExit):
        _check(args)
    assert first in capsys.readouterr().err
    (bad / first).unlink()
    shutil.copy(assets["forget"] / first, bad / first)
    lines = (bad / "metadata.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    rec["text"] = ""
    (bad / "metadata.jsonl").write_text("\n".join([lines[0], json.dumps(rec)] + lines[2:]) + "\n")
    with pytest.raises(SystemExit):
        _check(args)
    assert "has no caption" in capsys.readouterr().err


def test_cli_refuses_non_empty_output_dir_before_loading_anything(assets, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = _run(TRAIN, common(assets, out), expect_ok=False)
    assert proc.returncode == 2
    assert "--overwrite_output_dir" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(os.listdir(out)) == ["keep.txt"]


def test_non_finite_steps_are_skipped_then_the_run_stops(assets, tmp_path):
    """lr 1e30 blows the weights up after step 1; later steps are NaN, skipped, then stop."""
    out = tmp_path / "nan"
    proc = _run(TRAIN, common(assets, out, steps=6) + [
        "--learning_rate", 1e30, "--max_consecutive_skips", 2, "--checkpointing_steps", 1],
        expect_ok=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "2 consecutive optimizer steps had non-finite" in proc.stderr
    assert "step 2: non-finite loss or gradient, update skipped" in proc.stderr
    first, second = _unet_state(out / "checkpoint-1"), _unet_state(out / "checkpoint-2")
    assert all(torch.equal(first[k], second[k]) for k in first)  # the skipped step left them alone
    state = json.loads((out / "checkpoint-2" / "munba_state.json").read_text())
    assert state["guard"] == {"total": 1, "consecutive": 1}
    assert state["history"][-1]["step_skipped"] == 1.0
    assert not (out / "model_index.json").exists()  # nothing final was written


def test_deepspeed_and_fsdp_are_refused(assets, tmp_path, capsys, monkeypatch):
    for var, word in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP")):
        monkeypatch.setenv(var, "true")
        with pytest.raises(SystemExit):
            _check(common(assets, tmp_path / "out"))
        err = capsys.readouterr().err
        assert word in err and "DDP" in err
        monkeypatch.delenv(var)
