"""Model-family adapters: what SD 1.x/2.x, SDXL, SD 3 and Flux do differently in one training step.

Unlearning itself is family-agnostic: a retain loss (denoise D_r) and forget losses that compare
the trained model's prediction with a target prediction (``remap``, ``esd``) or ascend the
denoising loss (``ga``). What changes between families is only how a prompt becomes conditioning,
how an image becomes a latent, how a latent is noised and what the denoiser must predict, and how
the denoiser is called. A :class:`ModelFamily` owns exactly those four things, so the objectives
(:mod:`hf_munba.diffusion.objectives`) stay the same for every family:

=========  ====================  =============================  ===================  ==============
family     pipeline              text encoders -> conditioning  noising / target      denoiser call
=========  ====================  =============================  ===================  ==============
``sd``     StableDiffusion       CLIP last hidden state         DDPM; epsilon or v    UNet
``sdxl``   StableDiffusionXL     2x CLIP penultimate, concat;   DDPM; epsilon or v    UNet +
                                 pooled of the 2nd; time ids                          ``added_cond_kwargs``
``sd3``    StableDiffusion3      2x CLIP penultimate (+pooled)  flow matching:        SD3Transformer2D
                                 padded, then T5 on the tokens  x_t=(1-s)x_0+s*n,
                                                                target n - x_0
``flux``   Flux                  CLIP pooled + T5 tokens        flow matching         FluxTransformer2D on
                                                                                      packed 2x2 latents,
                                                                                      ids, guidance
=========  ====================  =============================  ===================  ==============

SD 2.x is the ``sd`` family with ``prediction_type="v_prediction"`` in its scheduler. The
encodings reproduce the family pipeline's own ``encode_prompt`` exactly (tested), but run on
token ids the data pipeline prepared once, with gradients when a text encoder is trained (the
pipelines' ``encode_prompt`` tokenizes every call). Flow-matching timesteps follow diffusers'
SD 3 / Flux training examples: ``u ~ compute_density_for_timestep_sampling``, the training
scheduler's ``timesteps[u * N]`` and its (shifted) ``sigmas``; with the default schemes the loss
weighting of ``compute_loss_weighting_for_sd3`` is 1, so the plain MSE is the examples' loss.

Every random draw goes through ``rows(draw, shape)`` (:meth:`SDUnlearner._rows`), which makes N
ranks draw what one process with the global batch draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Sequence, Tuple

import torch

from .objectives import denoising_target

__all__ = ["ModelFamily", "StableDiffusionFamily", "StableDiffusionXLFamily",
           "StableDiffusion3Family", "FluxFamily", "FAMILIES", "family_for_pipeline_class",
           "detect_family", "family_of_pipeline", "Rows", "model_index",
           "PipelineComponents", "load_components", "PromptTokenizer", "load_pipeline"]

Rows = Callable[[Callable[[Tuple[int, ...]], torch.Tensor], Sequence[int]], torch.Tensor]


def _all_rows(draw, shape):
    return draw(tuple(shape))


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of a pipeline: its component names and the batch key of its token ids."""

    tokenizer: str
    encoder: str
    ids_key: str


