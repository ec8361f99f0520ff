"""Per-step logic of Stable Diffusion unlearning: a batch in, the two players' losses out.

The training script, the benchmarks and users call the same :class:`SDUnlearner`. It owns no
optimizer and no bargainer: ``retain_loss(batch)`` and ``forget_loss(batch)`` each run one
forward pass (so under DDP each player's forward is followed by its own backward), and the
caller decides how to combine them (``NashBargainer`` or a weighted sum).

Randomness (latent sampling, noise, timesteps) is drawn from the global RNG of the trained
model's device in a fixed order — retain then forget, and inside each: latent, noise, timestep —
so a fixed seed gives the same run, cached latents give the same draws as encoding every step,
and accelerate's checkpoints (which save the CPU and CUDA RNG states) resume exactly. Drawing on
the device rather than copying host draws over keeps the step free of host syncs: a copy from
pageable host memory waits for the GPU to drain its queue.

Under DDP every rank seeds the same RNG; each draws the random numbers of the whole global batch
(``num_processes`` times its own) and keeps the rows of its own samples (``process_index``). The
ranks therefore never share noise or timesteps, and N ranks with batch b draw exactly what one
process with batch N*b draws, so both runs take the same steps.
"""

from __future__ import annotations

import contextlib
from typing import Dict

import torch

from .objectives import (FORGET_OBJECTIVES, RETAIN_OBJECTIVES, TARGET_MODELS, esd_target,
                         forget_loss_from_preds, retain_loss_from_pred)

__all__ = ["SDUnlearner", "adapters_disabled", "unwrap"]


def _plain(model):
    """The plain module under DDP / torch.compile wrappers (accelerate's own unwrapping, the one
    ``accelerator.unwrap_model`` runs; the unlearner has no ``Accelerator`` to ask)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_torch_compile=False)


def unwrap(model):
    """Deprecated: use ``accelerator.unwrap_model`` (or ``accelerate.utils.extract_model_from_parallel``)."""
    import warnings

    warnings.warn("hf_munba.diffusion.unlearner.unwrap is deprecated; use accelerator.unwrap_model",
                  FutureWarning, stacklevel=2)
    return _plain(model)


@contextlib.contextmanager
def adapters_disabled(model):
    """Run ``model`` as its base weights (peft adapters off): the frozen model, with no copy."""
    if hasattr(model, "module") or hasattr(model, "_orig_mod"):  # a wrapper
        model = _plain(model)
    model.disable_adapters()
    try:
        yield model
    finally:
        model.enable_adapters()


@contextlib.contextmanager
def _eval_mode(module):
    """``module`` in eval mode inside (the original model is deterministic, as a frozen copy in
    eval mode was: no dropout, no RNG draws), each submodule's own mode restored on exit."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


