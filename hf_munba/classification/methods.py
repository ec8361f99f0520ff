"""Unlearning methods for :class:`~hf_munba.classification.trainer.MunbaTrainer`: one short class each.

A method says which losses it uses (retain on D_r, forget on D_f), how they meet the
gradient (summed by autograd, or bargained through :class:`~hf_munba.NashBargainer`), and
optionally prepares the model before training or edits the final gradient. Everything else
(data, accumulation, precision, clipping, logging, checkpoints, DDP) belongs to the trainer, so
every method runs on exactly the same pipeline. Adding a method touches only this file::

    @register_method("my_method")
    class MyMethod(UnlearningMethod):
        forget_weight = 0.5
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, List

import torch

from .objectives import get_forget_loss, retain_cross_entropy

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import MunbaArguments, MunbaTrainer

__all__ = ["UnlearningMethod", "METHODS", "register_method", "get_method", "available_methods"]

from ..unlearning.registry import METHODS, available_methods, get_method, register_method


class UnlearningMethod:
    """Base: fine-tuning on the retain set; subclasses switch pieces on or off."""

    name: ClassVar[str] = ""
    uses_retain: ClassVar[bool] = True
    uses_forget: ClassVar[bool] = False
    bargains: ClassVar[bool] = False
    default_forget_loss: ClassVar[str] = "random_label"
    summary: ClassVar[str] = ""

    def __init__(self, config: "MunbaArguments"):
        self.config = config
        self.forget_loss_name = config.forget_loss or self.default_forget_loss
        self._forget_loss = get_forget_loss(self.forget_loss_name)

    @property
    def forget_weight(self) -> float:
        return 1.0

    def setup(self, trainer: "MunbaTrainer", model: torch.nn.Module) -> None:
        """Called once at the start of ``train()``, before any checkpoint is loaded."""

    def retain_loss(self, model, logits, labels) -> torch.Tensor:
        return retain_cross_entropy(logits, labels)

    def forget_loss(self, model, logits, labels, generator=None) -> torch.Tensor:
        return self.forget_weight * self._forget_loss(logits, labels, generator=generator)

    def edit_gradients(self, trainer: "MunbaTrainer", params: List[torch.nn.Parameter]) -> None:
        """Last chance to change the final gradient, before clipping and the optimizer step."""


@register_method("munba")
class Munba(UnlearningMethod):
    summary = "Nash bargaining between the retain and forget gradients (Wu & Harandi 2024)"
    uses_forget = True
    bargains = True


@register_method("weighted")
class Weighted(UnlearningMethod):
    summary = "L_r + lam * L_f, one summed gradient"
    uses_forget = True

    @property
    def forget_weight(self) -> float:
        return self.config.forget_weight


@register_method("ft")
class FineTune(UnlearningMethod):
    summary = "fine-tune on D_r only (catastrophic forgetting)"


@register_method("ga")
class GradientAscent(UnlearningMethod):
    summary = "gradient ascent on D_f only"
    uses_retain = False
    uses_forget = True
    default_forget_loss = "neg_ce"


@register_method("rl")
class RandomLabel(UnlearningMethod):
    summary = "random labels on D_f plus cross-entropy on D_r"
    uses_forget = True


@register_method("l1")
class L1Sparse(UnlearningMethod):
    summary = "fine-tune on D_r with an l1 penalty on the weights (Jia et al. 2023)"

    def retain_loss(self, model, logits, labels):
        ce = retain_cross_entropy(logits, labels)
        params = [p for p in model.parameters() if p.requires_grad]
        return ce + self.config.l1_alpha * torch.stack([p.abs().sum() for p in params]).sum()


@register_method("salun")
class SalUn(UnlearningMethod):
    """Random labelling restricted to the weights most salient for D_f (Fan et al. 2024).

    Saliency = |gradient of the cross-entropy on D_f| at the original weights; the top
    ``salun_ratio`` share (over all trainable entries) is updated, the rest is frozen by
    masking the final gradient each step.
    """

    summary = "random labels, updates masked to the weights most salient for D_f"
    uses_forget = True

    def setup(self, trainer, model):
        params = [p for p in model.parameters() if p.requires_grad]
        grads = [torch.zeros_like(p) for p in params]
        was_training = model.training
        model.eval()
        for batch in trainer.iter_forget_batches_once():
            labels = batch.pop("labels")
            logits = trainer.model_logits(model, batch)
            g = torch.autograd.grad(retain_cross_entropy(logits, labels), params, allow_unused=True)
            for acc, gi in zip(grads, g):
                if gi is not None:
                    acc.add_(gi.abs())
        model.train(was_training)
        flat = torch.cat([g.flatten().float() for g in grads])
        k = max(1, int(round(self.config.salun_ratio * flat.numel())))
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.topk(flat, k, sorted=False).indices] = True  # exactly k, even among ties at 0
        self.masks, start = [], 0
        for p in params:
            self.masks.append(keep[start:start + p.numel()].view_as(p).to(p.dtype))
            start += p.numel()
        self.mask_params = params

    def edit_gradients(self, trainer, params):
        by_id = {id(p): m for p, m in zip(self.mask_params, self.masks)}
        for p in params:
            if p.grad is not None and id(p) in by_id:
                p.grad.mul_(by_id[id(p)].to(p.grad.dtype))


@register_method("retrain")
class Retrain(UnlearningMethod):
    """Train from freshly initialised weights on D_r: the gold reference (slow by design)."""

    summary = "retrain from scratch on D_r (gold reference)"

    def setup(self, trainer, model):
        reinitialise_(model, trainer.args.seed)


def reinitialise_(model: torch.nn.Module, seed: int) -> None:
    """Replace the weights of a ``PreTrainedModel`` by a fresh initialisation from its config."""
    target = getattr(model, "reinitialise_", None)
    if callable(target):
        target(seed)
        return
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("method 'retrain' needs a transformers PreTrainedModel (with a config)")
    torch.manual_seed(seed)
    fresh = type(model)(config)
    model.load_state_dict(fresh.state_dict())
