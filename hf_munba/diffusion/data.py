"""Forget / retain data for diffusion unlearning: validated sources, deterministic pairing, caching.

Sources are captioned image sets: a local imagefolder (images + ``metadata.jsonl`` with
``file_name`` and ``text``, as written by :mod:`hf_munba.diffusion.generation`) or a ``datasets`` dataset.
Local folders are checked completely before any model is loaded, with one message per problem.

Every image file in a local folder must be listed in ``metadata.jsonl``: an unlisted image is an
error (naming it), not silently left out of training. A ``datasets`` dataset is read lazily: only
the caption column and the encoded image bytes (for the overlap check) are read at start-up; an
image is decoded when its item is drawn.

Pairing: one epoch walks D_r once in a shuffled order; D_f is read as an endless stream of
independently shuffled cycles, so every retain sample meets a forget sample. Orders come from
``torch.Generator``s seeded by (seed, epoch) / (seed, cycle), never from the global RNG: the data
of step k is a pure function of k, so resuming from a checkpoint only has to skip batches. Each
permutation is built once (per epoch, per forget cycle) and reused by the items, so an epoch
costs O(N), not O(N^2).

Augmentation, as in diffusers' ``text_to_image``: resize the shorter side, then a centre crop
(``center_crop=True``) or a random crop, and with ``random_flip=True`` a horizontal flip with
probability 1/2. The random crop offsets and the flip of an item come from a generator seeded by
(seed, epoch, player, item), so they too are a pure function of the step (same on every rank,
every worker, after a resume). Latent caching encodes each image once, so it needs a fixed crop:
``center_crop=True``, or square images only (a square image resized to the resolution has one
crop position, so the random crop is the centre crop); a random flip is cached exactly by encoding
both orientations.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["ImageCaptionSource", "DataValidationError", "load_imagefolder", "load_hub_dataset",
           "dataset_source", "LazyImageColumn", "check_disjoint", "check_cacheable",
           "preprocess_image", "PairedUnlearningDataset", "class_prompts",
           "remap_class", "LatentCache", "ForgetConceptSpec", "ForgetConcept",
           "parse_forget_concept", "read_forget_manifest", "load_concept", "pool_sources",
           "check_concepts_disjoint", "FORGET_PLAYER_MODES", "embedding_key",
           "crop_geometry"]

#: how several forget concepts play: each its own bargaining player, or all in one forget loss
FORGET_PLAYER_MODES = ("per_concept", "pooled")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataValidationError(ValueError):
    """A forget / retain data source is unusable; the message names the folder and the file."""


class LazyImageColumn:
    """The image column of a ``datasets.Dataset``, decoded one row at a time on access.

    ``len()`` and ``[i]`` are all a source needs; the dataset itself (memory-mapped Arrow) is
    what gets pickled into DataLoader workers, not decoded images.
    """

    def __init__(self, dataset, column: str):
        self.dataset = dataset.select_columns([column])
        self.column = column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[int(i)][self.column]


@dataclass
class ImageCaptionSource:
    """A list of (image, caption); images are file paths (local), PIL images, or a
    :class:`LazyImageColumn` (datasets, decoded on access)."""

    name: str
    images: List[Any]
    captions: List[str]
    hashes: List[str] = field(default_factory=list)
    sizes: List[Tuple[int, int]] = field(default_factory=list)  # (width, height), if known

    def __len__(self) -> int:
        return len(self.captions)

    def image_size(self, i: int) -> Tuple[int, int]:
        """(width, height) of image ``i``: recorded, or read from the file header (no decode)."""
        from PIL import Image

        if self.sizes:
            return tuple(self.sizes[i])
        img = self.images[i]
        if isinstance(img, (str, os.PathLike)):
            with Image.open(img) as f:
                return f.size
        return img.size

    def first_non_square(self) -> Optional[int]:
        """Index of the first image that is not square (None if all are)."""
        return next((i for i in range(len(self)) if len(set(self.image_size(i))) > 1), None)

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
    listed = set()
    if not meta.exists():
        raise DataValidationError(f"{role} directory {folder} has no metadata.jsonl "
                                  f"(one JSON line per image with 'file_name' and '{caption_column}')")
    images, captions, hashes, sizes = [], [], [], []
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
                sizes.append(im.size)
        except Exception as e:  # PIL raises many types for broken files
            raise DataValidationError(f"cannot read image {path}: {e}") from None
        images.append(str(path))
        captions.append(text)
        hashes.append(hashlib.sha1(path.read_bytes()).hexdigest())
        listed.add(path.resolve())
    if not images:
        raise DataValidationError(f"{meta} lists no images")
    # An image on disk that the metadata does not list would silently not be trained on.
    unlisted = sorted(p.name for p in images_on_disk if p.resolve() not in listed)
    if unlisted:
        shown = ", ".join(unlisted[:5]) + (f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else "")
        raise DataValidationError(
            f"{role} directory {folder}: {len(unlisted)} image(s) not listed in metadata.jsonl "
            f"would be left out of training: {shown}. Add a line for each (file_name and "
            f"'{caption_column}'), move them out, or re-run the generation command that was "
            "interrupted")
    return ImageCaptionSource(str(folder), images, captions, hashes, sizes)


def load_hub_dataset(name: str, image_column: str = "image", caption_column: str = "text",
                     split: str = "train", role: str = "data", **kwargs) -> ImageCaptionSource:
    """A ``datasets`` dataset (by name or local path) as a lazily decoded :class:`ImageCaptionSource`.

    ``kwargs`` go to ``datasets.load_dataset`` (e.g. ``cache_dir``, ``revision``).
    """
    from datasets import load_dataset

    ds = load_dataset(name, split=split, **kwargs)
    return dataset_source(ds, image_column, caption_column, name=name, role=role)


def dataset_source(ds, image_column: str = "image", caption_column: str = "text", *,
                   name: str = "dataset", role: str = "data") -> ImageCaptionSource:
    """A ``datasets.Dataset`` as an :class:`ImageCaptionSource` without decoding its images.

    The captions are read (and checked) now; images are decoded when an item is drawn. The
    overlap check's hashes are the SHA-1 of each image's encoded bytes (the file's bytes, as for
    a local folder), read without decoding; a column that is not a ``datasets.Image`` feature is
    hashed from its pixels, one row at a time.
    """
    for col in (image_column, caption_column):
        if col not in ds.column_names:
            raise DataValidationError(f"{role} dataset {name} has no column '{col}' "
                                      f"(columns: {ds.column_names})")
    if len(ds) == 0:
        raise DataValidationError(f"{role} dataset {name} is empty")
    captions = list(ds.select_columns([caption_column])[caption_column])
    for i, c in enumerate(captions):
        if not isinstance(c, str) or not c.strip():
            raise DataValidationError(f"{role} dataset {name} row {i} has no caption")
    hashes, sizes = _encoded_hashes_and_sizes(ds, image_column)
    return ImageCaptionSource(name, LazyImageColumn(ds, image_column), captions, hashes, sizes)


def _encoded_hashes_and_sizes(ds, column: str):
    import io

    from datasets import Image as ImageFeature
    from PIL import Image

    hashes, sizes = [], []
    if not isinstance(ds.features[column], ImageFeature):
        col = LazyImageColumn(ds, column)
        for i in range(len(col)):
            img = col[i].convert("RGB")
            hashes.append(hashlib.sha1(np.asarray(img).tobytes()).hexdigest())
            sizes.append(img.size)
        return hashes, sizes
    raw = ds.select_columns([column]).cast_column(column, ImageFeature(decode=False))
    for rec in raw:
        enc = rec[column]
        data = enc.get("bytes")
        if data is None:
            data = Path(enc["path"]).read_bytes()
        hashes.append(hashlib.sha1(data).hexdigest())
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            sizes.append(im.size)
    return hashes, sizes


def _describe(src: ImageCaptionSource, i: int) -> str:
    """Image ``i`` as a user finds it: its file, or the dataset row."""
    img = src.images[i] if isinstance(src.images, list) else None
    return str(img) if isinstance(img, (str, os.PathLike)) else f"{src.name} row {i}"


def check_disjoint(forget: ImageCaptionSource, retain: ImageCaptionSource) -> None:
    """Refuse forget and retain sets that share an image (same bytes or pixels)."""
    shared = set(forget.hashes) & set(retain.hashes)
    if shared:
        i = forget.hashes.index(next(iter(shared)))
        raise DataValidationError(
            f"forget and retain sets overlap: {len(shared)} image(s) appear in both "
            f"(e.g. {_describe(forget, i)})")


def check_concepts_disjoint(concepts: Sequence["ForgetConcept"]) -> None:
    """Refuse two forget concepts that share an image: it would be forgotten twice, towards
    two anchors, and a per-concept forget accuracy could not say which concept it measures."""
    for a in range(len(concepts)):
        for b in range(a + 1, len(concepts)):
            shared = set(concepts[a].source.hashes) & set(concepts[b].source.hashes)
            if shared:
                i = concepts[a].source.hashes.index(next(iter(shared)))
                raise DataValidationError(
                    f"forget concepts {concepts[a].name!r} and {concepts[b].name!r} overlap: "
                    f"{len(shared)} image(s) appear in both (e.g. "
                    f"{_describe(concepts[a].source, i)})")


# ---- several forget concepts -------------------------------------------------------------------
@dataclass
class ForgetConceptSpec:
    """Where one named forget concept's D_f comes from and how its player conditions, as the
    user wrote it (``--forget_concepts NAME=FOLDER`` or one ``--forget_manifest`` entry); read from
    disk by :func:`load_concept`.

    ``prompts``: the prompts this concept's forget player conditions on (cycled; default: the
    D_f captions); ``anchor_prompt``: what the remap objective steers them to (default: the
    run's ``--anchor_prompt``).
    """

    name: str
    data_dir: Optional[str] = None
    dataset_name: Optional[str] = None
    prompts: Optional[List[str]] = None
    anchor_prompt: Optional[str] = None

    def __post_init__(self):
        if (self.data_dir is None) == (self.dataset_name is None):
            raise ValueError(f"forget concept {self.name!r}: give exactly one of data_dir and "
                             "dataset_name")
        if self.prompts is not None:
            if isinstance(self.prompts, str):
                self.prompts = [self.prompts]
            if not self.prompts or any(not isinstance(t, str) or not t.strip()
                                       for t in self.prompts):
                raise ValueError(f"forget concept {self.name!r}: prompts must be a non-empty "
                                 "list of non-empty strings")
            self.prompts = list(self.prompts)
        if self.anchor_prompt is not None and (not isinstance(self.anchor_prompt, str)
                                               or not self.anchor_prompt.strip()):
            raise ValueError(f"forget concept {self.name!r}: anchor_prompt must be a non-empty "
                             "string")


@dataclass
class ForgetConcept:
    """A loaded forget concept: its validated D_f and the texts its forget player uses."""

    name: str
    source: ImageCaptionSource
    prompts: Optional[List[str]] = None
    anchor_prompt: Optional[str] = None


def parse_forget_concept(value: str) -> ForgetConceptSpec:
    """``NAME=FOLDER`` (one ``--forget_concepts`` entry) -> a spec; ValueError naming the entry."""
    name, sep, folder = value.partition("=")
    if not sep or not name.strip() or not folder.strip():
        raise ValueError(f"--forget_concepts entry {value!r} is not NAME=FOLDER (e.g. "
                         "nudity=data/nudity)")
    return ForgetConceptSpec(name=name.strip(), data_dir=folder.strip())


_MANIFEST_KEYS = {"data_dir", "dataset_name", "prompts", "anchor_prompt"}


def read_forget_manifest(path: str | os.PathLike) -> List[ForgetConceptSpec]:
    """A JSON object name -> {data_dir | dataset_name, optional prompts, anchor_prompt}, in file
    order. A relative ``data_dir`` is relative to the manifest's folder (so a manifest travels
    with its data). Raises :class:`DataValidationError` naming the file and the entry."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataValidationError(f"--forget_manifest {path}: cannot read a JSON object ({e})") \
            from None
    if not isinstance(raw, dict) or not raw:
        raise DataValidationError(f"--forget_manifest {path} must hold a non-empty JSON object "
                                  "name -> {data_dir | dataset_name, prompts, anchor_prompt}")
    specs = []
    for name, entry in raw.items():
        if isinstance(entry, str):  # shorthand: name -> folder
            entry = {"data_dir": entry}
        if not isinstance(entry, dict):
            raise DataValidationError(f"--forget_manifest {path}: entry {name!r} must be an "
                                      "object or a folder")
        unknown = sorted(set(entry) - _MANIFEST_KEYS)
        if unknown:
            raise DataValidationError(f"--forget_manifest {path}: entry {name!r} has unknown "
                                      f"keys {unknown} (allowed: {sorted(_MANIFEST_KEYS)})")
        entry = dict(entry)
        if entry.get("data_dir") is not None:
            d = Path(os.path.expanduser(entry["data_dir"]))
            entry["data_dir"] = str(d if d.is_absolute() else path.parent / d)
        try:
            specs.append(ForgetConceptSpec(name=name, **entry))
        except (TypeError, ValueError) as e:
            raise DataValidationError(f"--forget_manifest {path}: {e}") from None
    return specs


