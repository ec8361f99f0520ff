"""Hub-ready outputs of an SD unlearning run, written so a crash never leaves a loadable half.

Everything is first written into a temporary folder next to the output directory
(:func:`hf_munba.utils.atomic_save.staged_output` with ``beside=True``, re-exported here), then
moved in entry by entry with the files that make a folder loadable moved last
(``model_index.json`` for a pipeline, ``pytorch_lora_weights.safetensors`` for LoRA; each move is
an atomic ``os.replace``).
Before old outputs are replaced, the old markers are removed first, so at no moment does the
folder hold a mix that ``from_pretrained`` / ``load_lora_weights`` would accept.
All weights are safetensors.
"""

from __future__ import annotations

import os

from ..utils.atomic_save import MARKER_FILES as LOADABLE_MARKERS
from ..utils.atomic_save import commit_staged, staged_output  # one implementation, re-exported

__all__ = ["LOADABLE_MARKERS", "staged_output", "commit_staged",
           "save_full_pipeline", "save_lora", "lora_components", "lora_state_and_metadata"]


def save_full_pipeline(pipeline, directory: str | os.PathLike) -> None:
    pipeline.save_pretrained(str(directory), safe_serialization=True)


def lora_state_and_metadata(model):
    """(diffusers-format LoRA state dict, adapter metadata) of ``model``'s "default" adapter.

    The metadata (the ``LoraConfig`` as a dict) is stored in the safetensors header, which is
    what lets ``load_lora_weights`` rebuild the adapter with the right ``lora_alpha`` when it
    differs from the rank.
    """
    from diffusers.training_utils import _collate_lora_metadata
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    return state, _collate_lora_metadata({"m": model})["m_lora_adapter_metadata"]


def lora_components(pipeline_class) -> tuple:
    """The components whose LoRA layers ``pipeline_class.save_lora_weights`` stores, e.g.
    ``("unet", "text_encoder", "text_encoder_2")`` for SDXL; SD 3's and Flux's T5 is not one
    of them (diffusers saves no T5 LoRA), so a T5 is unlearned by full fine-tuning only."""
    import inspect

    names = inspect.signature(pipeline_class.save_lora_weights).parameters
    return tuple(n[:-len("_lora_layers")] for n in names if n.endswith("_lora_layers"))


def save_lora(directory: str | os.PathLike, *, pipeline_class=None, **modules) -> None:
    """``pytorch_lora_weights.safetensors`` loadable by ``pipe.load_lora_weights(directory)``.

    ``modules``: component name -> model with a "default" LoRA adapter (``unet=``,
    ``transformer=``, ``text_encoder=``, ``text_encoder_2=``; None entries are ignored), saved
    through ``pipeline_class.save_lora_weights`` (default ``StableDiffusionPipeline``), so the
    file has the key layout of that family's loader. The adapter metadata comes from diffusers'
    own collation helper (what its LoRA training examples pass to ``save_lora_weights``), so the
    header matches what ``load_lora_weights`` expects in every diffusers release we support.
    """
    from diffusers.training_utils import _collate_lora_metadata
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    if pipeline_class is None:
        from diffusers import StableDiffusionPipeline as pipeline_class
    modules = {name: m for name, m in modules.items() if m is not None}
    allowed = lora_components(pipeline_class)
    unknown = sorted(set(modules) - set(allowed))
    if unknown:
        raise ValueError(f"{pipeline_class.__name__}.save_lora_weights stores LoRA layers of "
                         f"{list(allowed)}, not {unknown}")
    if not modules:
        raise ValueError(f"save_lora needs one of {list(allowed)} with a LoRA adapter")
    # the UNet families' loaders read diffusers' key names; SD 3's and Flux's read peft's (what
    # diffusers' own LoRA examples for each family save)
    convert = convert_state_dict_to_diffusers if "unet" in allowed else (lambda state: state)
    kwargs = {f"{name}_lora_layers": convert(get_peft_model_state_dict(m))
              for name, m in modules.items()}
    kwargs.update(_collate_lora_metadata(modules))
    pipeline_class.save_lora_weights(str(directory), safe_serialization=True, **kwargs)
