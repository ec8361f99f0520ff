"""Library pieces behind train_munba_sd.py: parameter subsets, data pairing, objectives, the
per-step unlearner, atomic export, model card and Hub push (Hub calls replaced)."""

import json

import pytest
import torch
from PIL import Image

from hf_munba.diffusion.data import (DataValidationError, ImageCaptionSource,
                              PairedUnlearningDataset, check_disjoint, class_prompts,
                              load_imagefolder, preprocess_image, remap_class)
from hf_munba.diffusion.objectives import denoising_target, esd_target, forget_loss_from_preds
from hf_munba.diffusion.params import add_lora_adapter, freeze_all_but, select_parameter_names
from hf_munba.diffusion.unlearner import SDUnlearner
from hf_munba.unlearning.step import SkippedStepGuard, TooManySkippedSteps
from hf_munba.testing import tiny_clip_text_model, tiny_sd_pipeline, tiny_unet
from sd_helpers import paired_batch

torch.set_num_threads(1)


# ---- parameter subsets ---------------------------------------------------------------------------
def test_unet_subsets():
    unet = tiny_unet()
    names = {s: set(select_parameter_names(unet, s)) for s in ("full", "noxattn", "xattn", "selfattn")}
    every = {n for n, _ in unet.named_parameters()}
    assert names["full"] == every
    assert names["xattn"] and all("attn2" in n for n in names["xattn"])
    assert names["selfattn"] and all("attn1" in n for n in names["selfattn"])
    excluded = every - names["noxattn"]
    assert names["xattn"] <= excluded
    assert {n for n in every if n.startswith(("time_embedding", "conv_out"))} <= excluded
    assert excluded == names["xattn"] | {n for n in every if n.startswith(("time_embedding", "conv_out"))}
    params = freeze_all_but(unet, sorted(names["xattn"]))
    assert isinstance(params, list) and len(params) == len(names["xattn"])
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == names["xattn"]
    with pytest.raises(ValueError, match="unknown parameter subset"):
        select_parameter_names(unet, "attn")
    te = tiny_clip_text_model()
    assert all(".self_attn." in n for n in select_parameter_names(te, "selfattn", "text_encoder"))
    with pytest.raises(ValueError):
        select_parameter_names(te, "noxattn", "text_encoder")


def test_lora_adapter_targets_the_subset_and_starts_at_the_base():
    unet = tiny_unet()
    x, t, emb = torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.randn(1, 3, 32)
    with torch.no_grad():
        ref = unet(x, t, emb).sample
    params = add_lora_adapter(unet, rank=2, alpha=4, subset="xattn")
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "attn2" in n for n in trainable)
    assert len(params) == len(trainable)
    assert unet.peft_config["default"].lora_alpha == 4 and unet.peft_config["default"].r == 2
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, emb).sample, ref)  # B = 0 at init
    with pytest.raises(ValueError, match="rank"):
        add_lora_adapter(tiny_unet(), rank=0)


# ---- data ----------------------------------------------------------------------------------------
def _source(name, n):
    imgs = [Image.new("RGB", (20, 16), (i * 10 % 255, 3 * i % 255, 7)) for i in range(n)]
    return ImageCaptionSource(name, imgs, [f"{name} {i}" for i in range(n)],
                              [f"{name}{i}" for i in range(n)])


def _dataset(n_f=3, n_r=5, **kw):
    tok = tiny_sd_pipeline().tokenizer
    return PairedUnlearningDataset(_source("forget", n_f), _source("retain", n_r), tok, 16,
                                   anchor_prompt="anchor", seed=kw.pop("seed", 0), **kw)


