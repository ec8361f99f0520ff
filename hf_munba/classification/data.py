"""Image-classification datasets in the shape Trainer users prepare them: ``pixel_values`` + ``labels``.

Two sources: scikit-learn's digits (1,797 real 8x8 scans that ship with scikit-learn, so the
benchmark runs offline) and any local ``imagefolder`` (``root/<class>/<image>``, optionally with
``train``/``test`` sub-folders), transformed on the fly by an image processor.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["digits_dataset", "require_sklearn", "sklearn_available", "imagefolder_dataset", "imagefolder_class_names", "validate_imagefolder",
           "image_transform", "InMemoryDataset",
           "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def sklearn_available() -> bool:
    """scikit-learn is an extra (``hf_munba[eval]``): training never needs it, the digits data and
    the membership attack do."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return False
    return True


def require_sklearn(purpose: str) -> None:
    """Raise one clear ImportError naming the extra to install when scikit-learn is missing."""
    if not sklearn_available():
        raise ImportError(f"{purpose} needs scikit-learn, which is not installed: "
                          "pip install 'hf_munba[eval]' (or pip install scikit-learn)")


def digits_dataset(test_size: float = 0.2, seed: int = 0):
    """DatasetDict(train, test) of digits: ``pixel_values`` float32 [1, 8, 8] in [-1, 1], ``labels``.

    The split is stratified and fixed by ``seed``. The images ship with scikit-learn.
    """
    require_sklearn("the digits dataset")
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Array3D
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    y = d.target.astype(np.int64)
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=test_size, random_state=seed,
                                      stratify=y)
    feats = Features({"pixel_values": Array3D(shape=(1, 8, 8), dtype="float32"),
                      "labels": ClassLabel(names=[str(i) for i in range(10)])})

    def make(idx):
        return Dataset.from_dict({"pixel_values": x[idx], "labels": y[idx]}, features=feats).with_format("torch")

    return DatasetDict(train=make(idx_tr), test=make(idx_te))


def validate_imagefolder(data_dir: str) -> None:
    """Fail fast, before any model is loaded, on a folder the Trainer could not use."""
    if not data_dir or not os.path.isdir(data_dir):
        raise ValueError(f"data directory {data_dir!r} does not exist")
    images = [os.path.join(r, f) for r, _, fs in os.walk(data_dir) for f in fs
              if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not images:
        raise ValueError(f"data directory {data_dir!r} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    from PIL import Image
    for path in images:
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as e:  # noqa: BLE001 - any decoder failure means the same to the user
            raise ValueError(f"unreadable image {path}: {e}") from None


def imagefolder_class_names(data_dir: str) -> list:
    """Class names the ``imagefolder`` builder will infer (sorted sub-folder names), known before loading."""
    base = os.path.join(data_dir, "train") if os.path.isdir(os.path.join(data_dir, "train")) else data_dir
    names = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)) and not d.startswith("."))
    if len(names) < 2:
        raise ValueError(f"{base!r} needs one sub-folder per class (at least two), found {names}")
    return names


def imagefolder_dataset(data_dir: str, image_processor, test_size: float = 0.2, seed: int = 0):
    """DatasetDict(train, test) from a local imagefolder, transformed by ``image_processor``."""
    from datasets import load_dataset

    validate_imagefolder(data_dir)
    ds = load_dataset("imagefolder", data_dir=data_dir)
    if "test" not in ds:
        ds = ds["train"].train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")
    ds = ds.rename_column("label", "labels")
    transform = image_transform(image_processor)
    for split in ds:
        ds[split] = ds[split].with_transform(transform)
    return ds


def image_transform(image_processor, image_column: str = "image"):
    """A ``datasets`` transform: RGB images of ``image_column`` -> ``pixel_values`` (and ``labels``)."""

    def transform(batch):
        images = [im.convert("RGB") for im in batch[image_column]]
        out = image_processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "labels": batch["labels"]}

    return transform


class InMemoryDataset:
    """A map-style dataset of pre-built tensors, for small benchmarks where per-row Arrow access
    would cost more than the model's forward pass. Rows are dicts, as Trainer collators expect."""

    def __init__(self, columns: dict):
        import torch

        self.columns = {k: torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v
                        for k, v in columns.items()}
        lengths = {len(v) for v in self.columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns have different lengths: {lengths}")
        self._len = lengths.pop()

    @classmethod
    def from_dataset(cls, dataset, columns=("pixel_values", "labels")) -> "InMemoryDataset":
        ds = dataset.with_format("torch")
        return cls({c: ds[c] for c in columns})

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i):
        if isinstance(i, str):
            return self.columns[i]
        return {k: v[i] for k, v in self.columns.items()}
