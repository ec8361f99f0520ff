"""Unlearning for diffusion pipelines: SD 1.x/2.x, SDXL, SD 3 and Flux.

:mod:`.families` holds what differs between model families (prompt encoding, noising and the
training target, the denoiser call), picked from the pipeline's ``model_index.json``; the rest
is shared. Data flows one way: :mod:`.data` (paired forget/retain batches, latent cache) ->
:mod:`.objectives` (the players' losses) -> :mod:`.unlearner` (one batch in, the losses out) ->
the shared step (:mod:`hf_munba.unlearning`). :mod:`.params` picks what is trained (a subset or
LoRA), :mod:`.original_weights` keeps the original model for the players that need it without a
copy of the model, :mod:`.inputs` checks the inputs before any model work, :mod:`.export` writes the result
and :mod:`.generation` makes images from a plan. :mod:`.config` holds the run's settings
(:class:`SDUnlearningConfig`) and :mod:`.trainer` the accelerate loop (:func:`train`), which
``training/train_munba_sd.py`` only parses for. Submodules load on use, so importing this package
costs nothing until a name is used.
"""

import importlib

_LAZY = {"SDUnlearningConfig": ".config", "train": ".trainer", "check_inputs": ".trainer",
         "SDUnlearner": ".unlearner", "PairedUnlearningDataset": ".data",
         "generate_unlearning_data": ".generation", "detect_family": ".families",
         "ModelFamily": ".families"}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