def test_pairing_covers_retain_each_epoch_and_cycles_forget():
    ds = _dataset()
    seen_f = []
    orders = []
    for epoch in range(3):
        ds.set_pairing_epoch(epoch)
        items = [ds[i] for i in range(len(ds))]
        assert sorted(it["retain_index"] for it in items) == list(range(5))
        orders.append([it["retain_index"] for it in items])
        seen_f += [it["forget_index"] for it in items]
    # the forget stream is a sequence of full, independently shuffled cycles of D_f
    for c in range(len(seen_f) // 3):
        assert sorted(seen_f[3 * c:3 * c + 3]) == [0, 1, 2]
    assert len(set(map(tuple, orders))) > 1
    again = _dataset()
    again.set_pairing_epoch(2)
    assert [again[i]["retain_index"] for i in range(5)] == orders[2]  # a pure function of (seed, epoch)
    other = _dataset(seed=1)
    assert [other[i]["retain_index"] for i in range(5)] != orders[0] or \
        [other[i]["forget_index"] for i in range(5)] != seen_f[:5]


def test_items_hold_both_players_inputs():
    ds = _dataset(forget_prompts=["nudity", "naked"])
    it = ds[0]
    assert it["retain_pixel_values"].shape == (3, 16, 16)
    assert -1.0 <= float(it["forget_pixel_values"].min()) and float(it["forget_pixel_values"].max()) <= 1.0
    decode = ds.tokenizer.decode
    assert "anchor" in decode(it["anchor_input_ids"], skip_special_tokens=True).replace(" ", "")
    prompts = [decode(ds[i]["forget_input_ids"], skip_special_tokens=True).replace(" ", "")
               for i in range(4)]
    assert prompts == ["nudity", "naked", "nudity", "naked"]


def test_preprocess_and_class_helpers():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    x = preprocess_image(img, 16)
    assert x.shape == (3, 16, 16) and float(x[0].mean()) == 1.0 and float(x[1].mean()) == -1.0
    assert class_prompts(["a", "b"], "an image of a {}") == ["an image of a a", "an image of a b"]
    assert remap_class(["a", "b", "c"], "c") == "a" and remap_class(["a", "b", "c"], "a", "c") == "c"
    with pytest.raises(ValueError):
        remap_class(["a", "b"], "z")
    with pytest.raises(ValueError):
        class_prompts(["a"], "no placeholder")


def test_imagefolder_validation(tmp_path):
    with pytest.raises(DataValidationError, match="no images"):
        (tmp_path / "x.txt").write_text("hi")
        load_imagefolder(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(DataValidationError, match="no metadata.jsonl"):
        load_imagefolder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "text": "t"}) + "\n")
    with pytest.raises(DataValidationError, match="b.png"):
        load_imagefolder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "t"}) + "\n")
    src = load_imagefolder(tmp_path)
    assert len(src) == 1 and src.captions == ["t"]
    with pytest.raises(DataValidationError, match="overlap"):
        check_disjoint(src, src)


# ---- objectives and the per-step unlearner --------------------------------------------------------
def test_objective_functions():
    pred = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randn(2, 4, 8, 8)
    assert torch.allclose(forget_loss_from_preds("ga", pred, target),
                          -forget_loss_from_preds("remap", pred, target))
    with pytest.raises(ValueError, match="without gradient"):
        forget_loss_from_preds("remap", pred, pred * 2)
    u, c = torch.randn(3), torch.randn(3)
    torch.testing.assert_close(esd_target(u, c, 2.0), u - 2.0 * (c - u))
    sched = tiny_sd_pipeline().scheduler
    noise = torch.randn(2, 4, 8, 8)
    assert denoising_target(sched, target, noise, torch.tensor([1, 2])) is noise


def test_cached_latents_give_the_same_losses():
    pipe = tiny_sd_pipeline()
    b = paired_batch(pipe)
    un = SDUnlearner(pipe.unet, pipe.text_encoder, pipe.vae, pipe.scheduler)
    with torch.no_grad():
        dr, df = pipe.vae.encode(b["retain_pixel_values"]).latent_dist, \
            pipe.vae.encode(b["forget_pixel_values"]).latent_dist
        emb = {k: pipe.text_encoder(b[f"{k}_input_ids"])[0] for k in ("retain", "forget", "anchor")}
    cached = {"retain_latent_mean": dr.mean, "retain_latent_std": dr.std,
              "forget_latent_mean": df.mean, "forget_latent_std": df.std,
              **{f"{k}_embeddings": v for k, v in emb.items()}}
    torch.manual_seed(3)
    a = [float(x.detach()) for x in un.losses(b)]
    torch.manual_seed(3)
    c = [float(x.detach()) for x in un.losses(cached)]
    assert a == pytest.approx(c, rel=1e-5)