def load_concept(spec: ForgetConceptSpec, caption_column: str = "text",
                 image_column: str = "image", split: str = "train",
                 **dataset_kwargs) -> ForgetConcept:
    """Read and check one concept's D_f (an imagefolder or a ``datasets`` dataset)."""
    role = f"forget concept {spec.name!r}:"
    if spec.data_dir is not None:
        src = load_imagefolder(spec.data_dir, caption_column, role=role)
    else:
        src = load_hub_dataset(spec.dataset_name, image_column, caption_column, split=split,
                               role=role, **dataset_kwargs)
    return ForgetConcept(spec.name, src, spec.prompts, spec.anchor_prompt)


class _ConcatImages:
    """Several sources' image lists read as one (list or :class:`LazyImageColumn` alike)."""

    def __init__(self, parts):
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int):
        k = int(np.searchsorted(self.starts, int(i), side="right")) - 1
        return self.parts[k][int(i) - int(self.starts[k])]


def pool_sources(concepts: Sequence[ForgetConcept]) -> Tuple[ImageCaptionSource, List[int]]:
    """Every concept's D_f as one source (the pooled forget player), and each image's concept."""
    srcs = [c.source for c in concepts]
    images = _ConcatImages([s.images for s in srcs])
    hashes = [h for s in srcs for h in s.hashes] if all(s.hashes for s in srcs) else []
    sizes = [z for s in srcs for z in s.sizes] if all(s.sizes for s in srcs) else []
    pooled = ImageCaptionSource("+".join(c.name for c in concepts), images,
                                [t for s in srcs for t in s.captions], hashes, sizes)
    owner = [k for k, s in enumerate(srcs) for _ in range(len(s))]
    return pooled, owner


