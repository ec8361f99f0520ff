"""The original model without a copy of it: the trained parameters' first values, swapped in.

The distilled retain loss and ``--target_model frozen`` need the model as it was before
unlearning. A frozen ``deepcopy`` of the trained component holds every one of its parameters a
second time, although a run that trains a subset (the class-wise ``xattn`` setting: a few percent
of a UNet, 0.72B of Flux's 11.9B) changes only that subset. :class:`OriginalWeights` keeps a copy
of the trained parameters alone and, for one no-grad forward, points each of them at its original
value (``param.data`` swapped, no copy), then back. Everything else in the module is shared with
the trained model, which is also why the original's prediction is bit-identical to the trained
model's before the first step by construction, in any precision: same module, same dtypes, same
kernels (a bf16 copy of an fp32 trained module matches only as far as autocast treats both
alike).

Safe because the swap only ever spans a ``torch.no_grad`` forward of the plain module (not a DDP
or compile wrapper): no autograd graph records the swapped values, and every parameter points at
its trained value again before any backward (gradient checkpointing's recomputation included).
The trainer refuses FSDP and DeepSpeed, whose flattened or partitioned parameters this would not
see. The copy is taken before a checkpoint is loaded, so a resumed run distils towards the same
original. Memory: one copy of the trained parameters, in their training dtype (fp32).

That is not always the cheaper original: under 16-bit mixed precision a frozen copy of the whole
module in the compute dtype takes 2 bytes per parameter, less than 4 bytes per trained parameter
once more than half of the module trains (the paper's ``noxattn`` nudity setting trains 95 % of a
UNet). :func:`choose_original` picks the smaller, so no run holds more than the frozen copy did.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, List

import torch

__all__ = ["OriginalWeights", "choose_original"]


def choose_original(module: torch.nn.Module, params: Iterable[torch.nn.Parameter], *,
                    trained_dtype: torch.dtype, compute_dtype: torch.dtype) -> str:
    """``"weights"`` (an :class:`OriginalWeights` of ``params``, held in ``trained_dtype``) or
    ``"copy"`` (a frozen copy of ``module`` in ``compute_dtype``): whichever takes less memory;
    the exact one, ``"weights"``, on a tie."""
    kept = sum(p.numel() for p in params) * trained_dtype.itemsize
    copied = sum(p.numel() for p in module.parameters()) * compute_dtype.itemsize
    return "weights" if kept <= copied else "copy"


class OriginalWeights:
    """The values ``params`` have now, to run their module as it was: ``with ow.swapped(): ...``."""

    def __init__(self, params: Iterable[torch.nn.Parameter]):
        self.params: List[torch.nn.Parameter] = list(params)
        if not self.params:
            raise ValueError("OriginalWeights got no parameters")
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("OriginalWeights got the same parameter twice")
        with torch.no_grad():
            self.values = [p.detach().clone() for p in self.params]
        self._active = False

    @property
    def num_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.values)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside: every parameter holds its original value, and gradients are off. The trained
        values come back on exit, also when the block raises."""
        if self._active:
            raise RuntimeError("OriginalWeights.swapped() blocks cannot be nested")
        for p, v in zip(self.params, self.values):
            if p.device != v.device or p.dtype != v.dtype or p.shape != v.shape:
                raise RuntimeError(
                    f"a trained parameter moved or changed since its original was kept "
                    f"({tuple(v.shape)} {v.dtype} on {v.device} -> {tuple(p.shape)} {p.dtype} on "
                    f"{p.device}); make OriginalWeights after the model's last .to()")
        current = [p.data for p in self.params]
        self._active = True
        try:
            with torch.no_grad():
                for p, v in zip(self.params, self.values):
                    p.data = v
                yield
        finally:
            for p, c in zip(self.params, current):
                p.data = c
            self._active = False
