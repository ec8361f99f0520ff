"""The one image grid: rows of images, each row optionally named in a label strip on the left.

Every report in hf_munba shows images side by side (one row per model in the generative
evaluation, before / attacked in the attack, one row per method in the digits experiments, one row
per prompt in the training script's validation grid). The tiling is diffusers'
``make_image_grid``; what it lacks, and what this wrapper adds, is rows of different lengths
(padded with background cells), a common cell size, the row labels, and an atomic PNG write.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

__all__ = ["image_grid"]


def _as_rgb(item):
    from PIL import Image

    if isinstance(item, Image.Image):
        return item.convert("RGB")
    with Image.open(item) as im:
        return im.convert("RGB")


def image_grid(rows: Mapping[str, Sequence], path=None, cell: Optional[int] = 128,
               label_width: int = 160, *, background: str = "white"):
    """A grid with one row per entry of ``rows`` (its key drawn on the left) and one column per
    image; returns the PIL image and, when ``path`` is given, also writes it there as a PNG.

    ``rows`` values are image files or PIL images. ``cell``: every image is resized to
    ``cell`` x ``cell`` (None: all keep the first image's size, for same-sized images such as a
    pipeline's outputs). ``label_width=0`` leaves out the label strip. Rows shorter than the
    longest are padded with ``background`` cells.
    """
    from diffusers.utils import make_image_grid
    from PIL import Image, ImageDraw

    if not rows or max((len(v) for v in rows.values()), default=0) == 0:
        raise ValueError("no images for the grid")
    ncols = max(len(v) for v in rows.values())
    loaded = [[_as_rgb(x) for x in files] for files in rows.values()]
    size = (cell, cell) if cell else next(r[0].size for r in loaded if r)
    tiles = []
    for images in loaded:
        tiles += [im if im.size == size else im.resize(size) for im in images]
        tiles += [Image.new("RGB", size, background)] * (ncols - len(images))
    body = make_image_grid(tiles, rows=len(loaded), cols=ncols)
    if label_width > 0:
        grid = Image.new("RGB", (label_width + body.width, body.height), background)
        grid.paste(body, (label_width, 0))
        draw = ImageDraw.Draw(grid)
        for r, name in enumerate(rows):
            draw.text((4, r * size[1] + size[1] // 2 - 6), str(name)[:24], fill="black")
    else:
        grid = body
    if path is not None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        grid.save(tmp, format="PNG")
        os.replace(tmp, path)
    return grid
