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
           "retain_cross_entropy", "get_forget_loss"]


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