def test_frozen_target_with_lora_is_the_base_model():
    pipe = tiny_sd_pipeline()
    base = tiny_sd_pipeline().unet
    add_lora_adapter(pipe.unet, rank=2, subset="full")
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n:
                p.normal_()
    b = paired_batch(pipe)
    frozen = SDUnlearner(pipe.unet, pipe.text_encoder, pipe.vae, pipe.scheduler,
                         target_model="frozen", lora=True)
    copy_ = SDUnlearner(pipe.unet, pipe.text_encoder, pipe.vae, pipe.scheduler,
                        target_model="frozen", frozen_unet=base)
    current = SDUnlearner(pipe.unet, pipe.text_encoder, pipe.vae, pipe.scheduler)
    losses = []
    for un in (frozen, copy_, current):
        torch.manual_seed(1)
        losses.append(un.forget_loss(b))
    assert float(losses[0]) == pytest.approx(float(losses[1]), rel=1e-5)
    assert float(losses[0]) != pytest.approx(float(losses[2]), rel=1e-3)
    assert pipe.unet.active_adapters() == ["default"]  # adapters re-enabled afterwards
    losses[0].backward()  # the target is a constant: only the forget prediction has a graph
    assert any(p.grad is not None for n, p in pipe.unet.named_parameters() if "lora_" in n)


def _perturb_(module, name_part=""):
    with torch.no_grad():
        for n, p in module.named_parameters():
            if name_part in n:
                p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("lora", [False, True])
def test_distilled_retain_loss_is_zero_at_the_original_and_measures_the_drift(lora):
    """The distilled retain player starts at exactly zero (loss and gradient) and, once the
    weights move, its loss is the MSE to the original's prediction on the same noisy D_r latents
    and captions: the same draws as the denoising loss, another target."""
    import copy

    pipe = tiny_sd_pipeline()
    frozen = None if lora else copy.deepcopy(pipe.unet).requires_grad_(False)
    if lora:
        add_lora_adapter(pipe.unet, rank=2, subset="full")
    b = paired_batch(pipe)
    un = SDUnlearner(pipe.unet, pipe.text_encoder, pipe.vae, pipe.scheduler, lora=lora,
                     retain_objective="distill", frozen_unet=frozen)
    torch.manual_seed(0)
    loss = un.retain_loss(b)
    assert float(loss) == 0.0
    loss.backward()
    grads = [p.grad for p in pipe.unet.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(float(g.abs().max()) == 0.0 for g in grads)
    pipe.unet.zero_grad(set_to_none=True)
    _perturb_(pipe.unet, "lora_B" if lora else "")
    denoise = SDUnlearner(pipe.unet, pipe.text_encoder, pipe.vae, pipe.scheduler, lora=lora)
    torch.manual_seed(0)
    drift = un.retain_loss(b)
    torch.manual_seed(0)
    plain = denoise.retain_loss(b)
    assert float(drift) > 0 and float(drift) != pytest.approx(float(plain), rel=1e-3)
    # the target is the original model's prediction for the very same noisy latents
    original = frozen if not lora else None
    torch.manual_seed(0)
    latents = un.latents(b, "retain")
    noisy, t, _ = un.noisy(latents)
    cond = un.conditioning(b, "retain")
    with torch.no_grad():
        if lora:
            pipe.unet.disable_adapters()
            ref = un.predict(pipe.unet, noisy, t, cond)
            pipe.unet.enable_adapters()
        else:
            ref = un.predict(original, noisy, t, cond)
    pred = un.predict(pipe.unet, noisy, t, cond)
    assert float(drift) == pytest.approx(float(torch.nn.functional.mse_loss(pred, ref)), rel=1e-5)
    if lora:
        assert pipe.unet.active_adapters() == ["default"]
    drift.backward()
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0
               for p in pipe.unet.parameters() if p.requires_grad)