def crop_geometry(size: Tuple[int, int], resolution: int) -> Tuple[int, int, int, int]:
    """(resized width, resized height, centre-crop left, centre-crop top) of an image of
    ``size`` = (width, height) under :func:`preprocess_image`'s resize."""
    w, h = size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    return nw, nh, (nw - resolution) // 2, (nh - resolution) // 2


def preprocess_image(image, resolution: int, *, center_crop: bool = True, flip: bool = False,
                     generator: Optional[torch.Generator] = None, geometry: bool = False):
    """Resize the shorter side to ``resolution`` (bilinear), crop a square, optionally flip
    horizontally, scale to [-1, 1], CHW.

    The crop is centred (``center_crop=True``) or at offsets drawn from ``generator`` (uniform over
    every valid position, as torchvision's ``RandomCrop``; the global RNG if ``generator`` is
    None). Nothing is drawn along a side with a single position, so a square image takes no
    random numbers at all.

    The conversion to a normalised tensor is diffusers' ``VaeImageProcessor.preprocess`` (what
    the pipelines feed their VAE). The geometry stays here: the processor's ``resize_mode="crop"``
    only centre-crops, while training needs diffusers' ``text_to_image`` augmentation, a random
    crop seeded per item (so a step's data is a pure function of the step), with centre crop and
    random crop sharing one resize so a centred offset gives exactly the centre crop.

    ``geometry=True`` also returns ((original height, width), (crop top, left)): SDXL's
    micro-conditioning (``add_time_ids``), as diffusers' SDXL training example records it.
    """
    from PIL import Image

    w, h = image.size
    nw, nh, left, top = crop_geometry((w, h), resolution)
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.BILINEAR)
    if not center_crop:  # draws only where there is a choice (never for a square image)
        left = _offset(nw - resolution, generator)
        top = _offset(nh - resolution, generator)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = _image_processor().preprocess(image.convert("RGB"))[0].contiguous()
    return (pixels, ((h, w), (top, left))) if geometry else pixels


