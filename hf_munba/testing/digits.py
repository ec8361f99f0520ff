"""A real, self-trained text-to-image model to show that SD unlearning works, not only that it runs.

No Stable Diffusion weights can be downloaded offline, so this module trains a small pipeline with
the exact Stable Diffusion structure (AutoencoderKL -> UNet2DConditionModel conditioned on a
CLIPTextModel, DDIM sampling) on scikit-learn's 1,797 real handwritten digits, plus a digit
classifier that evaluates generated images. Everything the unlearning scripts consume is saved with
``save_pretrained``: ``<dir>/pipeline`` loads with ``StableDiffusionPipeline.from_pretrained`` and
``<dir>/classifier`` with ``AutoModelForImageClassification`` / ``AutoImageProcessor``.

Builds are deterministic for a given recipe (seeded generators everywhere) and cached under a
directory keyed by a hash of the recipe, so experiments pay the few CPU minutes only once.

Recipe choices (see issue 6): the text encoder is frozen and random but initialised with
``initializer_factor=5.0`` because at the default scale the ten prompts' embeddings differ by only
a few percent and the UNet learns to follow them late and seed-dependently; the VAE's
``scaling_factor`` is 1/std of its sampled latents, as SD does, so the diffusion noise schedule
sees unit-variance latents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..utils.atomic_save import atomic_directory

__all__ = [
    "DIGIT_WORDS",
    "DigitsRecipe",
    "DigitsArtifacts",
    "digit_prompt",
    "load_digits",
    "build_digits_models",
    "load_or_build_digits_models",
    "recipe_hash",
    "classify_digit_images",
    "generate_digit_images",
    "generated_digit_accuracy",
]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT_TEMPLATE = "a handwritten digit {word}"
# Bump when the build code changes in a way that changes the weights for the same recipe.
BUILD_VERSION = 2
# The digits are gray, but the pipeline and classifier work in RGB (gray repeated): every SD tool
# (diffusers' image processor, datasets' imagefolder, our unlearning data loader) feeds RGB images,
# so the digits model is a drop-in stand-in for a real SD checkpoint. It costs only the VAE's
# first and last convolutions.
CHANNELS = 3


def digit_prompt(digit: int) -> str:
    """The caption the pipeline was trained with for ``digit`` (0-9)."""
    if not 0 <= int(digit) <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    return PROMPT_TEMPLATE.format(word=DIGIT_WORDS[int(digit)])


@dataclass(frozen=True)
class DigitsRecipe:
    """Everything that determines the built weights; its hash names the cache directory."""

    seed: int = 0
    resolution: int = 16
    vae_steps: int = 300
    vae_batch_size: int = 64
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-5
    text_width: int = 64
    text_layers: int = 2
    text_initializer_factor: float = 5.0
    unet_channels: Sequence[int] = (32, 64, 64)
    unet_steps: int = 2000
    unet_batch_size: int = 32
    unet_lr: float = 1e-3
    unet_warmup_steps: int = 100
    unet_max_grad_norm: float = 1.0
    ema_decay: float = 0.995
    empty_prompt_prob: float = 0.1
    classifier_epochs: int = 30
    classifier_batch_size: int = 64
    classifier_lr: float = 2e-3
    test_fraction: float = 0.2
    num_images: Optional[int] = None  # a seeded subset of the 1,797 digits (None: all); for tests

    def __post_init__(self):
        object.__setattr__(self, "unet_channels", tuple(int(c) for c in self.unet_channels))
        if self.resolution % 2 or self.resolution < 8:
            raise ValueError(f"resolution must be even and >= 8, got {self.resolution}")
        if not 0.0 <= self.empty_prompt_prob < 1.0:
            raise ValueError(f"empty_prompt_prob must be in [0, 1), got {self.empty_prompt_prob}")
        if self.num_images is not None and not 20 <= self.num_images <= 1797:
            raise ValueError(f"num_images must be in 20..1797 (or None for all), got {self.num_images}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if len(self.unet_channels) != 3:
            raise ValueError("unet_channels must have 3 entries (two cross-attention blocks + one plain)")
        for name in ("vae_steps", "unet_steps", "classifier_epochs", "vae_batch_size",
                     "unet_batch_size", "classifier_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["unet_channels"] = list(self.unet_channels)
        return d


def recipe_hash(recipe: DigitsRecipe) -> str:
    payload = json.dumps({"build_version": BUILD_VERSION, **recipe.to_dict()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class DigitsArtifacts:
    """Paths of a finished build and the numbers measured while building it."""

    root: str
    pipeline_path: str
    classifier_path: str
    metrics: dict
    recipe: dict

    @classmethod
    def from_dir(cls, root: str | os.PathLike) -> "DigitsArtifacts":
        root = Path(root)
        info = json.loads((root / "build_info.json").read_text())
        return cls(root=str(root), pipeline_path=str(root / "pipeline"),
                   classifier_path=str(root / "classifier"), metrics=info["metrics"],
                   recipe=info["recipe"])


# ----------------------------------------------------------------------------------------------
# data


def load_digits(resolution: int = 16, num_channels: int = CHANNELS):
    """scikit-learn's digits as (N, C, R, R) float images in [-1, 1], int labels and captions.

    The 8x8 originals (ink 0..16) are upsampled bilinearly; ink is white on black like MNIST.
    The gray value is repeated over ``num_channels`` (3 by default, see ``CHANNELS``).
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    data = _sk_load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if resolution != 8:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear",
                               align_corners=False)
    images = (images.clamp(0, 1) * 2 - 1).repeat(1, num_channels, 1, 1).contiguous()
    labels = torch.tensor(data.target, dtype=torch.long)
    captions = [digit_prompt(int(y)) for y in labels]
    return images, labels, captions


