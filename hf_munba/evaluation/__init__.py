"""Evaluation of unlearned models: classification metrics (accuracy, MIA, Avg. Gap), forget/retain
trade-off curves at equal forgetting (``tradeoff``) and generative metrics (NudeNet counts,
generated-image classification, CLIP score, FID), plus the adversarial-prompt attack (``attack``).

Shared by all of them: ``results`` (the one ``results.json`` + ``results.md`` writer and its
markdown table), ``grid`` (the one labelled image grid) and ``cli`` (the ``--model`` / ``--lora``
arguments of the generative CLIs). Nothing here imports ``hf_munba.testing``."""
