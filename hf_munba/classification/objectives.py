"""Forget and retain losses for classifiers, as functions of logits and true labels.

Random labelling (SalUn, and the MUNBa paper's classification forget loss) trains the forget
samples towards a wrong label drawn afresh for every batch, so the model un-learns the true
class without being pushed to any single replacement. Negated cross-entropy is gradient ascent:
unbounded, fast to destroy, and the classic baseline.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

__all__ = ["FORGET_LOSSES", "random_labels", "random_label_cross_entropy", "negated_cross_entropy",
           "retain_cross_entropy", "distilled_kl", "RETAIN_OBJECTIVES", "get_forget_loss"]

RETAIN_OBJECTIVES = ("ce", "distill")


def random_labels(labels: torch.Tensor, num_classes: int,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A uniformly drawn label different from each true label (never the true one)."""
    if num_classes < 2:
        raise ValueError("random relabelling needs at least two classes")
    offset = torch.randint(1, num_classes, labels.shape, generator=generator, device="cpu")
    if labels.device.type == "cuda":  # a copy from pageable memory would sync with the GPU
        offset = offset.pin_memory().to(labels.device, non_blocking=True)
    return (labels + offset.to(labels.device)) % num_classes


def retain_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, **_) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


class _DistilledKL(torch.autograd.Function):
    """KL(p_0 || p) averaged over the batch, with the gradient written as (p - p_0) / B.

    Autograd through ``log_softmax`` gives the same gradient up to rounding, -p_0 + p * sum(p_0),
    which is about 1e-7 rather than 0 at the original model. Bargaining is scale-free: a
    rounding residue would get the retain player's full say at the first step. Written this way
    the gradient is exactly zero when the logits equal the original's, so a player with nothing to
    repair proposes nothing.
    """

    @staticmethod
    def forward(ctx, logits, original_logits):
        log_p = F.log_softmax(logits, dim=-1)
        log_p0 = F.log_softmax(original_logits, dim=-1)
        p0 = log_p0.exp()
        ctx.save_for_backward(log_p, p0)
        return (p0 * (log_p0 - log_p)).sum(-1).mean()

    @staticmethod
    def backward(ctx, grad_out):
        log_p, p0 = ctx.saved_tensors
        return grad_out * (log_p.exp() - p0) / log_p.shape[0], None


def distilled_kl(logits: torch.Tensor, original_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_0 || p) per sample, averaged over the batch; ``original_logits`` carry no gradient.
    Exactly zero, with an exactly zero gradient, when ``logits`` equal ``original_logits``."""
    if original_logits.requires_grad:
        raise ValueError("the original model's logits must be computed without gradient (torch.no_grad)")
    dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16/fp16 logits: in float32
    c = logits.shape[-1]
    return _DistilledKL.apply(logits.to(dtype).reshape(-1, c), original_logits.to(dtype).reshape(-1, c))


def random_label_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                               generator: Optional[torch.Generator] = None, **_) -> torch.Tensor:
    return F.cross_entropy(logits.float(), random_labels(labels, logits.shape[-1], generator))


def negated_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, **_) -> torch.Tensor:
    return -F.cross_entropy(logits.float(), labels)


FORGET_LOSSES: Dict[str, Callable[..., torch.Tensor]] = {
    "random_label": random_label_cross_entropy,
    "neg_ce": negated_cross_entropy,
}


def get_forget_loss(name: str) -> Callable[..., torch.Tensor]:
    try:
        return FORGET_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown forget loss {name!r}; choose one of {sorted(FORGET_LOSSES)}") from None
