"""Model-family adapters (SD 1.x/2.x, SDXL, SD 3, Flux) against the families' own pipelines."""

import json

import pytest
import torch

from hf_munba.diffusion.families import (FAMILIES, FluxFamily, detect_family, family_of_pipeline,
                                         family_for_pipeline_class)
from hf_munba.testing.families import TINY_FAMILY_PIPELINES

PROMPTS = ["a photo of a cat", "a dog"]
EXPECTED = {"sd": "sd", "sd2": "sd", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}


@pytest.fixture(scope="module")
def pipes():
    return {name: make(0) for name, make in TINY_FAMILY_PIPELINES.items()}


def _parts(pipe, family):
    toks = {s.tokenizer: getattr(pipe, s.tokenizer) for s in family.text_encoders}
    encs = {s.encoder: getattr(pipe, s.encoder) for s in family.text_encoders}
    return toks, encs


def _reference(name, pipe, family):
    """The family pipeline's own encode_prompt, at the adapter's sequence length."""
    if name in ("sd", "sd2"):
        embeds, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
        return {"encoder_hidden_states": embeds}
    if name == "sdxl":
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu",
                                                  do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}
    if name == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPTS, PROMPTS, PROMPTS, device="cpu", do_classifier_free_guidance=False,
            max_sequence_length=family.max_length(family.text_encoders[-1], pipe.tokenizer_3))
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    embeds, pooled, _ = pipe.encode_prompt(
        PROMPTS, PROMPTS, device="cpu",
        max_sequence_length=family.max_length(family.text_encoders[-1], pipe.tokenizer_2))
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