_PROCESSOR = None


def _image_processor():
    """One ``VaeImageProcessor`` (no resize: the crop above already made the size)."""
    global _PROCESSOR
    if _PROCESSOR is None:
        from diffusers.image_processor import VaeImageProcessor

        _PROCESSOR = VaeImageProcessor(do_resize=False, do_normalize=True)
    return _PROCESSOR


def _offset(slack: int, generator: Optional[torch.Generator]) -> int:
    return int(torch.randint(0, slack + 1, (1,), generator=generator)) if slack > 0 else 0


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


def _seeded_generator(*seed_parts) -> torch.Generator:
    digest = hashlib.sha256(repr(seed_parts).encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


def _perm(n: int, *seed_parts: int) -> torch.Tensor:
    return torch.randperm(n, generator=_seeded_generator(*seed_parts))


def check_cacheable(sources: Sequence[ImageCaptionSource], center_crop: bool) -> None:
    """Raise ``ValueError`` unless every image's crop is fixed, so latents can be encoded once.

    With ``center_crop=False`` a non-square image has several crop positions: its random crop
    cannot be cached. A square image has one, whatever the resolution.
    """
    if center_crop:
        return
    for src in sources:
        i = src.first_non_square()
        if i is not None:
            where = _describe(src, i)
            w, h = src.image_size(i)
            raise ValueError(f"latent caching encodes each image once, so it cannot cache a random "
                             f"crop, and {where} is {w}x{h}, not square: crop at the centre "
                             "(center_crop=True, --center_crop); a random flip is cached exactly")


def embedding_key(role: str, key: str) -> str:
    """The batch key of one cached conditioning tensor: ``<role>_embeddings`` for the
    encoder hidden states (every family has them), ``<role>_cond_<key>`` for the rest (SDXL's
    ``text_embeds``, SD 3's / Flux's ``pooled_projections``)."""
    return f"{role}_embeddings" if key == "encoder_hidden_states" else f"{role}_cond_{key}"


class LatentCache:
    """VAE latent distributions (mean, std) per image and prompt embeddings per distinct text.

    Storing the distribution instead of one sample keeps training identical to encoding every
    step: the latent is still drawn fresh (mean + std * noise) from the same RNG stream. With a
    ``random_flip`` dataset both orientations of every image are encoded (keys
    ``(role, index, flipped)``), so the flip an item draws is applied exactly; a random crop
    cannot be cached (the dataset must use ``center_crop=True`` or hold square images only).
    """

    def __init__(self):
        self.latents: Dict[tuple, tuple] = {}
        self.embeddings: Dict[str, Dict[str, torch.Tensor]] = {}  # text -> conditioning

    @torch.no_grad()
    def build(self, dataset: "PairedUnlearningDataset", vae, text_encoder=None,
              batch_size: int = 8, device=None, dtype=None, encode=None) -> "LatentCache":
        """Encode every image of the dataset, and every prompt when the text encoders are
        frozen: ``encode(ids) -> conditioning`` (a family's
        :meth:`~hf_munba.diffusion.families.ModelFamily.encode` on the frozen encoders), or for
        SD 1.x/2.x just its ``text_encoder``. Prompts of a trained text encoder are not cached."""
        roles = dataset.sources()
        check_cacheable([src for _, src in roles], dataset.center_crop)
        device = device or vae.device
        dtype = dtype or vae.dtype
        flips = (False, True) if dataset.random_flip else (False,)
        for role, src in roles:
            for flip in flips:
                for s in range(0, len(src), batch_size):
                    idx = list(range(s, min(len(src), s + batch_size)))
                    px = torch.stack([dataset.pixels(src, i, flip=flip) for i in idx]).to(device, dtype)
                    dist = vae.encode(px).latent_dist
                    for k, i in enumerate(idx):
                        self.latents[(role, i, flip)] = (dist.mean[k].float().cpu(),
                                                         dist.std[k].float().cpu())
        if encode is None and text_encoder is not None:  # SD 1.x/2.x: one CLIP encoder
            def encode(ids):
                return {"encoder_hidden_states": text_encoder(ids["input_ids"].to(device),
                                                              return_dict=False)[0]}
        if encode is not None:
            texts = sorted(set(dataset.all_texts()))
            for s in range(0, len(texts), batch_size):
                chunk = texts[s:s + batch_size]
                per_text = [dataset.token_ids(t) for t in chunk]
                ids = {k: torch.stack([d[k] for d in per_text]).to(device) for k in per_text[0]}
                cond = encode(ids)
                for k, t in enumerate(chunk):
                    self.embeddings[t] = {key: v[k].float().cpu() for key, v in cond.items()}
        return self


@dataclass
class _ForgetStream:
    """One forget player's data: its role (key prefix), source, and each image's concept."""

    role: str
    source: ImageCaptionSource
    concepts: List[ForgetConcept]
    owner: Optional[List[int]]  # image -> index into concepts (None: all concept 0)
    seed_parts: Tuple  # extra seed parts of its shuffled cycles

    @property
    def anchor_role(self) -> str:
        return "anchor" + self.role[len("forget"):]


class PairedUnlearningDataset(torch.utils.data.Dataset):
    """Item i of epoch e: retain sample perm_r(e)[i] paired with the next sample of each forget stream.

    Each item holds, for the retain player, the image and its caption; for each forget player,
    the image, the prompt to forget (its caption, or the prompts cycled) and the anchor prompt
    whose prediction the remap objective matches. With a :class:`LatentCache`, images become
    latent (mean, std) and prompts embeddings. ``center_crop`` / ``random_flip``: the
    augmentation of the module docstring.

    ``forget``: one source (one forget player, keys ``forget_*`` / ``anchor_*``, conditioned on
    ``forget_prompts`` and ``anchor_prompt``), or a sequence of :class:`ForgetConcept`.
    With concepts, ``forget_players="per_concept"`` gives each concept its own stream and keys
    (``forget_<name>_*`` / ``anchor_<name>_*``): every step each concept's player draws its own
    sample, whatever the concepts' sizes, so a small concept is not drowned by a large one;
    ``"pooled"`` reads all concepts as one source (keys ``forget_*``), each image conditioned on
    its own concept's prompts and anchor (the baseline: one forget loss for everything).

    The dataset pickles (DataLoader workers under the ``spawn`` start method): its caches of
    permutations and token ids are plain dicts, dropped from the pickle and rebuilt on use.
    """

    _MAX_CACHED_PERMS = 8

    def __init__(self, forget, retain: ImageCaptionSource, tokenizer,
                 resolution: int, *, anchor_prompt: str, seed: int = 0,
                 forget_prompts: Optional[Sequence[str]] = None, uncond_prompt: str = "",
                 center_crop: bool = True, random_flip: bool = False,
                 forget_players: str = "per_concept", image_geometry: bool = False):
        if forget_players not in FORGET_PLAYER_MODES:
            raise ValueError(f"forget_players must be one of {FORGET_PLAYER_MODES}, got "
                             f"{forget_players!r}")
        self.image_geometry = image_geometry  # SDXL: record original size and crop
        self.retain = retain
        self.tokenizer = tokenizer
        self.resolution = resolution
        self.anchor_prompt = anchor_prompt
        self.uncond_prompt = uncond_prompt
        self.forget_prompts = list(forget_prompts) if forget_prompts else None
        if isinstance(forget, ImageCaptionSource):
            concepts = [ForgetConcept("forget", forget, self.forget_prompts, None)]
            self.streams = [_ForgetStream("forget", forget, concepts, None, ())]
        else:
            concepts = list(forget)
            if not concepts:
                raise ValueError("no forget concepts given")
            if forget_players == "pooled" or len(concepts) == 1:
                pooled, owner = pool_sources(concepts) if len(concepts) > 1 else (
                    concepts[0].source, None)
                self.streams = [_ForgetStream("forget", pooled, concepts, owner, ())]
            else:  # a concept's cycles are shuffled by its name: adding one leaves the others
                self.streams = [_ForgetStream(f"forget_{c.name}", c.source, [c], None, (c.name,))
                                for c in concepts]
        self.concepts = concepts
        self.forget = self.streams[0].source  # the one forget source (several: the first)
        self.seed = seed
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.epoch = 0
        self.cache: Optional[LatentCache] = None
        self._perms: Dict[tuple, torch.Tensor] = {}
        self._token_ids: Dict[str, torch.Tensor] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_perms"], state["_token_ids"] = {}, {}
        return state

    def __len__(self) -> int:
        return len(self.retain)

    @property
    def forget_roles(self) -> Tuple[str, ...]:
        """The forget players' key prefixes, in player order (``forget`` or ``forget_<name>``)."""
        return tuple(s.role for s in self.streams)

    def sources(self) -> List[Tuple[str, ImageCaptionSource]]:
        """(role, source) of every player's images: the forget streams, then retain."""
        return [(s.role, s.source) for s in self.streams] + [("retain", self.retain)]

    def set_pairing_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch``'s pairing (named so accelerate's own ``set_epoch`` calls miss it)."""
        self.epoch = epoch

    def _permutation(self, n: int, *seed_parts) -> torch.Tensor:
        """``_perm(n, *seed_parts)``, built once and kept (a few, the most recent ones)."""
        key = (n, *seed_parts)
        perm = self._perms.get(key)
        if perm is None:
            if len(self._perms) >= self._MAX_CACHED_PERMS:
                self._perms.pop(next(iter(self._perms)))
            perm = self._perms[key] = _perm(n, *seed_parts)
        return perm

    def token_ids(self, text: str) -> Dict[str, torch.Tensor]:
        """``text``'s token ids for every text encoder (``input_ids``, ``input_ids_2``, ...).

        ``tokenizer`` is one CLIP tokenizer (SD 1.x/2.x) or a family's
        :class:`~hf_munba.diffusion.families.PromptTokenizer` (SDXL, SD 3, Flux)."""
        ids = self._token_ids.get(text)
        if ids is None:
            from .families import PromptTokenizer

            if isinstance(self.tokenizer, PromptTokenizer):
                ids = self.tokenizer(text)
            else:
                ids = {"input_ids": self.tokenizer(
                    text, padding="max_length", max_length=self.tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids[0]}
            if len(self._token_ids) < 4096:
                self._token_ids[text] = ids
        return ids

    def tokenize(self, text: str) -> torch.Tensor:
        """The first text encoder's token ids of ``text``."""
        return next(iter(self.token_ids(text).values()))

    def pixels(self, src: ImageCaptionSource, i: int, *, flip: bool = False,
               generator: Optional[torch.Generator] = None, geometry: bool = False):
        return preprocess_image(src.load_image(i), self.resolution, center_crop=self.center_crop,
                                flip=flip, generator=generator, geometry=geometry)

    def all_texts(self) -> List[str]:
        texts = set(self.retain.captions) | {self.anchor_prompt, self.uncond_prompt}
        for s in self.streams:
            texts |= set(s.source.captions)
            for c in s.concepts:
                texts |= set(c.prompts or ())
                if c.anchor_prompt:
                    texts.add(c.anchor_prompt)
        return sorted(texts)

    def _stream(self, role: Optional[str]) -> _ForgetStream:
        if role is None:
            return self.streams[0]
        for s in self.streams:
            if s.role == role:
                return s
        raise KeyError(f"no forget player {role!r}; this dataset has {self.forget_roles}")

    def forget_index(self, i: int, epoch: Optional[int] = None, role: Optional[str] = None
                     ) -> tuple:
        """(forget sample index, stream position) of player ``role`` (default: the first)
        paired with item ``i`` of ``epoch``."""
        epoch = self.epoch if epoch is None else epoch
        stream = self._stream(role)
        pos = epoch * len(self.retain) + i
        n = len(stream.source)
        perm = self._permutation(n, self.seed, pos // n, 1, *stream.seed_parts)
        return int(perm[pos % n]), pos

    def forget_texts(self, stream: _ForgetStream, f: int, pos: int) -> Tuple[str, str]:
        """(prompt to forget, anchor prompt) of sample ``f`` at stream position ``pos``."""
        concept = stream.concepts[stream.owner[f] if stream.owner is not None else 0]
        prompts = concept.prompts
        text = prompts[pos % len(prompts)] if prompts else stream.source.captions[f]
        return text, concept.anchor_prompt or self.anchor_prompt

    def augmentation(self, role: str, i: int, epoch: Optional[int] = None
                     ) -> Tuple[bool, Optional[torch.Generator]]:
        """(flip?, generator for the random crop) of player ``role`` in item ``i`` of ``epoch``."""
        if self.center_crop and not self.random_flip:
            return False, None
        epoch = self.epoch if epoch is None else epoch
        g = _seeded_generator(self.seed, epoch, i, role, "augment")
        flip = bool(torch.rand(1, generator=g) < 0.5) if self.random_flip else False
        return flip, (None if self.center_crop else g)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        r = int(self._permutation(len(self.retain), self.seed, self.epoch, 0)[i])
        texts = {"retain": self.retain.captions[r], "uncond": self.uncond_prompt}
        images = [("retain", self.retain, r)]
        item: Dict[str, Any] = {"retain_index": r}
        for stream in self.streams:
            f, pos = self.forget_index(i, role=stream.role)
            texts[stream.role], texts[stream.anchor_role] = self.forget_texts(stream, f, pos)
            item[f"{stream.role}_index"] = f
            images.append((stream.role, stream.source, f))
        for role, src, j in images:
            flip, generator = self.augmentation(role, i)
            if self.random_flip:
                item[f"{role}_flipped"] = flip
            geo = None
            if self.cache is not None:
                mean, std = self.cache.latents[(role, j, flip)]
                item[f"{role}_latent_mean"], item[f"{role}_latent_std"] = mean, std
                if self.image_geometry:  # cached images are centre-cropped (check_cacheable)
                    w, h = src.image_size(j)
                    _, _, left, top = crop_geometry((w, h), self.resolution)
                    geo = ((h, w), (top, left))
            elif self.image_geometry:
                item[f"{role}_pixel_values"], geo = self.pixels(src, j, flip=flip,
                                                                generator=generator, geometry=True)
            else:
                item[f"{role}_pixel_values"] = self.pixels(src, j, flip=flip, generator=generator)
            if geo is not None:
                item[f"{role}_original_size"] = torch.tensor(geo[0])
                item[f"{role}_crop_top_left"] = torch.tensor(geo[1])
        for role, text in texts.items():
            if self.cache is not None and self.cache.embeddings:
                for key, value in self.cache.embeddings[text].items():
                    item[embedding_key(role, key)] = value
            else:
                for key, ids in self.token_ids(text).items():
                    item[f"{role}_{key}"] = ids
        return item