def test_distilled_retain_loss_on_a_trained_text_encoder_uses_its_frozen_copy():
    import copy

    pipe = tiny_sd_pipeline()
    pipe.unet.requires_grad_(False)
    frozen = copy.deepcopy(pipe.text_encoder).requires_grad_(False)
    un = SDUnlearner(pipe.unet, pipe.text_encoder, pipe.vae, pipe.scheduler,
                     train_component="text_encoder", retain_objective="distill",
                     frozen_text_encoder=frozen)
    b = paired_batch(pipe)
    torch.manual_seed(0)
    assert float(un.retain_loss(b)) == 0.0
    _perturb_(pipe.text_encoder)
    torch.manual_seed(0)
    loss = un.retain_loss(b)
    loss.backward()
    assert float(loss) > 0
    assert all(p.grad is not None for p in pipe.text_encoder.parameters())
    assert all(p.grad is None for p in list(pipe.unet.parameters()) + list(frozen.parameters()))


def test_distilled_retain_loss_needs_the_original_model():
    pipe = tiny_sd_pipeline()
    with pytest.raises(ValueError, match="retain_objective=.distill. without LoRA needs the original unet"):
        SDUnlearner(pipe.unet, pipe.text_encoder, pipe.vae, pipe.scheduler,
                    retain_objective="distill")
    with pytest.raises(ValueError, match="unknown retain objective"):
        SDUnlearner(pipe.unet, pipe.text_encoder, pipe.vae, pipe.scheduler,
                    retain_objective="prior")


@pytest.mark.parametrize("target_model", ["current", "frozen"])
def test_esd_encodes_the_concept_prompt_once_when_the_denoiser_is_trained(target_model):
    """ESD's target needs e_c, the target model's prediction for the concept prompt. With the
    denoiser trained the text encoder is unchanged, so the prompt's conditioning is the one the
    trained prediction uses: encoded once (concept + unconditional), not twice."""
    import copy

    pipe = tiny_sd_pipeline()
    frozen = copy.deepcopy(pipe.unet).requires_grad_(False) if target_model == "frozen" else None
    un = SDUnlearner(pipe.unet, pipe.text_encoder, pipe.vae, pipe.scheduler, forget_objective="esd",
                     target_model=target_model, frozen_unet=frozen, negative_guidance=2.0)
    _perturb_(pipe.unet)  # so that the current and the frozen target differ
    b = paired_batch(pipe)
    calls = []
    hook = pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    torch.manual_seed(0)
    loss = un.forget_loss(b)
    hook.remove()
    assert len(calls) == 2
    torch.manual_seed(0)  # the same draws, by hand
    latents = un.latents(b, "forget")
    noisy, t, _ = un.noisy(latents)
    cond, uncond = un.conditioning(b, "forget"), un.conditioning(b, "uncond")
    target_unet = frozen if frozen is not None else pipe.unet
    with torch.no_grad():
        target = esd_target(un.predict(target_unet, noisy, t, uncond),
                            un.predict(target_unet, noisy, t, cond), 2.0)
    pred = un.predict(pipe.unet, noisy, t, cond)
    assert float(loss) == pytest.approx(float(torch.nn.functional.mse_loss(pred, target)), rel=1e-5)


def test_text_encoder_player_losses_reach_only_the_encoder():
    pipe = tiny_sd_pipeline()
    pipe.unet.requires_grad_(False)
    un = SDUnlearner(pipe.unet, pipe.text_encoder, pipe.vae, pipe.scheduler,
                     train_component="text_encoder", forget_objective="esd")
    lr, lf = un.losses(paired_batch(pipe))
    (lr + lf).backward()
    assert all(p.grad is not None for p in pipe.text_encoder.parameters())
    assert all(p.grad is None for p in pipe.unet.parameters())


