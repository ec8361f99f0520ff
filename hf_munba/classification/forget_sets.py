"""Split a labelled ``datasets.Dataset`` into a forget set D_f and a retain set D_r.

Three ways users state what to forget: whole classes (class-wise unlearning), a random
fraction of samples (random-forgetting, fixed by a seed), or an explicit list of row indices.
The split is validated before any model work so a typo fails fast with one message.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["ForgetSpec", "split_forget_retain", "parse_forget_classes", "forget_spec_from_strings"]


@dataclass
class ForgetSpec:
    """What to forget. Exactly one of ``classes``, ``fraction``, ``indices``."""

    classes: Optional[List[int]] = field(default=None, metadata={"help": "label ids to forget"})
    fraction: Optional[float] = field(default=None, metadata={"help": "random share of samples in (0, 1)"})
    indices: Optional[List[int]] = field(default=None, metadata={"help": "explicit row indices"})
    seed: int = field(default=0, metadata={"help": "seed of the random fraction"})

    def __post_init__(self):
        given = [x is not None for x in (self.classes, self.fraction, self.indices)]
        if sum(given) != 1:
            raise ValueError("give exactly one of forget classes, forget fraction or forget indices")
        if self.fraction is not None and not 0.0 < self.fraction < 1.0:
            raise ValueError(f"forget fraction must be in (0, 1), got {self.fraction}")
        if self.classes is not None:
            if not self.classes:
                raise ValueError("forget classes list is empty")
            self.classes = sorted({int(c) for c in self.classes})
        if self.indices is not None:
            if not self.indices:
                raise ValueError("forget indices list is empty")
            if len(set(self.indices)) != len(self.indices):
                raise ValueError("forget indices contain duplicates")
            self.indices = [int(i) for i in self.indices]

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def describe(self) -> str:
        if self.classes is not None:
            return f"classes {self.classes}"
        if self.fraction is not None:
            return f"random {self.fraction:.0%} (seed {self.seed})"
        return f"{len(self.indices)} explicit indices"


def parse_forget_classes(text: str, label2id: Optional[dict] = None) -> List[int]:
    """'3,5' or 'cat,dog' (names resolved through ``label2id``) -> label ids."""
    out = []
    for tok in (t.strip() for t in text.split(",")):
        if not tok:
            continue
        if tok.lstrip("-").isdigit():
            out.append(int(tok))
        elif label2id and tok in label2id:
            out.append(int(label2id[tok]))
        else:
            raise ValueError(f"unknown forget class {tok!r}" + (f"; known: {sorted(label2id)}" if label2id else ""))
    return out


def forget_indices(labels: Sequence[int], spec: ForgetSpec, num_classes: Optional[int] = None) -> np.ndarray:
    labels = np.asarray(labels)
    n = len(labels)
    if spec.classes is not None:
        known = set(range(num_classes)) if num_classes else set(labels.tolist())
        bad = [c for c in spec.classes if c not in known]
        if bad:
            raise ValueError(f"forget classes {bad} are not labels of this dataset (labels: {sorted(known)})")
        idx = np.flatnonzero(np.isin(labels, spec.classes))
        if len(idx) == n:
            raise ValueError("the forget classes cover every sample: nothing would be retained")
    elif spec.fraction is not None:
        k = int(round(spec.fraction * n))
        if k < 1 or k >= n:
            raise ValueError(f"forget fraction {spec.fraction} of {n} samples gives {k} samples")
        idx = np.sort(np.random.default_rng(spec.seed).choice(n, size=k, replace=False))
    else:
        idx = np.asarray(spec.indices)
        bad = idx[(idx < 0) | (idx >= n)]
        if len(bad):
            raise ValueError(f"forget indices out of range [0, {n}): {bad[:5].tolist()}")
        if len(idx) >= n:
            raise ValueError("the forget indices cover every sample: nothing would be retained")
        idx = np.sort(idx)
    if len(idx) == 0:
        raise ValueError(f"the forget set ({spec.describe()}) is empty")
    return idx


def split_forget_retain(dataset, spec: ForgetSpec, label_column: str = "labels") -> Tuple[object, object]:
    """(D_f, D_r) as ``datasets.Dataset`` selections of ``dataset``; disjoint and covering it."""
    if label_column not in dataset.column_names:
        raise ValueError(f"dataset has no {label_column!r} column (columns: {dataset.column_names})")
    feature = dataset.features[label_column]
    num_classes = getattr(feature, "num_classes", None)
    # the plain column: a dataset with a transform (e.g. image preprocessing) would otherwise run
    # it on a batch holding only the labels (datasets < 4 does)
    idx = forget_indices(dataset.with_format(None)[label_column], spec, num_classes)
    mask = np.ones(len(dataset), dtype=bool)
    mask[idx] = False
    return dataset.select(idx.tolist()), dataset.select(np.flatnonzero(mask).tolist())


def forget_spec_from_strings(classes: Optional[str] = None, fraction: Optional[float] = None,
                             indices: Optional[str] = None, seed: int = 0,
                             label2id: Optional[dict] = None) -> ForgetSpec:
    """A ForgetSpec from command-line strings: classes '3,5' or 'cat,dog'; indices '1,2,3' or a .json list."""
    idx = None
    if indices is not None:
        if indices.endswith(".json"):
            import json
            import os

            if not os.path.isfile(indices):
                raise ValueError(f"forget indices file {indices!r} does not exist")
            with open(indices) as f:
                idx = json.load(f)
            if not isinstance(idx, list) or not all(isinstance(i, int) for i in idx):
                raise ValueError(f"forget indices file {indices!r} must hold a JSON list of integers")
        else:
            try:
                idx = [int(t) for t in indices.split(",") if t.strip()]
            except ValueError:
                raise ValueError("forget indices must be comma-separated integers or a .json file") from None
    cls = parse_forget_classes(classes, label2id) if classes is not None else None
    return ForgetSpec(classes=cls, fraction=fraction, indices=idx, seed=seed)