def _split(n: int, test_fraction: float, seed: int):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 12345))
    n_test = int(round(n * test_fraction))
    return perm[n_test:], perm[:n_test]


# ----------------------------------------------------------------------------------------------
# models


def _make_vae(recipe: DigitsRecipe):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=CHANNELS, out_channels=CHANNELS,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64), latent_channels=4, layers_per_block=1,
        norm_num_groups=32, sample_size=recipe.resolution, mid_block_add_attention=False,
    )


def _make_text_encoder(recipe: DigitsRecipe, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.text_width,
        intermediate_size=2 * recipe.text_width, num_hidden_layers=recipe.text_layers,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        projection_dim=recipe.text_width, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        initializer_factor=recipe.text_initializer_factor,
    )
    return CLIPTextModel(cfg).eval().requires_grad_(False)


def _make_unet(recipe: DigitsRecipe):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=recipe.resolution // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=recipe.unet_channels,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=recipe.text_width,
        attention_head_dim=2,  # the number of heads, for legacy reasons
        norm_num_groups=32,
    )


def _sd_schedulers():
    from diffusers import DDIMScheduler, DDPMScheduler

    kwargs = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  num_train_timesteps=1000, clip_sample=False)
    return DDPMScheduler(**kwargs), DDIMScheduler(**kwargs, set_alpha_to_one=False, steps_offset=1)


def _make_classifier(recipe: DigitsRecipe):
    from transformers import ResNetConfig, ResNetForImageClassification

    id2label = {i: str(i) for i in range(10)}
    cfg = ResNetConfig(num_channels=CHANNELS, embedding_size=32, hidden_sizes=[32, 64], depths=[1, 1],
                       layer_type="basic", num_labels=10, id2label=id2label,
                       label2id={v: k for k, v in id2label.items()},
                       downsample_in_first_stage=False)
    return ResNetForImageClassification(cfg)


def _image_processor(recipe: DigitsRecipe):
    """Maps an RGB PIL image (as the pipeline writes them) to the classifier's [-1, 1] input."""
    from transformers import ViTImageProcessor

    r = recipe.resolution
    return ViTImageProcessor(do_resize=True, size={"height": r, "width": r}, do_rescale=True,
                             rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * CHANNELS,
                             image_std=[0.5] * CHANNELS)


# ----------------------------------------------------------------------------------------------
# training stages


