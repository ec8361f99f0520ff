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
from pathlib import Path
from typing import Iterator, Sequence

__all__ = ["MARKER_FILES", "ensure_output_dir", "staged_output", "commit_staged",
           "atomic_directory"]

# Files whose presence makes a folder loadable (from_pretrained / load_lora_weights).
MARKER_FILES = ("model_index.json", "pytorch_lora_weights.safetensors", "config.json",
                "zero_shot_config.json", "adapter_config.json")


def ensure_output_dir(output_dir: str | os.PathLike, overwrite: bool, allow_existing: bool = False,
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
def staged_output(output_dir: str | os.PathLike, *, beside: bool = False) -> Iterator[str]:
    """Yield a staging folder; on success move its entries into ``output_dir``, markers last.

    The staging folder is a hidden ``.staging-*`` inside ``output_dir``, or with ``beside`` a
    ``.<name>.staging-*`` next to it (the SD pipeline: ``output_dir`` may already hold
    checkpoints and logs, and a Hub upload of the folder should never pick up a half-written
    staging copy). Either way it is on the same file system, so each move is a rename. Stale
    staging folders of a run killed while saving are removed first; on an exception nothing is
    moved and the staging folder is deleted.
    """
    out = Path(output_dir)
    where, prefix = (out.parent, f".{out.name}.staging-") if beside else (out, ".staging-")
    where.mkdir(parents=True, exist_ok=True)
    for stale in where.glob(f"{prefix}*"):  # left half-written by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    stage = tempfile.mkdtemp(prefix=prefix, dir=where)
    try:
        yield stage
        commit_staged(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def commit_staged(staged: str | os.PathLike, output_dir: str | os.PathLike,
                  last: Sequence[str] = MARKER_FILES) -> None:
    """Move every entry of ``staged`` into ``output_dir``; loadability markers go last.

    The old markers are removed first, so at no moment does the folder hold an old config
    beside new (or half-moved) weights.
    """
    staged, out = Path(staged), Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for marker in last:
        old = out / marker
        if old.is_file():
            old.unlink()
    for src in sorted(staged.iterdir(), key=lambda p: (p.name in last, p.name)):
        dst = out / src.name
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        elif dst.exists() or dst.is_symlink():
            dst.unlink()
        os.replace(src, dst)


@contextlib.contextmanager
def atomic_directory(output_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``output_dir`` that replaces it (absent or empty) on success.

    For outputs built whole (caches, datasets): one rename, so readers see all or nothing.
    """
    out = Path(output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # only an empty placeholder may be replaced
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
