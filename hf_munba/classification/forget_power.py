"""The forget player's default bargaining power, chosen from what the forget set is.

Two kinds of forget set ask for different games. Forgetting whole **classes**, the ideal model
(retrained without them) classifies none of D_f, so the forget player must move the model far
and the paper's symmetric game (power 1) is right: on the digits benchmark every power below 1
missed forgetting a class within the budget on some seed. Forgetting **samples** of classes the
retain set keeps (random forgetting), the retrained model still classifies most of D_f (97-99 %
on digits), so the forget player should move the model only a little and its random-label loss
pulls against the very classes the retain player keeps. At power 1 its learning-rate search
settled on a rate where D_f barely moves, and some seeds never reached the band around
retrain's accuracy (random 10 % on each of three machines, 5 seeds of 10 on one, and on a ViT).
At 0.2 every random-10 % seed forgot, on both models and every machine. Against the best
weighted sum it kept more test accuracy on the ResNet on two machines and tied on the third; on
the ViT it trails at the first point (docs/classification.md, "The forget player's power
follows the forget set").

The kind is read from the labels, not from how the split was asked for: a forget set is
"classes" when none of its labels occurs in the retain set, "samples" otherwise. That holds for
``forget_indices`` that happen to select a whole class, and for a split made outside hf_munba.
Every rank reads the same datasets (the Trainer shards batches, not datasets), so every rank
chooses the same power; ranks given different datasets would bargain under different powers and
drift apart silently, so under DDP the trainer checks that they agree.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping, Optional

import numpy as np

__all__ = ["CLASS_FORGET_POWER", "SAMPLE_FORGET_POWER", "forget_set_kind", "power_for_kind",
           "default_forget_power", "dataset_labels", "check_same_on_every_rank"]

logger = logging.getLogger(__name__)

#: the forget player's power for whole classes (the paper's symmetric game)
CLASS_FORGET_POWER = 1.0
#: the forget player's power for samples of classes the retain set keeps
SAMPLE_FORGET_POWER = 0.2


def dataset_labels(dataset: Any, column: str = "labels") -> Optional[np.ndarray]:
    """The label column (``labels`` or ``label``) of a ``datasets.Dataset``, read without running
    its transform, or of an :class:`~hf_munba.classification.data.InMemoryDataset`; None when
    the dataset exposes none (a torch ``Dataset``: reading every row could load every image)."""
    from datasets import Dataset

    names = dataset.column_names if isinstance(dataset, Dataset) else None  # not iterable ones
    columns = getattr(dataset, "columns", None)
    for col in (column, "label"):
        if names is not None and col in names:
            return np.asarray(dataset.with_format(None)[col])
        if isinstance(columns, Mapping) and col in columns:
            return np.asarray(columns[col])
    return None


def forget_set_kind(forget_datasets: Iterable[Any], retain_dataset: Any) -> Optional[str]:
    """``"classes"`` (no forget label is a retain label), ``"samples"``, or None when some
    labels cannot be read."""
    retain = dataset_labels(retain_dataset)
    if retain is None:
        return None
    forget = [dataset_labels(ds) for ds in forget_datasets]
    if not forget or any(f is None for f in forget):
        return None
    shared = np.intersect1d(np.concatenate(forget), retain)
    return "samples" if shared.size else "classes"


def power_for_kind(kind: Optional[str]) -> float:
    """The default power for a forget set of ``kind`` (None, unknown: the class default)."""
    return SAMPLE_FORGET_POWER if kind == "samples" else CLASS_FORGET_POWER


def default_forget_power(forget_datasets: Iterable[Any], retain_dataset: Any) -> float:
    """The power ``bargaining_power_forget=None`` stands for with these datasets (logged)."""
    kind = forget_set_kind(list(forget_datasets), retain_dataset)
    if kind == "samples":
        logger.info("the forget set shares its classes with the retain set (samples, not classes): "
                    "the forget player's bargaining power is %g (pass bargaining_power_forget to "
                    "choose another)", SAMPLE_FORGET_POWER)
    elif kind is None:
        logger.warning("could not read the datasets' labels (not datasets.Dataset with a 'labels' "
                       "column), so the forget set's kind is unknown: the forget player's "
                       "bargaining power is %g, the class-forgetting default; for samples of "
                       "classes the model keeps pass bargaining_power_forget=%g",
                       CLASS_FORGET_POWER, SAMPLE_FORGET_POWER)
    return power_for_kind(kind)


def check_same_on_every_rank(power: float) -> None:
    """One clear error when the ranks of a distributed run chose different powers (each was
    given a different dataset, e.g. sharded by hand): their bargains would differ every step."""
    from accelerate.utils import gather_object

    powers = gather_object([float(power)])
    if len(set(powers)) > 1:
        raise ValueError(f"the ranks chose different forget powers {powers}: their forget or retain "
                         "datasets differ (give every rank the whole datasets; the Trainer shards "
                         "them), or pass bargaining_power_forget")