def _batches(n: int, batch_size: int, steps: int, gen: torch.Generator):
    """Epoch-wise reshuffled indices, one batch per step (never the same first batch)."""
    perm, pos = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        yield perm[pos:pos + batch_size]
        pos += batch_size


def _train_vae(vae, images, recipe: DigitsRecipe, log):
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr)
    vae.train()
    for step, idx in enumerate(_batches(len(images), recipe.vae_batch_size, recipe.vae_steps, gen)):
        x = images[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + recipe.vae_kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == recipe.vae_steps - 1:
            log(f"vae step {step} loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    means, stds, recs = [], [], []
    with torch.no_grad():
        for i in range(0, len(images), 256):  # batched: one huge batch is several times slower
            post = vae.encode(images[i:i + 256]).latent_dist
            means.append(post.mean)
            stds.append(post.std)
            recs.append(vae.decode(post.mean).sample)
    mean, std, rec = torch.cat(means), torch.cat(stds), torch.cat(recs)
    z = mean + std * torch.randn(mean.shape, generator=gen)
    scaling = 1.0 / z.std().item()
    rec_mse = F.mse_loss(rec, images).item()
    vae.register_to_config(scaling_factor=scaling)
    return mean, std, rec, rec_mse


def _encode_prompts(tokenizer, text_encoder, prompts: List[str]) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def _train_unet(unet, lat_mean, lat_std, scaling, labels, prompt_embeds, empty_embed,
                recipe: DigitsRecipe, log):
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    noise_scheduler, _ = _sd_schedulers()
    gen = torch.Generator().manual_seed(recipe.seed + 2)
    opt = torch.optim.AdamW(unet.parameters(), lr=recipe.unet_lr)
    sched = get_cosine_schedule_with_warmup(opt, recipe.unet_warmup_steps, recipe.unet_steps)
    ema = EMAModel(unet.parameters(), decay=recipe.ema_decay)
    unet.train()
    cond_table = torch.cat([prompt_embeds, empty_embed], 0)  # row 10 = empty prompt
    for step, idx in enumerate(_batches(len(labels), recipe.unet_batch_size, recipe.unet_steps,
                                        gen)):
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen))
        z0 = z0 * scaling
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),),
                          generator=gen)
        zt = noise_scheduler.add_noise(z0, noise, t)
        drop = torch.rand(len(idx), generator=gen) < recipe.empty_prompt_prob
        cond = cond_table[torch.where(drop, torch.full_like(labels[idx], 10), labels[idx])]
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), recipe.unet_max_grad_norm)
        opt.step()
        sched.step()
        ema.step(unet.parameters())
        if step % 250 == 0 or step == recipe.unet_steps - 1:
            log(f"unet step {step} loss {loss.item():.4f}")
    ema.copy_to(unet.parameters())
    unet.eval().requires_grad_(False)