@pytest.mark.parametrize("name", list(TINY_FAMILY_PIPELINES))
def test_encoding_matches_the_pipelines_encode_prompt(pipes, name):
    pipe = pipes[name]
    family = family_of_pipeline(pipe)
    assert family.name == EXPECTED[name]
    toks, encs = _parts(pipe, family)
    with torch.no_grad():
        cond = family.encode(encs, family.tokenize(toks, PROMPTS))
        ref = _reference(name, pipe, family)
    assert set(cond) == set(ref)
    for key in ref:
        torch.testing.assert_close(cond[key], ref[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", list(TINY_FAMILY_PIPELINES))
def test_prediction_has_the_latents_layout_and_trains_the_denoiser(pipes, name):
    pipe = pipes[name]
    family = family_of_pipeline(pipe)
    toks, encs = _parts(pipe, family)
    denoiser = getattr(pipe, family.denoiser)
    with torch.no_grad():
        cond = family.encode(encs, family.tokenize(toks, PROMPTS))
        z = pipe.vae.encode(torch.rand(2, 3, 16, 16) * 2 - 1).latent_dist.sample()
    latents = family.scale_latents(z)
    torch.manual_seed(0)
    noisy, t, target = family.noisy(latents)
    assert noisy.shape == target.shape == latents.shape and t.shape == (2,)
    denoiser.zero_grad()
    pred = family.predict(denoiser, noisy, t, cond)
    assert pred.shape == latents.shape and torch.isfinite(pred).all()
    torch.nn.functional.mse_loss(pred, target).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in denoiser.parameters())


def test_ddpm_targets_epsilon_and_v():
    sd1 = family_of_pipeline(TINY_FAMILY_PIPELINES["sd"](0))
    sd2 = family_of_pipeline(TINY_FAMILY_PIPELINES["sd2"](0))
    x = torch.randn(3, 4, 8, 8)
    for family, pred_type in ((sd1, "epsilon"), (sd2, "v_prediction")):
        assert family.prediction_type == pred_type
        torch.manual_seed(1)
        noisy, t, target = family.noisy(x)
        torch.manual_seed(1)
        noise = torch.randn_like(x)
        s = family.noise_scheduler
        torch.testing.assert_close(noisy, s.add_noise(x, noise, t))
        expected = noise if pred_type == "epsilon" else s.get_velocity(x, noise, t)
        torch.testing.assert_close(target, expected)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_flow_matching_interpolates_on_the_shifted_sigmas(pipes, name):
    family = family_of_pipeline(pipes[name])
    x = torch.randn(64, 4, 8, 8)
    torch.manual_seed(2)
    noisy, t, target = family.noisy(x)
    sigmas = (t / family.noise_scheduler.config.num_train_timesteps).view(-1, 1, 1, 1)
    # x_t = (1 - s) x_0 + s n and target = n - x_0  =>  x_0 = x_t - s * target
    torch.testing.assert_close(noisy - sigmas * target, x, rtol=1e-5, atol=1e-5)
    assert (sigmas > 0).all() and (sigmas <= 1).all()
    shift = family.noise_scheduler.config.shift
    assert sigmas.mean() > 0.5 if shift > 1 else True  # a shift > 1 favours noisier steps
    torch.testing.assert_close(family.loss_weighting(t), torch.ones_like(t, dtype=torch.float32))


def test_scale_and_shift_follow_the_vae_config(pipes):
    family = family_of_pipeline(pipes["flux"])
    assert (family.scaling_factor, family.shift_factor) == (1.5, pytest.approx(0.1))
    z = torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(family.scale_latents(z), (z - 0.1) * 1.5)
    assert family_of_pipeline(pipes["sd"]).shift_factor == 0.0


def test_flux_guidance_embedding_is_fed(pipes):
    pipe = pipes["flux"]
    a, b = FluxFamily(pipe.scheduler.config, pipe.vae.config, pipe.transformer.config,
                      guidance_scale=1.0), \
        FluxFamily(pipe.scheduler.config, pipe.vae.config, pipe.transformer.config,
                   guidance_scale=4.0)
    toks, encs = _parts(pipe, a)
    with torch.no_grad():
        cond = a.encode(encs, a.tokenize(toks, PROMPTS))
        x, t = torch.randn(2, 4, 4, 4), torch.tensor([500.0, 100.0])
        assert not torch.allclose(a.predict(pipe.transformer, x, t, cond),
                                  b.predict(pipe.transformer, x, t, cond))


@pytest.mark.parametrize("name", list(TINY_FAMILY_PIPELINES))
def test_detected_from_a_saved_pipeline(tmp_path, pipes, name):
    pipes[name].save_pretrained(tmp_path)
    family = detect_family(str(tmp_path))
    assert family.name == EXPECTED[name]
    assert family.describe().startswith(family.name)


def test_unsupported_pipeline_one_clear_error(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="unsupported pipeline 'KandinskyPipeline'"):
        detect_family(str(tmp_path))
    assert family_for_pipeline_class("FluxPipeline") is FAMILIES["flux"]


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_transformer_subsets_split_text_and_image_streams(pipes, name):
    from hf_munba.diffusion.params import (TRANSFORMER_SUBSETS, lora_target_modules,
                                           select_parameter_names)

    model = pipes[name].transformer
    every = {n for n, _ in model.named_parameters()}
    picked = {s: set(select_parameter_names(model, s, "transformer")) for s in TRANSFORMER_SUBSETS}
    assert picked["full"] == every
    assert picked["xattn"] and all(".attn.add_" in n or ".attn.to_add_out." in n
                                   for n in picked["xattn"])
    assert not picked["xattn"] & picked["noxattn"]
    assert not any(n.startswith(("context_embedder", "time_text_embed", "proj_out"))
                   or "ff_context" in n for n in picked["noxattn"])
    assert picked["selfattn"] <= picked["noxattn"]
    if name == "flux":  # the single-stream blocks carry both streams: edited with the image prior
        assert any(n.startswith("single_transformer_blocks") for n in picked["noxattn"])
    targets = lora_target_modules(model, "xattn", "transformer")
    assert targets and all(t.split(".")[-1] in ("add_q_proj", "add_k_proj", "add_v_proj",
                                                "to_add_out") for t in targets)


def test_t5_lora_targets_are_its_attention(pipes):
    from hf_munba.diffusion.params import lora_target_modules, select_parameter_names

    t5 = pipes["sd3"].text_encoder_3
    targets = lora_target_modules(t5, "full", "text_encoder_3")
    assert targets and all(t.rsplit(".", 1)[-1] in "qkvo" and "SelfAttention" in t for t in targets)
    assert all("SelfAttention" in n for n in select_parameter_names(t5, "selfattn", "text_encoder_3"))


LORA_PARTS = {"sd": ("unet", "text_encoder"), "sdxl": ("unet", "text_encoder", "text_encoder_2"),
              "sd3": ("transformer", "text_encoder", "text_encoder_2"),
              "flux": ("transformer", "text_encoder")}


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "flux"])
def test_lora_of_every_component_saves_in_the_familys_format(tmp_path, name):
    from hf_munba.diffusion.export import lora_components, save_lora
    from hf_munba.diffusion.params import add_lora_adapter

    pipe = TINY_FAMILY_PIPELINES[name](0)
    assert lora_components(type(pipe)) == LORA_PARTS[name]
    for part in LORA_PARTS[name]:
        params = add_lora_adapter(getattr(pipe, part), rank=2, alpha=4, component=part)
        with torch.no_grad():
            for p in params:  # a trained adapter: B != 0, so the output changes
                p.add_(0.05 * torch.randn_like(p))
    kw = dict(num_inference_steps=2, height=16, width=16, output_type="np")
    trained = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    save_lora(tmp_path, pipeline_class=type(pipe), **{p: getattr(pipe, p) for p in LORA_PARTS[name]})
    fresh = TINY_FAMILY_PIPELINES[name](0)
    base = fresh("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    fresh.load_lora_weights(str(tmp_path))
    again = fresh("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(base - trained).max() > 1e-4
    assert abs(again - trained).max() < 1e-5
    with pytest.raises(ValueError, match="stores LoRA layers of"):
        save_lora(tmp_path, pipeline_class=type(pipe), text_encoder_3=pipe.text_encoder)


def test_sdxl_time_ids_come_from_each_images_original_size_and_crop(pipes):
    from PIL import Image

    from hf_munba.diffusion.data import preprocess_image
    from hf_munba.diffusion.unlearner import SDUnlearner

    img = Image.new("RGB", (20, 12), (200, 10, 10))  # landscape: resized to 13 x 8, crop left 2
    px, geo = preprocess_image(img, 8, geometry=True)
    assert px.shape == (3, 8, 8) and geo == ((12, 20), (0, 2))
    px2, geo2 = preprocess_image(img, 8, center_crop=False, geometry=True,
                                 generator=torch.Generator().manual_seed(0))
    assert geo2[0] == (12, 20) and 0 <= geo2[1][1] <= 5 and geo2[1][0] == 0
    pipe = pipes["sdxl"]
    family = family_of_pipeline(pipe)
    ids = family.time_ids(1, 16, 16, original_sizes=torch.tensor([[12, 20]]),
                          crops_top_left=torch.tensor([[0, 2]]))
    assert ids.tolist() == [[12.0, 20.0, 0.0, 2.0, 16.0, 16.0]]
    toks, encs = _parts(pipe, family)
    batch = {"retain_pixel_values": torch.rand(1, 3, 16, 16) * 2 - 1,
             **{f"retain_{k}": v for k, v in family.tokenize(toks, ["a cat"]).items()}}
    un = SDUnlearner(pipe.unet, None, pipe.vae, family=family, text_encoders=encs)
    losses = []
    for extra in ({}, {"retain_original_size": torch.tensor([[12, 20]]),
                       "retain_crop_top_left": torch.tensor([[0, 2]])},
                  {"retain_original_size": torch.tensor([[16, 16]]),
                   "retain_crop_top_left": torch.tensor([[0, 0]])}):
        torch.manual_seed(0)
        with torch.no_grad():
            losses.append(float(un.retain_loss({**batch, **extra})))
    assert losses[1] != losses[0]  # the recorded geometry reaches the UNet's add_embedding
    assert losses[2] == losses[0]  # a native-size, uncropped image: the generation-time ids


def test_the_dataset_records_image_geometry_with_and_without_the_latent_cache(pipes):
    from PIL import Image

    from hf_munba.diffusion.data import ImageCaptionSource, LatentCache, PairedUnlearningDataset
    from hf_munba.diffusion.families import PromptTokenizer

    pipe = pipes["sdxl"]
    family = family_of_pipeline(pipe)
    toks, encs = _parts(pipe, family)
    imgs = [Image.new("RGB", (20, 12), (i * 40, 0, 0)) for i in range(2)]
    src = ImageCaptionSource("mem", imgs, ["a", "b"], [], [(20, 12)] * 2)
    ds = PairedUnlearningDataset(src, src, PromptTokenizer(family, toks), 8, anchor_prompt="c",
                                 image_geometry=True)
    item = ds[0]
    assert item["retain_original_size"].tolist() == [12, 20]
    assert item["forget_crop_top_left"].tolist() == [0, 2]
    assert {"retain_input_ids", "retain_input_ids_2"} <= set(item)
    ds.cache = LatentCache().build(ds, pipe.vae, encode=lambda ids: family.encode(encs, ids))
    cached = ds[0]
    assert cached["retain_original_size"].tolist() == [12, 20]
    assert {"retain_embeddings", "retain_cond_text_embeds"} <= set(cached)
    assert "retain_input_ids" not in cached


def test_sdxl_esd_unconditional_is_the_pipelines_zero_conditioning(pipes):
    from hf_munba.diffusion.unlearner import SDUnlearner

    assert family_of_pipeline(pipes["sdxl"]).zero_unconditional  # force_zeros_for_empty_prompt
    assert not family_of_pipeline(pipes["sd3"]).zero_unconditional
    pipe = pipes["sdxl"]
    family = family_of_pipeline(pipe)
    toks, encs = _parts(pipe, family)
    batch = {"forget_pixel_values": torch.rand(1, 3, 16, 16) * 2 - 1}
    for role, text in (("forget", "nudity"), ("uncond", "")):
        batch.update({f"{role}_{k}": v for k, v in family.tokenize(toks, [text]).items()})
    un = SDUnlearner(pipe.unet, None, pipe.vae, family=family, text_encoders=encs,
                     forget_objective="esd")
    other = {**batch, **{f"uncond_{k}": v for k, v in family.tokenize(toks, ["a dog"]).items()}}
    losses = []
    for b in (batch, other):
        torch.manual_seed(0)
        with torch.no_grad():
            losses.append(float(un.forget_loss(b)))
    assert losses[0] == losses[1]  # e_u is the zero-conditioned prediction, whatever the text


def test_native_resolution_of_every_family(pipes):
    expected = {"sd": 16, "sd2": 16, "sdxl": 16, "sd3": 16, "flux": 256}  # Flux: its pipeline's 128
    for name, pipe in pipes.items():
        assert family_of_pipeline(pipe).native_resolution == expected[name], name
