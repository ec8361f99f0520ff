"""Unlearning for diffusion pipelines (Stable Diffusion 1.x today).

Data flows one way: :mod:`.data` (paired forget/retain batches, latent cache) ->
:mod:`.objectives` (the players' losses) -> :mod:`.unlearner` (one batch in, the losses out) ->
the shared step (:mod:`hf_munba.unlearning`). :mod:`.params` picks what is trained (a subset or
LoRA), :mod:`.inputs` checks the inputs before any model work, :mod:`.export` writes the result
and :mod:`.generation` makes images from a plan. Submodules load on use.
"""
