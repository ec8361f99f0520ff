"""Crash-safe final outputs: nothing half-written is ever loadable by ``from_pretrained``.

The final model is first written completely into a hidden staging folder inside the output
directory, then each file is moved into place with ``os.replace`` (atomic per file) and the
files ``from_pretrained`` needs to recognise a model (``config.json`` and the like) go last,
after any stale copy was removed first. A crash at any point therefore leaves either the old
complete output, or files without a config, never a config beside half-written weights.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

__all__ = ["ensure_output_dir", "staged_output"]

MARKER_FILES = ("config.json", "zero_shot_config.json", "adapter_config.json", "model_index.json")


def ensure_output_dir(output_dir: str, overwrite: bool, allow_existing: bool = False,
                      keep: tuple = (), check_only: bool = False) -> None:
    """Refuse a non-empty ``output_dir`` unless ``overwrite`` (or ``allow_existing``, for resuming).

    With ``overwrite`` the stale model markers are removed so an old config never pairs with new
    weights. ``check_only`` (for non-main ranks) validates without touching the disk.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir {output_dir!r} exists and is not a directory")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not allow_existing:
        if not overwrite:
            raise ValueError(f"output_dir {output_dir!r} is not empty; pass --overwrite_output_dir "
                             "to replace it or --resume_from_checkpoint to continue a run")
        for name in [] if check_only else os.listdir(output_dir):
            if name in keep:
                continue
            path = os.path.join(output_dir, name)
            if name in MARKER_FILES:
                os.remove(path)
    if not check_only:
        os.makedirs(output_dir, exist_ok=True)


@contextlib.contextmanager
def staged_output(output_dir: str) -> Iterator[str]:
    """Yield a staging folder; on success move its files into ``output_dir``, markers last."""
    os.makedirs(output_dir, exist_ok=True)
    for name in os.listdir(output_dir):  # left half-written by a run killed while saving
        if name.startswith(".staging-"):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    stage = tempfile.mkdtemp(prefix=".staging-", dir=output_dir)
    try:
        yield stage
        for name in MARKER_FILES:  # stale markers go first, so old config + new weights never mix
            path = os.path.join(output_dir, name)
            if os.path.isfile(path):
                os.remove(path)
        names = sorted(os.listdir(stage), key=lambda n: n in MARKER_FILES)
        for name in names:
            dst = os.path.join(output_dir, name)
            if os.path.isdir(dst) and not os.path.islink(dst):
                shutil.rmtree(dst)
            os.replace(os.path.join(stage, name), dst)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