class ModelFamily:
    """Base: the SD 1.x/2.x behaviour (one CLIP encoder, DDPM noising, a UNet).

    An instance is bound to one pipeline's scheduler, VAE and denoiser configs (plain dicts, as
    in ``model_index.json``'s folders), so it needs no model weights and can be built before any
    model is loaded (the config check runs first).
    """

    name: ClassVar[str] = "sd"
    pipeline_classes: ClassVar[Tuple[str, ...]] = ("StableDiffusionPipeline",)
    denoiser: ClassVar[str] = "unet"
    text_encoders: ClassVar[Tuple[TextEncoderSlot, ...]] = (
        TextEncoderSlot("tokenizer", "text_encoder", "input_ids"),)
    flow_matching: ClassVar[bool] = False

    #: conditioning tensors besides ``encoder_hidden_states`` (pooled text embeddings)
    pooled_keys: ClassVar[Tuple[str, ...]] = ()
    #: the denoiser is conditioned on each image's original size and crop (SDXL's time ids)
    micro_conditioning: ClassVar[bool] = False

    def __init__(self, scheduler_config: Mapping[str, Any], vae_config: Mapping[str, Any],
                 denoiser_config: Optional[Mapping[str, Any]] = None, *,
                 noise_scheduler=None, pipeline_config: Optional[Mapping[str, Any]] = None):
        # SDXL's pipeline conditions its unconditional branch on zeros, not on the encoded
        # empty prompt (force_zeros_for_empty_prompt): ESD's e_u must be that same prediction
        self.zero_unconditional = bool((pipeline_config or {}).get(
            "force_zeros_for_empty_prompt", False))
        self.scheduler_config = dict(scheduler_config)
        self.vae_config = dict(vae_config)
        self.denoiser_config = dict(denoiser_config or {})
        self.scaling_factor = float(self.vae_config.get("scaling_factor", 0.18215))
        shift = self.vae_config.get("shift_factor")
        self.shift_factor = float(shift) if shift is not None else 0.0
        if not self.flow_matching:
            from diffusers import DDPMScheduler

            # the training noise schedule: DDPM's alphas from the pipeline's betas, whatever
            # sampler the pipeline ships with (DDIM, Euler, ...), as diffusers' examples do
            self.noise_scheduler = noise_scheduler or DDPMScheduler.from_config(
                self.scheduler_config)
            self.prediction_type = self.noise_scheduler.config.prediction_type
            if self.prediction_type not in ("epsilon", "v_prediction"):
                raise ValueError(f"unsupported prediction_type {self.prediction_type!r} "
                                 "(epsilon or v_prediction)")

    # ---- prompts ------------------------------------------------------------------------------
    def tokenize(self, tokenizers: Mapping[str, Any], prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Token ids of ``prompts`` for every text encoder, padded as the pipeline pads them."""
        out = {}
        for slot in self.text_encoders:
            tok = tokenizers[slot.tokenizer]
            out[slot.ids_key] = tok(list(prompts), padding="max_length",
                                    max_length=self.max_length(slot, tok), truncation=True,
                                    return_tensors="pt").input_ids
        return out

    def max_length(self, slot: TextEncoderSlot, tokenizer) -> int:
        return tokenizer.model_max_length

    def encode(self, text_encoders: Mapping[str, torch.nn.Module],
               ids: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The denoiser's conditioning for a batch of token ids (keyword -> tensor)."""
        slot = self.text_encoders[0]
        enc = text_encoders[slot.encoder]
        return {"encoder_hidden_states": enc(ids[slot.ids_key].to(_device(enc)),
                                             return_dict=False)[0]}

    # ---- latents, noise, target ---------------------------------------------------------------
    def scale_latents(self, sample: torch.Tensor) -> torch.Tensor:
        """A VAE latent sample as the denoiser sees it: ``(z - shift) * scale``."""
        return (sample - self.shift_factor) * self.scaling_factor

    def noisy(self, latents: torch.Tensor, rows: Rows = _all_rows):
        """(noisy latents, timesteps, training target) for clean ``latents``."""
        device = latents.device
        noise = rows(lambda s: torch.randn(s, dtype=latents.dtype, device=device), latents.shape)
        t = rows(lambda s: torch.randint(0, self.noise_scheduler.config.num_train_timesteps, s,
                                         device=device), (latents.shape[0],))
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        return noisy, t, denoising_target(self.noise_scheduler, latents, noise, t)

    # ---- the denoiser -------------------------------------------------------------------------
    def predict(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor,
                cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The denoiser's prediction, in the latents' layout."""
        return denoiser(noisy, timesteps, cond["encoder_hidden_states"], return_dict=False)[0]

    @property
    def vae_scale(self) -> int:
        """Pixels per latent along a side: 2 ** (number of VAE blocks - 1)."""
        return 2 ** (len(self.vae_config.get("block_out_channels", (0,) * 4)) - 1)

    @property
    def native_resolution(self) -> Optional[int]:
        """The image size the family's pipeline generates by default: the denoiser's
        ``sample_size`` in latents x :attr:`vae_scale` (None when the config has none)."""
        size = self.denoiser_config.get("sample_size")
        return int(size) * self.vae_scale if size else None

    def component_name(self, train_component: str) -> Optional[str]:
        """The pipeline's name of what ``--train_component`` trains, or None if this family has
        no such component: ``unet`` means the denoiser of every family (so one set of flags
        works everywhere), ``transformer`` only a transformer, a text encoder its own name."""
        if train_component == "unet" or train_component == self.denoiser:
            return self.denoiser
        if train_component in (s.encoder for s in self.text_encoders):
            return train_component
        return None

    #: extra ``from_pretrained`` arguments for a pipeline that only generates validation images
    validation_pipeline_kwargs: ClassVar[Dict[str, Any]] = {}

    @property
    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_classes[0])

    def describe(self) -> str:
        target = "flow matching (noise - x_0)" if self.flow_matching else self.prediction_type
        return f"{self.name} ({self.pipeline_classes[0]}, {self.denoiser}, target {target})"


def _device(module) -> torch.device:
    return next(module.parameters()).device


def _clip_penultimate(encoder, ids):
    """(penultimate hidden state, pooled/projected output) of a CLIP text encoder, as SDXL and
    SD 3 use it (``clip_skip=None``)."""
    out = encoder(ids.to(_device(encoder)), output_hidden_states=True)
    return out.hidden_states[-2], out[0]


class StableDiffusionFamily(ModelFamily):
    """SD 1.x and SD 2.x (v-prediction comes from the scheduler's ``prediction_type``)."""

    validation_pipeline_kwargs = {"safety_checker": None, "requires_safety_checker": False}


class StableDiffusionXLFamily(ModelFamily):
    """SDXL: two CLIP encoders and the micro-conditioning time ids.

    ``add_time_ids`` = original size + crop top-left + target size. The data pipeline records
    each training image's original (height, width) and the (top, left) offset its crop took
    (``<role>_original_size``, ``<role>_crop_top_left``, as diffusers' SDXL training example
    does), and every prediction on that image, the target model's included, gets those ids;
    without them the target size and no crop are used, which is what SDXL's pipeline passes at
    generation time.
    """

    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    pooled_keys = ("text_embeds",)
    micro_conditioning = True
    text_encoders = (TextEncoderSlot("tokenizer", "text_encoder", "input_ids"),
                     TextEncoderSlot("tokenizer_2", "text_encoder_2", "input_ids_2"))

    def encode(self, text_encoders, ids):
        hidden, pooled = [], None
        for slot in self.text_encoders:
            h, p = _clip_penultimate(text_encoders[slot.encoder], ids[slot.ids_key])
            hidden.append(h)
            pooled = p  # the last (projected) encoder's pooled output
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def time_ids(self, batch_size: int, height: int, width: int, *,
                 original_sizes: Optional[torch.Tensor] = None,
                 crops_top_left: Optional[torch.Tensor] = None,
                 device=None, dtype=torch.float32) -> torch.Tensor:
        target = torch.tensor([height, width], dtype=dtype, device=device).expand(batch_size, 2)
        orig = target if original_sizes is None else original_sizes.to(device, dtype)
        crop = torch.zeros_like(target) if crops_top_left is None else crops_top_left.to(device, dtype)
        return torch.cat([orig, crop, target], dim=1)

    def predict(self, denoiser, noisy, timesteps, cond):
        time_ids = cond.get("time_ids")
        if time_ids is None:
            h, w = noisy.shape[-2] * self.vae_scale, noisy.shape[-1] * self.vae_scale
            time_ids = self.time_ids(noisy.shape[0], h, w, device=noisy.device,
                                     dtype=cond["text_embeds"].dtype)
        return denoiser(noisy, timesteps, cond["encoder_hidden_states"],
                        added_cond_kwargs={"text_embeds": cond["text_embeds"],
                                           "time_ids": time_ids}, return_dict=False)[0]


class _FlowMatchingFamily(ModelFamily):
    """SD 3 and Flux: rectified-flow training on the scheduler's shifted sigmas."""

    flow_matching = True
    denoiser = "transformer"
    pooled_keys = ("pooled_projections",)
    weighting_scheme: ClassVar[str] = "none"
    max_sequence_length: ClassVar[int] = 512

    def __init__(self, scheduler_config, vae_config, denoiser_config=None, *,
                 weighting_scheme: Optional[str] = None, logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29,
                 max_sequence_length: Optional[int] = None, noise_scheduler=None,
                 pipeline_config: Optional[Mapping[str, Any]] = None):
        super().__init__(scheduler_config, vae_config, denoiser_config,
                         pipeline_config=pipeline_config)
        from diffusers import FlowMatchEulerDiscreteScheduler

        # a private copy at its training timesteps: generation's set_timesteps must not move them
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        self.prediction_type = "flow_matching"
        self.weighting_scheme = weighting_scheme or type(self).weighting_scheme
        if self.weighting_scheme not in ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap"):
            raise ValueError(f"unknown weighting_scheme {self.weighting_scheme!r}")
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        if max_sequence_length is not None:
            self.max_sequence_length = int(max_sequence_length)

    def max_length(self, slot, tokenizer):
        if slot.encoder == self.text_encoders[-1].encoder:  # T5
            return min(self.max_sequence_length, tokenizer.model_max_length)
        return tokenizer.model_max_length

    def noisy(self, latents, rows: Rows = _all_rows):
        from diffusers.training_utils import compute_density_for_timestep_sampling

        device, b = latents.device, latents.shape[0]
        noise = rows(lambda s: torch.randn(s, dtype=latents.dtype, device=device), latents.shape)
        u = rows(lambda s: compute_density_for_timestep_sampling(
            self.weighting_scheme, batch_size=s[0], logit_mean=self.logit_mean,
            logit_std=self.logit_std, mode_scale=self.mode_scale, device=device), (b,))
        n = self.noise_scheduler.config.num_train_timesteps
        index = (u * n).long().clamp_(0, n - 1).cpu()
        timesteps = self.noise_scheduler.timesteps[index].to(device)
        sigmas = self.noise_scheduler.sigmas[index].to(device, latents.dtype)
        sigmas = sigmas.view(-1, *([1] * (latents.ndim - 1)))
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        return noisy, timesteps, noise - latents

    def loss_weighting(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights of the scheme (1 for ``none``/``logit_normal``/``mode``)."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        n = self.noise_scheduler.config.num_train_timesteps
        sigmas = timesteps.float() / n
        return compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas)


class StableDiffusion3Family(_FlowMatchingFamily):
    """SD 3 / 3.5: CLIP-L + CLIP-G + T5 on a joint-attention transformer (MMDiT)."""

    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    text_encoders = (TextEncoderSlot("tokenizer", "text_encoder", "input_ids"),
                     TextEncoderSlot("tokenizer_2", "text_encoder_2", "input_ids_2"),
                     TextEncoderSlot("tokenizer_3", "text_encoder_3", "input_ids_3"))
    weighting_scheme = "logit_normal"  # train_dreambooth_sd3.py's default
    max_sequence_length = 256  # StableDiffusion3Pipeline's default

    def encode(self, text_encoders, ids):
        (h1, p1), (h2, p2) = (_clip_penultimate(text_encoders[s.encoder], ids[s.ids_key])
                              for s in self.text_encoders[:2])
        t5 = text_encoders["text_encoder_3"]
        t5_embeds = t5(ids["input_ids_3"].to(_device(t5)))[0]
        clip = torch.cat([h1, h2], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5_embeds.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5_embeds.to(clip.dtype)], dim=-2),
                "pooled_projections": torch.cat([p1, p2], dim=-1)}

    def predict(self, denoiser, noisy, timesteps, cond):
        return denoiser(hidden_states=noisy, timestep=timesteps,
                        encoder_hidden_states=cond["encoder_hidden_states"],
                        pooled_projections=cond["pooled_projections"], return_dict=False)[0]


class FluxFamily(_FlowMatchingFamily):
    """Flux: CLIP's pooled output + T5 tokens; the transformer sees packed 2x2 latent patches
    with image/text position ids and (Flux dev) a distilled guidance embedding."""

    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    text_encoders = (TextEncoderSlot("tokenizer", "text_encoder", "input_ids"),
                     TextEncoderSlot("tokenizer_2", "text_encoder_2", "input_ids_2"))
    max_sequence_length = 512  # FluxPipeline's default

    @property
    def native_resolution(self) -> Optional[int]:
        # FluxTransformer2DModel's config has no sample_size; FluxPipeline's default is 128
        # latents a side (1024 px for Flux dev / schnell)
        return 128 * self.vae_scale

    def __init__(self, *args, guidance_scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        # diffusers' Flux LoRA example trains with guidance 1.0 for the distilled embedding
        self.guidance_scale = float(guidance_scale)

    def encode(self, text_encoders, ids):
        clip, t5 = text_encoders["text_encoder"], text_encoders["text_encoder_2"]
        pooled = clip(ids["input_ids"].to(_device(clip)), output_hidden_states=False).pooler_output
        embeds = t5(ids["input_ids_2"].to(_device(t5)))[0]
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(self, denoiser, noisy, timesteps, cond):
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        embeds = cond["encoder_hidden_states"]
        txt_ids = torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = None
        if self.denoiser_config.get("guidance_embeds", False):
            guidance = torch.full((b,), self.guidance_scale, device=noisy.device, dtype=noisy.dtype)
        out = denoiser(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                       pooled_projections=cond["pooled_projections"], encoder_hidden_states=embeds,
                       txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, h * self.vae_scale, w * self.vae_scale,
                                            self.vae_scale)


FAMILIES: Dict[str, type] = {f.name: f for f in (StableDiffusionFamily, StableDiffusionXLFamily,
                                                 StableDiffusion3Family, FluxFamily)}


def family_for_pipeline_class(class_name: str) -> type:
    """The family of a pipeline class name (``model_index.json``'s ``_class_name``)."""
    for family in FAMILIES.values():
        if class_name in family.pipeline_classes:
            return family
    known = sorted(c for f in FAMILIES.values() for c in f.pipeline_classes)
    raise ValueError(f"unsupported pipeline {class_name!r}: hf_munba unlearns {known}")


def _load_config(cls, path: str, subfolder: Optional[str], **hub) -> Dict[str, Any]:
    kwargs = {k: v for k, v in hub.items() if v is not None}
    if subfolder is not None:
        kwargs["subfolder"] = subfolder
    return dict(cls.load_config(path, **kwargs))


def model_index(path: str, *, revision: Optional[str] = None,
                cache_dir: Optional[str] = None) -> Dict[str, Any]:
    """A pipeline's ``model_index.json`` (a local folder or a Hub repo; configs only)."""
    from diffusers import DiffusionPipeline

    return _load_config(DiffusionPipeline, path, None, revision=revision, cache_dir=cache_dir)


def detect_family(path: str, *, revision: Optional[str] = None, cache_dir: Optional[str] = None,
                  **options) -> ModelFamily:
    """The family adapter of a pipeline (a local folder or a Hub repo), from its
    ``model_index.json`` and the scheduler / VAE / denoiser configs; no weights are read, so a
    wrong model fails before any download of weights."""
    # load_config only reads the JSON named by the class's config_name: any scheduler class
    # reads scheduler_config.json, any model class config.json
    from diffusers import AutoencoderKL, DDPMScheduler

    index = model_index(path, revision=revision, cache_dir=cache_dir)
    family = family_for_pipeline_class(index.get("_class_name", ""))
    missing = [c for c in (family.denoiser, "vae", "scheduler",
                           *(s.encoder for s in family.text_encoders),
                           *(s.tokenizer for s in family.text_encoders))
               if not (isinstance(index.get(c), (list, tuple)) and index[c][0])]
    if missing:
        raise ValueError(f"{path}: a {index['_class_name']} without {missing}")
    hub = dict(revision=revision, cache_dir=cache_dir)
    scheduler = _load_config(DDPMScheduler, path, "scheduler", **hub)
    vae = _load_config(AutoencoderKL, path, "vae", **hub)
    denoiser = _load_config(AutoencoderKL, path, family.denoiser, **hub)
    return family(scheduler, vae, denoiser, pipeline_config=index, **options)


def family_of_pipeline(pipe, **options) -> ModelFamily:
    """The family adapter of a loaded pipeline object."""
    family = family_for_pipeline_class(type(pipe).__name__)
    return family(pipe.scheduler.config, pipe.vae.config,
                  getattr(pipe, family.denoiser).config, pipeline_config=pipe.config, **options)


def load_pipeline(path: str, **kwargs):
    """``DiffusionPipeline.from_pretrained`` for a pipeline of a supported family, with the safety
    checker off where the pipeline has one (it would black out exactly the images unlearning
    data and nudity metrics need). Refuses an unsupported pipeline class before loading weights."""
    from diffusers import DiffusionPipeline

    index = model_index(path, revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir"))
    family_for_pipeline_class(index.get("_class_name", ""))
    if "safety_checker" in index:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    return DiffusionPipeline.from_pretrained(path, **kwargs)


def _component_class(library: str, class_name: str):
    import importlib

    return getattr(importlib.import_module(library), class_name)


@dataclass
class PipelineComponents:
    """The modules one unlearning run needs (no scheduler: the family keeps its training copy)."""

    family: ModelFamily
    vae: torch.nn.Module
    denoiser: torch.nn.Module
    text_encoders: Dict[str, torch.nn.Module]
    tokenizers: Dict[str, Any]


def load_components(path: str, family: ModelFamily, *, revision: Optional[str] = None,
                    variant: Optional[str] = None, cache_dir: Optional[str] = None
                    ) -> PipelineComponents:
    """Load the VAE, the denoiser, the text encoders and their tokenizers of a pipeline, each
    with the class its ``model_index.json`` names (what ``DiffusionPipeline.from_pretrained``
    does, without the parts training does not use: safety checker, feature extractor, ...)."""
    index = model_index(path, revision=revision, cache_dir=cache_dir)
    hub = {k: v for k, v in dict(revision=revision, cache_dir=cache_dir).items() if v is not None}

    def load(name, weights=True):
        library, class_name = index[name]
        cls = _component_class(library, class_name)
        extra = dict(hub, variant=variant) if weights and variant else hub
        return cls.from_pretrained(path, subfolder=name, **extra)

    return PipelineComponents(
        family=family, vae=load("vae"), denoiser=load(family.denoiser),
        text_encoders={s.encoder: load(s.encoder) for s in family.text_encoders},
        tokenizers={s.tokenizer: load(s.tokenizer, weights=False) for s in family.text_encoders})


class PromptTokenizer:
    """Text -> the token ids of every text encoder of a family (``{ids_key: 1-D ids}``), with
    each tokenizer's padding; what :class:`~hf_munba.diffusion.data.PairedUnlearningDataset`
    stores per prompt. Plain attributes only, so it pickles into DataLoader workers."""

    def __init__(self, family: ModelFamily, tokenizers: Mapping[str, Any]):
        self.family, self.tokenizers = family, dict(tokenizers)

    @property
    def keys(self) -> Tuple[str, ...]:
        return tuple(s.ids_key for s in self.family.text_encoders)

    def __call__(self, text: str) -> Dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.family.tokenize(self.tokenizers, [text]).items()}