def _train_classifier(clf, images, labels, train_idx, recipe: DigitsRecipe, log):
    """Trained with +-1 pixel shifts and light noise so generated digits are judged fairly."""
    gen = torch.Generator().manual_seed(recipe.seed + 3)
    steps_per_epoch = math.ceil(len(train_idx) / recipe.classifier_batch_size)
    steps = recipe.classifier_epochs * steps_per_epoch
    opt = torch.optim.AdamW(clf.parameters(), lr=recipe.classifier_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.classifier_lr,
                                                total_steps=steps)
    x_all, y_all = images[train_idx], labels[train_idx]
    clf.train()
    for step, idx in enumerate(_batches(len(train_idx), recipe.classifier_batch_size, steps, gen)):
        x = F.pad(x_all[idx], (1, 1, 1, 1), value=-1.0)
        dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
        r = recipe.resolution
        x = x[:, :, dy:dy + r, dx:dx + r]
        x = (x + 0.1 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
        loss = F.cross_entropy(clf(pixel_values=x).logits, y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % steps_per_epoch == 0 and (step // steps_per_epoch) % 10 == 0:
            log(f"classifier epoch {step // steps_per_epoch} loss {loss.item():.4f}")
    clf.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# evaluation helpers


@torch.no_grad()
def classify_digit_images(classifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted digit for (N, 3, R, R) images in [-1, 1] (the pipeline's ``output_type="pt"``
    images are in [0, 1]: pass ``2 * x - 1``)."""
    preds = [classifier(pixel_values=images[i:i + batch_size]).logits.argmax(-1)
             for i in range(0, len(images), batch_size)]
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


@torch.no_grad()
def generate_digit_images(pipeline, prompts: Sequence[str], num_images_per_prompt: int,
                          guidance_scale: float, seed: int = 0, num_inference_steps: int = 25,
                          batch_size: int = 200,
                          noise_of: Optional[Sequence[int]] = None) -> torch.Tensor:
    """(len(prompts) * n, 3, R, R) images in [-1, 1], prompt-major.

    Image k of prompt i has its own generator seeded by (seed, i, k), so it does not depend on
    the batch size or on which other prompts are generated alongside it. Large batches matter on
    CPU: a tiny UNet's forward pass costs about the same for 2 images as for 40.
    ``noise_of[i]`` replaces i in that seed. The evaluation draws the ten prompts in digit order,
    so the "three" prompt alone with ``noise_of=[3]`` gives exactly its evaluation images, and any
    prompt with ``noise_of=[2]`` is drawn from the noises the "two" prompt was evaluated on.
    """
    if noise_of is not None and len(noise_of) != len(prompts):
        raise ValueError(f"noise_of needs one index per prompt ({len(prompts)}), got {len(noise_of)}")
    index = list(range(len(prompts))) if noise_of is None else [int(i) for i in noise_of]
    jobs = [(index[n], k, p) for n, p in enumerate(prompts) for k in range(num_images_per_prompt)]
    out = []
    for s in range(0, len(jobs), batch_size):
        chunk = jobs[s:s + batch_size]
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + 1000 * i + k) for i, k, _ in chunk]
        img = pipeline([p for _, _, p in chunk], guidance_scale=guidance_scale,
                       num_inference_steps=num_inference_steps, generator=gens,
                       output_type="pt").images
        out.append(img * 2 - 1)
    return torch.cat(out)


def generated_digit_accuracy(pipeline, classifier, digits: Sequence[int] = range(10),
                             num_images_per_prompt: int = 20, guidance_scale: float = 3.0,
                             seed: int = 0, num_inference_steps: int = 25,
                             prompt_for: Optional[Dict[int, str]] = None) -> Dict[int, float]:
    """Share of images generated from each digit's prompt that the classifier calls that digit."""
    digits = list(digits)
    prompts = [(prompt_for or {}).get(d, digit_prompt(d)) for d in digits]
    imgs = generate_digit_images(pipeline, prompts, num_images_per_prompt, guidance_scale, seed,
                                 num_inference_steps)
    preds = classify_digit_images(classifier, imgs).view(len(digits), num_images_per_prompt)
    return {d: (preds[i] == d).float().mean().item() for i, d in enumerate(digits)}


# ----------------------------------------------------------------------------------------------
# build + cache


def build_digits_models(output_dir: str | os.PathLike, recipe: DigitsRecipe = DigitsRecipe(),
                        eval_guidance_scales: Sequence[float] = (1.5, 3.0),
                        eval_images_per_digit: int = 20, log=print) -> DigitsArtifacts:
    """Train the pipeline and the classifier and write them to ``output_dir`` (must not exist or
    be empty). Written atomically: a temp dir next to the target is renamed into place."""
    from diffusers import StableDiffusionPipeline

    from .factories import tiny_clip_tokenizer

    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} exists and is not empty")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    images, labels, _ = load_digits(recipe.resolution)
    if recipe.num_images is not None:
        keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(recipe.seed))
        keep = keep[:recipe.num_images].sort().values
        images, labels = images[keep], labels[keep]
    train_idx, test_idx = _split(len(images), recipe.test_fraction, recipe.seed)

    torch.manual_seed(recipe.seed)
    vae = _make_vae(recipe)
    lat_mean, lat_std, recon, rec_mse = _train_vae(vae, images, recipe, log)
    scaling = vae.config.scaling_factor
    t_vae = time.perf_counter()

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(recipe.seed + 10)
    text_encoder = _make_text_encoder(recipe, tokenizer)
    prompt_embeds = _encode_prompts(tokenizer, text_encoder, [digit_prompt(d) for d in range(10)])
    empty_embed = _encode_prompts(tokenizer, text_encoder, [""])
    pooled = prompt_embeds.flatten(1)
    cos = F.cosine_similarity(pooled[:, None], pooled[None], dim=-1)
    prompt_sep = (1 - cos[~torch.eye(10, dtype=torch.bool)]).mean().item()

    torch.manual_seed(recipe.seed + 20)
    unet = _make_unet(recipe)
    _train_unet(unet, lat_mean, lat_std, scaling, labels, prompt_embeds, empty_embed, recipe, log)
    t_unet = time.perf_counter()

    torch.manual_seed(recipe.seed + 30)
    clf = _make_classifier(recipe)
    _train_classifier(clf, images, labels, train_idx, recipe, log)
    test_acc = (classify_digit_images(clf, images[test_idx]) == labels[test_idx]).float().mean()
    rec_acc = (classify_digit_images(clf, recon[test_idx].clamp(-1, 1)) == labels[test_idx])
    t_clf = time.perf_counter()

    _, ddim = _sd_schedulers()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=ddim, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    gen_acc = {}
    for g in eval_guidance_scales:
        acc = generated_digit_accuracy(pipe, clf, num_images_per_prompt=eval_images_per_digit,
                                       guidance_scale=g, seed=recipe.seed)
        gen_acc[str(g)] = {"mean": sum(acc.values()) / len(acc),
                           "per_digit": {str(k): v for k, v in acc.items()}}
        log(f"generated-image accuracy at guidance {g}: {gen_acc[str(g)]['mean']:.3f}")
    t_eval = time.perf_counter()

    metrics = {
        "vae_reconstruction_mse": rec_mse,
        "vae_scaling_factor": scaling,
        "prompt_embedding_mean_cosine_distance": prompt_sep,
        "classifier_test_accuracy": test_acc.item(),
        "classifier_test_accuracy_on_vae_reconstructions": rec_acc.float().mean().item(),
        "generated_accuracy": gen_acc,
        "images_per_digit": eval_images_per_digit,
        "num_parameters": {"vae": sum(p.numel() for p in vae.parameters()),
                           "unet": sum(p.numel() for p in unet.parameters()),
                           "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
                           "classifier": sum(p.numel() for p in clf.parameters())},
        "seconds": {"vae": t_vae - t_start, "unet": t_unet - t_vae, "classifier": t_clf - t_unet,
                    "eval": t_eval - t_clf, "total": t_eval - t_start},
        "torch_threads": torch.get_num_threads(),
    }
    with atomic_directory(output_dir) as tmp:
        pipe.save_pretrained(tmp / "pipeline", safe_serialization=True)
        clf.save_pretrained(tmp / "classifier", safe_serialization=True)
        _image_processor(recipe).save_pretrained(tmp / "classifier")
        (tmp / "build_info.json").write_text(json.dumps(
            {"recipe": recipe.to_dict(), "recipe_hash": recipe_hash(recipe),
             "build_version": BUILD_VERSION, "metrics": metrics}, indent=2))
    return DigitsArtifacts.from_dir(output_dir)


def default_cache_dir() -> Path:
    env = os.environ.get("HF_MUNBA_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_munba"
    return base / "digits"


def load_or_build_digits_models(recipe: DigitsRecipe = DigitsRecipe(),
                                cache_dir: str | os.PathLike | None = None,
                                log=print, **build_kwargs) -> DigitsArtifacts:
    """The cached build for ``recipe`` (``<cache_dir>/<recipe hash>``), building it if missing.

    A finished build is always complete on disk (it appears by rename), so an interrupted build
    leaves only a hidden temp dir behind and is redone next time.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / recipe_hash(recipe)
    if (target / "build_info.json").is_file():
        log(f"reusing cached digits models in {target}")
        return DigitsArtifacts.from_dir(target)
    log(f"building digits models into {target}")
    return build_digits_models(target, recipe, log=log, **build_kwargs)