def test_skipped_step_guard():
    g = SkippedStepGuard(3)
    for s in (True, True, False, True, True):
        g.record(s)
    assert g.total == 4 and g.consecutive == 2
    with pytest.raises(TooManySkippedSteps, match="3 consecutive"):
        g.record(True, step=7)
    h = SkippedStepGuard(3)
    h.load_state_dict(g.state_dict())
    assert h.state_dict() == g.state_dict()


# ---- export, card, hub -----------------------------------------------------------------------------
def test_commit_staged_moves_markers_last_and_replaces_old(tmp_path, monkeypatch):
    from hf_munba.diffusion import export as sd_export

    out = tmp_path / "out"
    (out / "unet").mkdir(parents=True)
    (out / "unet" / "old.bin").write_text("old")
    (out / "model_index.json").write_text("{}")
    (out / "checkpoint-1").mkdir()
    staged = tmp_path / "staged"
    (staged / "unet").mkdir(parents=True)
    (staged / "unet" / "w.safetensors").write_text("new")
    (staged / "model_index.json").write_text('{"new": 1}')
    (staged / "README.md").write_text("card")
    order = []
    real = sd_export.os.replace
    monkeypatch.setattr(sd_export.os, "replace", lambda a, b: (order.append(b.name), real(a, b)))
    sd_export.commit_staged(staged, out)
    assert order[-1] == "model_index.json"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "checkpoint-1", "model_index.json", "unet"]
    assert [p.name for p in (out / "unet").iterdir()] == ["w.safetensors"]
    from hf_munba.utils.atomic_save import ensure_output_dir

    with pytest.raises(ValueError, match="not empty"):
        ensure_output_dir(out, overwrite=False, check_only=True)
    ensure_output_dir(out, overwrite=True, check_only=True)
    assert (out / "model_index.json").is_file()  # a check never touches the disk


def test_model_card_and_push(tmp_path, monkeypatch):
    import huggingface_hub

    from hf_munba.utils.model_card import public_hparams, push_folder_to_hub, sd_model_card

    hp = {"learning_rate": 1e-5, "hub_token": "hf_secret", "train_params": "noxattn"}
    assert "hub_token" not in public_hparams(hp)
    card = sd_model_card(base_model="CompVis/stable-diffusion-v1-4", forgotten=["nudity"],
                         retained=["a person wearing clothes"], hparams=hp,
                         metrics={"after/forget_loss": 0.1}, image_grid="grid.png", lora=True)
    text = str(card)
    assert "hf_secret" not in text
    assert card.data.base_model == "CompVis/stable-diffusion-v1-4"
    assert {"machine-unlearning", "munba", "diffusers", "stable-diffusion", "lora"} <= set(card.data.tags)
    assert "grid.png" in text and "load_lora_weights" in text and "noxattn" in text
    calls = []
    monkeypatch.setattr(huggingface_hub, "create_repo",
                        lambda repo_id, **kw: calls.append(("create", repo_id, kw)) or
                        huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}"))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.append(("upload", kw)))
    assert push_folder_to_hub(tmp_path, "me/model", token="tok", private=True) == "me/model"
    assert calls[0][:2] == ("create", "me/model") and calls[0][2]["private"] is True
    assert calls[1][1]["folder_path"] == str(tmp_path) and calls[1][1]["token"] == "tok"
    assert "checkpoint-*" in calls[1][1]["ignore_patterns"]


def test_training_plot(tmp_path):
    from hf_munba.utils.training_plot import plot_training_history

    hist = [{"step": i, "loss/retain": 1.0 / i, "loss/forget": 0.1, "munba/cos": -0.1,
             "munba/weight_retain": 1.0, "munba/weight_forget": 2.0,
             "munba/grad_norm_retain": 0.5, "munba/grad_norm_forget": 0.2} for i in range(1, 5)]
    path = plot_training_history(hist, tmp_path / "p.png")
    assert Image.open(path).size[0] > 100
