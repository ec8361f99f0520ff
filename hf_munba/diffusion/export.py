"""Hub-ready outputs of an SD unlearning run, written so a crash never leaves a loadable half.

Everything is first written into a temporary folder next to the output directory, then moved in
entry by entry with the files that make a folder loadable moved last (``model_index.json`` for a
pipeline, ``pytorch_lora_weights.safetensors`` for LoRA; each move is an atomic ``os.replace``).
Before old outputs are replaced, the old markers are removed first, so at no moment does the
folder hold a mix that ``from_pretrained`` / ``load_lora_weights`` would accept.
All weights are safetensors.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..utils.atomic_save import MARKER_FILES as LOADABLE_MARKERS
from ..utils.atomic_save import commit_staged

__all__ = ["LOADABLE_MARKERS", "staged_output", "commit_staged",
           "save_full_pipeline", "save_lora", "lora_state_and_metadata"]


@contextlib.contextmanager
def staged_output(output_dir: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``output_dir`` (same file system, so moves are renames)."""
    out = Path(output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.staging-*"):  # a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_full_pipeline(pipeline, directory: str | os.PathLike) -> None:
    pipeline.save_pretrained(str(directory), safe_serialization=True)


def lora_state_and_metadata(model):
    """(diffusers-format LoRA state dict, adapter metadata) of ``model``'s "default" adapter.

    The metadata (the ``LoraConfig`` as a dict) is stored in the safetensors header, which is
    what lets ``load_lora_weights`` rebuild the adapter with the right ``lora_alpha`` when it
    differs from the rank.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    return state, model.peft_config["default"].to_dict()


def save_lora(directory: str | os.PathLike, *, unet=None, text_encoder=None) -> None:
    """``pytorch_lora_weights.safetensors`` loadable by ``pipe.load_lora_weights(directory)``."""
    from diffusers import StableDiffusionPipeline

    kwargs = {}
    if unet is not None:
        kwargs["unet_lora_layers"], kwargs["unet_lora_adapter_metadata"] = \
            lora_state_and_metadata(unet)
    if text_encoder is not None:
        kwargs["text_encoder_lora_layers"], kwargs["text_encoder_lora_adapter_metadata"] = \
            lora_state_and_metadata(text_encoder)
    if not kwargs:
        raise ValueError("save_lora needs a unet or a text_encoder with a LoRA adapter")
    StableDiffusionPipeline.save_lora_weights(str(directory), safe_serialization=True, **kwargs)
