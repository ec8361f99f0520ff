"""The two players' losses for diffusion unlearning, as functions of noise predictions.

Retain (player 0), ``RETAIN_OBJECTIVES``:

* ``denoise`` (the paper): the standard denoising loss on D_r, MSE(pred(x_t, t, caption), target)
  with target = noise (epsilon prediction) or the velocity (v prediction).
* ``distill``: MSE(pred(x_t, t, caption), sg[pred_0(x_t, t, caption)]) with pred_0 the original
  model (the trained parameters' first values swapped in, a frozen copy, or the same model with
  its LoRA adapters off), on the same D_r latents,
  noise and captions. It is zero before unlearning and its gradient is the drift of the retained
  prompts' predictions alone. The denoising loss of a well-trained model is mostly sampling noise
  (which noise, which timestep): its gradient points somewhere new every batch, and scale-free
  bargaining, which gives each player's *direction* its say whatever its norm, spends the retain
  player's half of the step on that noise. The distilled gradient is small but points at the
  damage; bargaining gives it full say at once, where a weighted sum lets the damage grow until
  the loss is large enough to count. Costs one no-grad forward of the original per retain batch
  (and, without LoRA, the trained parameters' original values, or a frozen copy where that is
  smaller, in memory: :mod:`hf_munba.diffusion.original_weights`).

Forget (player 1), ``FORGET_OBJECTIVES``:

* ``remap`` (MUNBa / SalUn): MSE(pred(x_t, t, forget prompt), sg[pred'(x_t, t, anchor prompt)]).
  The forget prompt is steered to what the anchor ("a photo of a person wearing clothes", or the
  next class) would produce from the same noisy latent. pred' is the *target model*: the current
  weights (under no_grad) or the frozen original.
* ``ga``: gradient ascent on the denoising loss of D_f, -MSE(pred(x_t, t, forget prompt), target).
  Unbounded below; use with care (it is the classic baseline).
* ``esd`` (Gandikota et al. 2023): MSE(pred(x_t, t, c), sg[e_u - eta (e_c - e_u)]) where e_u, e_c
  are the target model's unconditional and concept predictions (negative guidance ``eta``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["FORGET_OBJECTIVES", "RETAIN_OBJECTIVES", "TARGET_MODELS", "denoising_target",
           "retain_loss_from_pred", "forget_loss_from_preds", "esd_target"]

FORGET_OBJECTIVES = ("remap", "ga", "esd")
RETAIN_OBJECTIVES = ("denoise", "distill")
TARGET_MODELS = ("current", "frozen")


def denoising_target(noise_scheduler, latents, noise, timesteps) -> torch.Tensor:
    """What the model should predict for ``noise_scheduler.add_noise(latents, noise, timesteps)``."""
    pred_type = noise_scheduler.config.prediction_type
    if pred_type == "epsilon":
        return noise
    if pred_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {pred_type!r} (epsilon or v_prediction)")


def retain_loss_from_pred(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def esd_target(uncond_pred: torch.Tensor, concept_pred: torch.Tensor, negative_guidance: float):
    return uncond_pred - negative_guidance * (concept_pred - uncond_pred)


def forget_loss_from_preds(objective: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``remap``/``esd``: MSE to the no-grad target; ``ga``: minus the denoising MSE."""
    if objective not in FORGET_OBJECTIVES:
        raise ValueError(f"unknown forget objective {objective!r}; choose one of {FORGET_OBJECTIVES}")
    if target.requires_grad and objective != "ga":
        raise ValueError("the remap/esd target must be computed without gradient (torch.no_grad)")
    mse = F.mse_loss(pred.float(), target.float(), reduction="mean")
    return -mse if objective == "ga" else mse
