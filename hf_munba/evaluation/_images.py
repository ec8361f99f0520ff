"""Image loading shared by the generative metrics: always 8-bit RGB PIL images from disk."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, List, Sequence

__all__ = ["load_rgb", "batched"]


def load_rgb(paths: Sequence) -> List:
    from PIL import Image

    out = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(p)
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start:start + size]
