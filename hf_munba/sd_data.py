"""Forget / retain data for diffusion unlearning: validated sources, deterministic pairing, caching.

Sources are captioned image sets: a local imagefolder (images + ``metadata.jsonl`` with
``file_name`` and ``text``, as written by :mod:`hf_munba.generation`) or a ``datasets`` dataset.
Local folders are checked completely before any model is loaded, with one message per problem.

Pairing: one epoch walks D_r once in a shuffled order; D_f is read as an endless stream of
independently shuffled cycles, so every retain sample meets a forget sample. Orders come from
``torch.Generator``s seeded by (seed, epoch) / (seed, cycle), never from the global RNG: the data
of step k is a pure function of k, so resuming from a checkpoint only has to skip batches.
No random augmentation is applied (resize + centre crop), which is what makes latent caching exact.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["ImageCaptionSource", "DataValidationError", "load_imagefolder", "load_hub_dataset",
           "check_disjoint", "preprocess_image", "PairedUnlearningDataset", "class_prompts",
           "remap_class", "LatentCache"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataValidationError(ValueError):
    """A forget / retain data source is unusable; the message names the folder and the file."""


@dataclass
class ImageCaptionSource:
    """A list of (image, caption); images are file paths (local) or PIL images (datasets)."""

    name: str
    images: List[Any]
    captions: List[str]
    hashes: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)

    def load_image(self, i: int):
        from PIL import Image

        img = self.images[i]
        if isinstance(img, (str, os.PathLike)):
            with Image.open(img) as f:
                img = f.convert("RGB")
        return img.convert("RGB")


def load_imagefolder(folder: str | os.PathLike, caption_column: str = "text",
                     role: str = "data") -> ImageCaptionSource:
    """Read and fully check an imagefolder; raises :class:`DataValidationError` with one message."""
    from PIL import Image

    folder = Path(folder)
    if not folder.exists():
        raise DataValidationError(f"{role} directory {folder} does not exist")
    if not folder.is_dir():
        raise DataValidationError(f"{role} directory {folder} is not a directory")
    files = [p for p in folder.iterdir()]
    if not files:
        raise DataValidationError(f"{role} directory {folder} is empty")
    images_on_disk = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not images_on_disk:
        raise DataValidationError(f"{role} directory {folder} contains no images "
                                  f"({', '.join(IMAGE_EXTENSIONS)})")
    meta = folder / "metadata.jsonl"
    if not meta.exists():
        raise DataValidationError(f"{role} directory {folder} has no metadata.jsonl "
                                  f"(one JSON line per image with 'file_name' and '{caption_column}')")
    images, captions, hashes = [], [], []
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{meta}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataValidationError(f"{where} is not valid JSON ({e})") from None
        name = rec.get("file_name")
        if not name:
            raise DataValidationError(f"{where} has no 'file_name'")
        text = rec.get(caption_column)
        if not isinstance(text, str) or not text.strip():
            raise DataValidationError(f"{where} ({name}) has no caption in column '{caption_column}'")
        path = folder / name
        if not path.is_file():
            raise DataValidationError(f"{where} lists {name}, which is not in {folder}")
        try:
            with Image.open(path) as im:
                im.convert("RGB")
        except Exception as e:  # PIL raises many types for broken files
            raise DataValidationError(f"cannot read image {path}: {e}") from None
        images.append(str(path))
        captions.append(text)
        hashes.append(hashlib.sha1(path.read_bytes()).hexdigest())
    if not images:
        raise DataValidationError(f"{meta} lists no images")
    return ImageCaptionSource(str(folder), images, captions, hashes)


def load_hub_dataset(name: str, image_column: str = "image", caption_column: str = "text",
                     split: str = "train", role: str = "data", **kwargs) -> ImageCaptionSource:
    """A ``datasets`` dataset (by name or local path) as an :class:`ImageCaptionSource`."""
    from datasets import load_dataset

    ds = load_dataset(name, split=split, **kwargs)
    for col in (image_column, caption_column):
        if col not in ds.column_names:
            raise DataValidationError(f"{role} dataset {name} has no column '{col}' "
                                      f"(columns: {ds.column_names})")
    if len(ds) == 0:
        raise DataValidationError(f"{role} dataset {name} is empty")
    captions = list(ds[caption_column])
    for i, c in enumerate(captions):
        if not isinstance(c, str) or not c.strip():
            raise DataValidationError(f"{role} dataset {name} row {i} has no caption")
    images = list(ds[image_column])
    hashes = [hashlib.sha1(np.asarray(im.convert("RGB")).tobytes()).hexdigest() for im in images]
    return ImageCaptionSource(name, images, captions, hashes)


def check_disjoint(forget: ImageCaptionSource, retain: ImageCaptionSource) -> None:
    """Refuse forget and retain sets that share an image (same bytes or pixels)."""
    shared = set(forget.hashes) & set(retain.hashes)
    if shared:
        i = forget.hashes.index(next(iter(shared)))
        raise DataValidationError(
            f"forget and retain sets overlap: {len(shared)} image(s) appear in both "
            f"(e.g. {forget.images[i] if isinstance(forget.images[i], str) else f'row {i}'})")


def preprocess_image(image, resolution: int) -> torch.Tensor:
    """Resize the shorter side to ``resolution`` (bilinear), centre-crop, scale to [-1, 1], CHW."""
    from PIL import Image

    w, h = image.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def class_prompts(class_names: Sequence[str], template: str) -> List[str]:
    """``template.format(name)`` for each class (the paper: "an image of a {}")."""
    if "{}" not in template:
        raise ValueError(f"prompt template must contain '{{}}', got {template!r}")
    return [template.format(c) for c in class_names]


def remap_class(class_names: Sequence[str], forget_class: str, remap_to: Optional[str] = None) -> str:
    """The class a forgotten class is remapped to: ``remap_to`` or the next class (cyclic)."""
    names = list(class_names)
    if forget_class not in names:
        raise ValueError(f"forget class {forget_class!r} is not one of the class names {names}")
    if remap_to is None:
        return names[(names.index(forget_class) + 1) % len(names)]
    if remap_to not in names or remap_to == forget_class:
        raise ValueError(f"remap class {remap_to!r} must be another of the class names {names}")
    return remap_to


def _perm(n: int, *seed_parts: int) -> torch.Tensor:
    digest = hashlib.sha256(repr(seed_parts).encode()).hexdigest()
    g = torch.Generator().manual_seed(int(digest[:15], 16))
    return torch.randperm(n, generator=g)


class LatentCache:
    """VAE latent distributions (mean, std) per image and prompt embeddings per distinct text.

    Storing the distribution instead of one sample keeps training identical to encoding every
    step: the latent is still drawn fresh (mean + std * noise) from the same RNG stream.
    """

    def __init__(self):
        self.latents: Dict[tuple, tuple] = {}
        self.embeddings: Dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def build(self, dataset: "PairedUnlearningDataset", vae, text_encoder=None,
              batch_size: int = 8, device=None, dtype=None) -> "LatentCache":
        device = device or vae.device
        dtype = dtype or vae.dtype
        for role, src in (("forget", dataset.forget), ("retain", dataset.retain)):
            for s in range(0, len(src), batch_size):
                idx = list(range(s, min(len(src), s + batch_size)))
                px = torch.stack([dataset.pixels(src, i) for i in idx]).to(device, dtype)
                dist = vae.encode(px).latent_dist
                for k, i in enumerate(idx):
                    self.latents[(role, i)] = (dist.mean[k].float().cpu(), dist.std[k].float().cpu())
        if text_encoder is not None:
            texts = sorted(set(dataset.all_texts()))
            for s in range(0, len(texts), batch_size):
                chunk = texts[s:s + batch_size]
                ids = torch.stack([dataset.tokenize(t) for t in chunk]).to(device)
                emb = text_encoder(ids, return_dict=False)[0]
                for t, e in zip(chunk, emb):
                    self.embeddings[t] = e.float().cpu()
        return self


class PairedUnlearningDataset(torch.utils.data.Dataset):
    """Item i of epoch e: retain sample perm_r(e)[i] paired with the next forget sample of the stream.

    Each item holds, for the retain player, the image and its caption; for the forget player, the
    image, the prompt to forget (its caption, or ``forget_prompts`` cycled) and the anchor prompt
    whose prediction the remap objective matches (``anchor_prompt`` or, class-wise, per sample).
    With a :class:`LatentCache`, images become latent (mean, std) and prompts embeddings.
    """

    def __init__(self, forget: ImageCaptionSource, retain: ImageCaptionSource, tokenizer,
                 resolution: int, *, anchor_prompt: str, seed: int = 0,
                 forget_prompts: Optional[Sequence[str]] = None, uncond_prompt: str = ""):
        self.forget, self.retain = forget, retain
        self.tokenizer = tokenizer
        self.resolution = resolution
        self.anchor_prompt = anchor_prompt
        self.uncond_prompt = uncond_prompt
        self.forget_prompts = list(forget_prompts) if forget_prompts else None
        self.seed = seed
        self.epoch = 0
        self.cache: Optional[LatentCache] = None
        self._tok = lru_cache(maxsize=4096)(self._tokenize)

    def __len__(self) -> int:
        return len(self.retain)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _tokenize(self, text: str) -> torch.Tensor:
        return self.tokenizer(text, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids[0]

    def tokenize(self, text: str) -> torch.Tensor:
        return self._tok(text)

    def pixels(self, src: ImageCaptionSource, i: int) -> torch.Tensor:
        return preprocess_image(src.load_image(i), self.resolution)

    def all_texts(self) -> List[str]:
        texts = set(self.retain.captions) | {self.anchor_prompt, self.uncond_prompt}
        texts |= set(self.forget_prompts or self.forget.captions)
        return sorted(texts)

    def forget_index(self, i: int, epoch: Optional[int] = None) -> tuple:
        """(forget sample index, stream position) paired with item ``i`` of ``epoch``."""
        epoch = self.epoch if epoch is None else epoch
        pos = epoch * len(self.retain) + i
        n = len(self.forget)
        return int(_perm(n, self.seed, pos // n, 1)[pos % n]), pos

    def __getitem__(self, i: int) -> Dict[str, Any]:
        r = int(_perm(len(self.retain), self.seed, self.epoch, 0)[i])
        f, pos = self.forget_index(i)
        forget_text = (self.forget_prompts[pos % len(self.forget_prompts)]
                       if self.forget_prompts else self.forget.captions[f])
        texts = {"retain": self.retain.captions[r], "forget": forget_text,
                 "anchor": self.anchor_prompt, "uncond": self.uncond_prompt}
        item: Dict[str, Any] = {"retain_index": r, "forget_index": f}
        for role, src, j in (("retain", self.retain, r), ("forget", self.forget, f)):
            if self.cache is not None:
                mean, std = self.cache.latents[(role, j)]
                item[f"{role}_latent_mean"], item[f"{role}_latent_std"] = mean, std
            else:
                item[f"{role}_pixel_values"] = self.pixels(src, j)
        for role, text in texts.items():
            if self.cache is not None and self.cache.embeddings:
                item[f"{role}_embeddings"] = self.cache.embeddings[text]
            else:
                item[f"{role}_input_ids"] = self.tokenize(text)
        return item