class SDUnlearner:
    """Computes L_r and L_f for a paired batch (see :class:`hf_munba.diffusion.data.PairedUnlearningDataset`).

    ``unet`` is the denoiser (a UNet, or SD 3's / Flux's transformer) and ``text_encoder`` the
    first text encoder; ``text_encoders`` holds every text encoder of a family with several
    (SDXL, SD 3, Flux), by component name. ``family`` (a
    :class:`~hf_munba.diffusion.families.ModelFamily`) says how prompts condition the denoiser,
    how latents are noised and what it predicts; by default SD 1.x/2.x on ``noise_scheduler``.
    Models may be accelerate-prepared (DDP-wrapped); the one named by ``train_component``
    (``unet``/``transformer``, or a text encoder's name) gets the gradient.
    ``target_model='frozen'`` and ``retain_objective='distill'`` (see
    :mod:`hf_munba.diffusion.objectives`) use the original model: ``original_weights`` (an
    :class:`~hf_munba.diffusion.original_weights.OriginalWeights` of the trained parameters,
    swapped in for the original's forward: no copy of the component; what the training script
    uses), ``frozen_unet`` / ``frozen_text_encoder`` (a frozen copy of the trained component) or,
    with ``lora=True``, the same model with its adapters disabled.
    """

    def __init__(self, unet, text_encoder, vae, noise_scheduler=None, *,
                 forget_objective: str = "remap", target_model: str = "current",
                 retain_objective: str = "denoise",
                 train_component: str = "unet", lora: bool = False,
                 negative_guidance: float = 1.0, frozen_unet=None, frozen_text_encoder=None,
                 weight_dtype: torch.dtype = torch.float32, num_processes: int = 1,
                 process_index: int = 0, family=None, text_encoders=None,
                 original_weights=None):
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} is not in [0, {num_processes})")
        if forget_objective not in FORGET_OBJECTIVES:
            raise ValueError(f"unknown forget objective {forget_objective!r}; "
                             f"choose one of {FORGET_OBJECTIVES}")
        if target_model not in TARGET_MODELS:
            raise ValueError(f"unknown target model {target_model!r}; choose one of {TARGET_MODELS}")
        if retain_objective not in RETAIN_OBJECTIVES:
            raise ValueError(f"unknown retain objective {retain_objective!r}; "
                             f"choose one of {RETAIN_OBJECTIVES}")
        if family is None:
            from .families import StableDiffusionFamily

            if noise_scheduler is None:
                raise ValueError("SDUnlearner needs a noise_scheduler or a model family")
            family = StableDiffusionFamily(noise_scheduler.config, vae.config,
                                           noise_scheduler=noise_scheduler)
        self.family = family
        self.text_encoders = dict(text_encoders) if text_encoders is not None else {
            family.text_encoders[0].encoder: text_encoder}
        on_denoiser = train_component in ("unet", "transformer")
        if not on_denoiser and train_component not in self.text_encoders:
            raise ValueError(f"unknown train component {train_component!r}; choose the denoiser "
                             f"('unet') or a text encoder of this model {sorted(self.text_encoders)}")
        # gradient ascent has no target model, so it needs no frozen copy for the forget player
        needs = [what for what, used in (
            ("target_model='frozen'", target_model == "frozen" and forget_objective != "ga"),
            ("retain_objective='distill'", retain_objective == "distill")) if used]
        frozen = frozen_unet if on_denoiser else frozen_text_encoder
        if original_weights is not None and (lora or frozen is not None):
            raise ValueError("give one original model: original_weights, a frozen copy, or "
                             "lora=True (the adapters switched off)")
        if needs and not lora and frozen is None and original_weights is None:
            raise ValueError(f"{' and '.join(needs)} without LoRA needs the original "
                             f"{train_component}: original_weights (its trained parameters' "
                             f"first values) or a frozen copy")
        self.unet, self.vae = unet, vae
        self.text_encoder = text_encoder if text_encoder is not None else next(
            iter(self.text_encoders.values()))
        self.noise_scheduler = family.noise_scheduler
        self.forget_objective = forget_objective
        self.target_model = target_model
        self.retain_objective = retain_objective
        self.train_component = "unet" if on_denoiser else train_component
        self.lora = lora
        self.negative_guidance = negative_guidance
        self.frozen_unet, self.frozen_text_encoder = frozen_unet, frozen_text_encoder
        self.original_weights = original_weights
        self.weight_dtype = weight_dtype
        self.num_processes, self.process_index = num_processes, process_index
        self._unwrapped: Dict[int, tuple] = {}

    @property
    def denoiser(self):
        return self.unet

    def _inner(self, model):
        """``model`` without its DDP / compile wrapper, looked up once per model: accelerate's
        unwrapping costs about half a millisecond a call, and the step asks several times."""
        hit = self._unwrapped.get(id(model))
        if hit is None or hit[0] is not model:
            hit = self._unwrapped[id(model)] = (model, _plain(model))
        return hit[1]

    # ---- inputs -------------------------------------------------------------------------------
    def _rows(self, draw, shape):
        """``draw(shape)`` for the global batch; this rank's rows of it (see the module doc)."""
        if self.num_processes == 1:
            return draw(tuple(shape))
        b = shape[0]
        full = draw((b * self.num_processes, *shape[1:]))
        return full[self.process_index * b:(self.process_index + 1) * b]

    @property
    def device(self) -> torch.device:
        return next(self._inner(self.unet).parameters()).device

    def latents(self, batch: Dict, role: str) -> torch.Tensor:
        """A fresh latent sample of the batch's ``role`` images (scaled for the denoiser)."""
        if f"{role}_latent_mean" in batch:
            mean, std = batch[f"{role}_latent_mean"], batch[f"{role}_latent_std"]
            mean, std = mean.to(self.device, torch.float32), std.to(self.device, torch.float32)
        else:
            px = batch[f"{role}_pixel_values"].to(self.device, self.vae.dtype)
            with torch.no_grad():
                dist = self.vae.encode(px).latent_dist
            mean, std = dist.mean.float(), dist.std.float()
        eps = self._rows(lambda s: torch.randn(s, dtype=mean.dtype, device=mean.device), mean.shape)
        return self.family.scale_latents(mean + std * eps)

    def _encoders(self, trained_inner: bool = False) -> Dict[str, torch.nn.Module]:
        return {k: self._inner(m) if trained_inner else m for k, m in self.text_encoders.items()}

    def _cond(self, batch: Dict, role: str, encoders: Dict, grad: bool,
              cached: bool = True) -> Dict[str, torch.Tensor]:
        """The denoiser's conditioning for the batch's ``role`` prompts: the cached embeddings
        when the batch has them (``cached``), else the family's encoding of the token ids.
        Conditioning enters the denoiser in the compute dtype: a frozen denoiser held in
        bf16/fp16 is not under autocast, and a trained text encoder returns fp32."""
        from .data import embedding_key

        if cached and f"{role}_embeddings" in batch:
            keys = ("encoder_hidden_states",) + tuple(
                k for k in self.family.pooled_keys if embedding_key(role, k) in batch)
            cond = {k: batch[embedding_key(role, k)] for k in keys}
        else:
            ids = {s.ids_key: batch[f"{role}_{s.ids_key}"] for s in self.family.text_encoders}
            with torch.set_grad_enabled(grad):
                cond = self.family.encode(encoders, ids)
        return {k: v.to(self.device, self.weight_dtype) for k, v in cond.items()}

    def prompt_embeddings(self, batch: Dict, role: str) -> torch.Tensor:
        """Encoder hidden states of the trained path (with grad when a text encoder is trained)."""
        return self.conditioning(batch, role)["encoder_hidden_states"]

    def conditioning(self, batch: Dict, role: str) -> Dict[str, torch.Tensor]:
        """The trained path's conditioning (with grad when a text encoder is trained)."""
        return self._cond(batch, role, self.text_encoders, self.train_component != "unet")

    def noisy(self, latents: torch.Tensor):
        """(noisy latents, timesteps, the denoiser's training target)."""
        return self.family.noisy(latents, self._rows)

    def predict(self, denoiser, noisy: torch.Tensor, t: torch.Tensor, cond: Dict) -> torch.Tensor:
        return self.family.predict(denoiser, noisy.to(self.weight_dtype), t, cond)

    # ---- target model -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _target(self):
        """(denoiser, text encoders) of the forget player's target model, inside no_grad."""
        if self.target_model == "current":
            with torch.no_grad():
                yield self._inner(self.unet), self._encoders(trained_inner=True)
        else:
            with self._original() as models:
                yield models

    @contextlib.contextmanager
    def _original(self):
        """(denoiser, text encoders) as they were before unlearning, inside no_grad."""
        with torch.no_grad():
            encoders = self._encoders(trained_inner=True)
            denoiser = self._inner(self.unet)
            trained = denoiser if self.train_component == "unet" else \
                encoders[self.train_component]
            if self.lora:
                with adapters_disabled(trained):
                    yield denoiser, encoders
            elif self.original_weights is not None:  # the trained module, as it was
                with self.original_weights.swapped(), _eval_mode(trained):
                    yield denoiser, encoders
            elif self.train_component == "unet":
                yield self.frozen_unet, encoders
            else:
                yield self._inner(self.unet), {**encoders,
                                               self.train_component: self.frozen_text_encoder}

    def _target_cond(self, batch: Dict, role: str, encoders: Dict) -> Dict[str, torch.Tensor]:
        # cached embeddings are the frozen encoders': the target's own only when the denoiser
        # is what is trained
        return self._cond(batch, role, encoders, False, cached=self.train_component == "unet")

    # ---- the players --------------------------------------------------------------------------
    def _image_cond(self, batch: Dict, role: str, latents: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Conditioning that belongs to the ``role`` images rather than to a prompt: SDXL's time
        ids from each image's original size and crop (empty for other families)."""
        if not self.family.micro_conditioning:
            return {}
        scale = self.family.vae_scale
        return {"time_ids": self.family.time_ids(
            latents.shape[0], latents.shape[-2] * scale, latents.shape[-1] * scale,
            original_sizes=batch.get(f"{role}_original_size"),
            crops_top_left=batch.get(f"{role}_crop_top_left"), device=self.device,
            dtype=self.weight_dtype)}

    def retain_loss(self, batch: Dict) -> torch.Tensor:
        latents = self.latents(batch, "retain")
        noisy, t, target = self.noisy(latents)
        image = self._image_cond(batch, "retain", latents)
        cond = {**self.conditioning(batch, "retain"), **image}
        if self.retain_objective == "distill":  # the original's prediction, same inputs
            with self._original() as (denoiser, encoders):
                # a trained denoiser leaves the conditioning as it was: encode the prompts once
                original = cond if self.train_component == "unet" else {
                    **self._target_cond(batch, "retain", encoders), **image}
                target = self.predict(denoiser, noisy, t, original)
        pred = self.predict(self.unet, noisy, t, cond)
        return retain_loss_from_pred(pred, target)

    def forget_loss(self, batch: Dict, role: str = "forget") -> torch.Tensor:
        """The forget player's loss; ``role`` picks the player's keys in the batch: ``forget``
        (one forget player) or ``forget_<name>`` (one concept of several, whose anchor prompt is
        ``anchor_<name>``; see :class:`~hf_munba.diffusion.data.PairedUnlearningDataset`)."""
        if not role.startswith("forget"):
            raise ValueError(f"a forget role starts with 'forget', got {role!r}")
        anchor_role = "anchor" + role[len("forget"):]
        latents = self.latents(batch, role)
        noisy, t, target = self.noisy(latents)
        image = self._image_cond(batch, role, latents)  # every prediction here is on these images
        cond = {**self.conditioning(batch, role), **image}
        if self.forget_objective != "ga":
            with self._target() as (denoiser, encoders):
                def target_cond(prompt_role):
                    cond = self._target_cond(batch, prompt_role, encoders)
                    if prompt_role == "uncond" and self.family.zero_unconditional:
                        cond = {k: torch.zeros_like(v) for k, v in cond.items()}
                    return {**cond, **image}

                if self.forget_objective == "remap":
                    target = self.predict(denoiser, noisy, t, target_cond(anchor_role))
                else:
                    e_u = self.predict(denoiser, noisy, t, target_cond("uncond"))
                    # a trained denoiser leaves the concept prompt's conditioning as it was
                    e_c = self.predict(denoiser, noisy, t, cond if self.train_component == "unet"
                                       else target_cond(role))
                    target = esd_target(e_u, e_c, self.negative_guidance)
        pred = self.predict(self.unet, noisy, t, cond)
        return forget_loss_from_preds(self.forget_objective, pred, target)

    def losses(self, batch: Dict):
        """(L_r, L_f) in the fixed RNG order; both keep their graphs."""
        return self.retain_loss(batch), self.forget_loss(batch)

    @torch.no_grad()
    def evaluate(self, batches, seed: int = 0, forget_roles=("forget",)) -> Dict[str, float]:
        """Mean L_r and L_f over ``batches`` with a fixed seed, leaving the global RNG untouched.

        ``forget_roles``: the forget players to measure (``forget_<name>`` per concept); with
        several, each gets ``forget_loss_<name>`` and ``forget_loss`` is their mean. Every rank
        evaluates the same whole batches, so the draws are not split over ranks here.
        """
        roles = tuple(forget_roles)
        total_r, totals, n = 0.0, {r: 0.0 for r in roles}, 0
        devices = [self.device] if self.device.type == "cuda" else []
        shard, self.num_processes, self.process_index = (self.num_processes, self.process_index), 1, 0
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                for batch in batches:
                    total_r += float(self.retain_loss(batch))
                    for r in roles:
                        totals[r] += float(self.forget_loss(batch, r))
                    n += 1
        finally:
            self.num_processes, self.process_index = shard
        n = max(n, 1)
        out = {"retain_loss": total_r / n, "forget_loss": sum(totals.values()) / n / len(roles)}
        if roles != ("forget",):
            out.update({f"forget_loss_{r[len('forget_'):]}": v / n for r, v in totals.items()})
        return out
