"""Classifier-only unlearning methods, in the one method registry (:mod:`hf_munba.unlearning.methods`).

``munba``, ``munba-paper``, ``weighted``, ``ft`` and ``ga`` are shared with the SD front end and
live there; the methods here need a classifier: random labels (``rl``), an l1 penalty on the
weights (``l1``), SalUn's saliency mask (``salun``) and retraining from scratch (``retrain``).
The trainer computes the losses (cross-entropy on D_r; the forget loss named by
``MunbaArguments.forget_loss`` or the method's default on D_f) and hands them to the method's
hooks; a method sees the data only through :class:`ClassifierContext`, never the trainer.
A method's options are declared on the class (``settings``: ``l1_alpha`` on ``l1``,
``salun_ratio`` on ``salun``) and become ``MunbaArguments`` fields and CLI flags by themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch

from ..unlearning.methods import (METHODS, MethodSetting, UnlearningMethod, available_methods,
                                  get_method, register_method)
from .objectives import retain_cross_entropy

__all__ = ["ClassifierContext", "forget_gradients", "top_share_masks", "UnlearningMethod", "METHODS",
           "register_method", "get_method", "available_methods", "reinitialise_"]

FRONT_END = "classification"


@dataclass
class ClassifierContext:
    """What a classifier method's ``setup`` may use: the forget (and retain) set once, logits,
    the seed. ``retain_batches`` is None where the front end has no retain set to offer."""

    forget_batches: Callable[[], Iterator[Dict[str, Any]]]  # every D_f sample once, on device
    logits: Callable[[torch.nn.Module, Dict[str, Any]], torch.Tensor]
    seed: int = 0
    #: every D_r sample once, in a seeded random order, on device (IU's Fisher samples)
    retain_batches: Optional[Callable[[], Iterator[Dict[str, Any]]]] = None


def forget_gradients(model: torch.nn.Module, context: ClassifierContext,
                     params: List[torch.nn.Parameter], *, absolute: bool = True,
                     sign: float = 1.0) -> List[torch.Tensor]:
    """Sum over D_f's batches of the gradient of ``sign`` * cross-entropy (true labels) w.r.t.
    ``params``, in eval mode (no dropout, frozen batch statistics); with ``absolute`` the sum of
    the per-batch magnitudes (SalUn's saliency, Scissorhands' sensitivity). Zeros where unused."""
    grads = [torch.zeros_like(p) for p in params]
    was_training = model.training
    model.eval()
    try:
        for batch in context.forget_batches():
            labels = batch.pop("labels")
            loss = sign * retain_cross_entropy(context.logits(model, batch), labels)
            g = torch.autograd.grad(loss, params, allow_unused=True)
            for acc, gi in zip(grads, g):
                if gi is not None:
                    acc.add_(gi.abs() if absolute else gi)
    finally:
        model.train(was_training)
    return grads


def top_share_masks(scores: List[torch.Tensor], ratio: float) -> List[torch.Tensor]:
    """Boolean masks (shaped like ``scores``) of the top ``ratio`` share of all entries taken
    together: exactly ``max(1, round(ratio * n))`` of them, even among ties (e.g. at 0)."""
    flat = torch.cat([s.flatten().float() for s in scores])
    k = max(1, int(round(ratio * flat.numel())))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, k, sorted=False).indices] = True
    out, start = [], 0
    for s in scores:
        out.append(keep[start:start + s.numel()].view_as(s))
        start += s.numel()
    return out


@register_method("rl")
class RandomLabel(UnlearningMethod):
    summary = "random labels on D_f plus cross-entropy on D_r"
    uses_forget = True
    front_ends = (FRONT_END,)


@register_method("l1")
class L1Sparse(UnlearningMethod):
    summary = "fine-tune on D_r with an l1 penalty on the weights (Jia et al. 2023)"
    front_ends = (FRONT_END,)
    settings = {"l1_alpha": MethodSetting(
        5e-4, "l1 penalty of method 'l1'", float,
        lambda v: isinstance(v, (int, float)) and v >= 0, ">= 0")}

    def retain_loss(self, loss, model):
        params = [p for p in model.parameters() if p.requires_grad]
        return loss + self.setting("l1_alpha") * torch.stack([p.abs().sum() for p in params]).sum()


@register_method("salun")
class SalUn(UnlearningMethod):
    """Random labelling restricted to the weights most salient for D_f (Fan et al. 2024).

    Saliency = |gradient of the cross-entropy on D_f| at the original weights; the top
    ``salun_ratio`` share (over all trainable entries) is updated, the rest is frozen by
    masking the final gradient each step.
    """

    summary = "random labels, updates masked to the weights most salient for D_f"
    uses_forget = True
    front_ends = (FRONT_END,)
    settings = {"salun_ratio": MethodSetting(
        0.5, "share of weights SalUn updates (most salient for D_f)", float,
        lambda v: isinstance(v, (int, float)) and 0.0 < v <= 1.0, "in (0, 1]")}

    def setup(self, model, context: ClassifierContext):
        params = [p for p in model.parameters() if p.requires_grad]
        grads = forget_gradients(model, context, params)
        self.masks = [m.to(p.dtype) for m, p in zip(top_share_masks(grads, self.setting("salun_ratio")), params)]
        self.mask_params = params

    def edit_gradients(self, params):
        by_id = {id(p): m for p, m in zip(self.mask_params, self.masks)}
        for p in params:
            if p.grad is not None and id(p) in by_id:
                p.grad.mul_(by_id[id(p)].to(p.grad.dtype))


@register_method("retrain")
class Retrain(UnlearningMethod):
    """Train from freshly initialised weights on D_r: the gold reference (slow by design)."""

    summary = "retrain from scratch on D_r (gold reference)"
    front_ends = (FRONT_END,)

    def setup(self, model, context: ClassifierContext):
        reinitialise_(model, context.seed)


def reinitialise_(model: torch.nn.Module, seed: int) -> None:
    """Replace the weights of a ``PreTrainedModel`` by a fresh initialisation from its config."""
    target = getattr(model, "reinitialise_", None)
    if callable(target):
        target(seed)
        return
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("re-initialising the weights (methods 'retrain', 'shs') needs a transformers "
                         "PreTrainedModel (with a config)")
    torch.manual_seed(seed)
    fresh = type(model)(config)
    model.load_state_dict(fresh.state_dict())
