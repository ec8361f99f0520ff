"""Loading classifiers to unlearn and writing the model card that records what was forgotten.

Sources: a saved ``AutoModelForImageClassification`` folder (safetensors only), a config JSON
(fresh weights, for training the original model), a saved :class:`CLIPZeroShotClassifier`, a
plain ``CLIPModel`` folder turned into a zero-shot classifier over the dataset's class names,
or the built-in tiny test models ``tiny-resnet`` / ``tiny-vit`` (offline quickstart and tests).
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Optional, Sequence

__all__ = ["validate_model_source", "load_image_classifier", "write_model_card", "has_image_processor",
           "BUILTIN_MODELS"]

BUILTIN_MODELS = ("tiny-resnet", "tiny-vit")


def validate_model_source(name_or_path: str) -> None:
    if name_or_path in BUILTIN_MODELS:
        return
    if os.path.isfile(name_or_path):
        if not name_or_path.endswith(".json"):
            raise ValueError(f"model file {name_or_path!r} must be a config .json")
        return
    if not os.path.isdir(name_or_path):
        raise ValueError(f"model {name_or_path!r} is not a folder, a config .json, or one of {BUILTIN_MODELS} "
                         "(no Hub downloads: pass a local path)")
    files = set(os.listdir(name_or_path))
    if "config.json" not in files:
        raise ValueError(f"model folder {name_or_path!r} has no config.json")
    if not any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in files):
        raise ValueError(f"model folder {name_or_path!r} has no .safetensors weights "
                         "(pickled .bin weights are not loaded, for safety)")


def load_image_classifier(name_or_path: str, num_labels: int = 10,
                          label_names: Optional[Sequence[str]] = None, num_channels: int = 1,
                          clip_zero_shot: bool = False, clip_train_encoder: str = "image",
                          clip_template: Optional[str] = None, seed: int = 0):
    """The model, and the image processor to use with it (None when not needed)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageClassification

    from . import testing
    from .clip_zero_shot import DEFAULT_TEMPLATE, ZERO_SHOT_CONFIG_NAME, CLIPZeroShotClassifier

    validate_model_source(name_or_path)
    if name_or_path == "tiny-resnet":
        return testing.tiny_resnet_classifier(num_labels, num_channels, seed, label_names), None
    if name_or_path == "tiny-vit":
        return testing.tiny_vit_classifier(num_labels, num_channels=num_channels, seed=seed,
                                           label_names=label_names), None
    if os.path.isfile(name_or_path):
        config = AutoConfig.from_pretrained(name_or_path)
        names = list(label_names) if label_names else [str(i) for i in range(num_labels)]
        config.num_labels = len(names)
        config.id2label = dict(enumerate(names))
        config.label2id = {n: i for i, n in enumerate(names)}
        torch.manual_seed(seed)
        return AutoModelForImageClassification.from_config(config), None
    if os.path.isfile(os.path.join(name_or_path, ZERO_SHOT_CONFIG_NAME)):
        model = CLIPZeroShotClassifier.from_pretrained(name_or_path)
        if model.train_encoder != clip_train_encoder:
            model.train_encoder = clip_train_encoder
            model.set_trainable(clip_train_encoder)
        return model, _maybe_processor(name_or_path)
    if clip_zero_shot:
        from transformers import AutoTokenizer, CLIPModel

        if not label_names:
            raise ValueError("CLIP zero-shot classification needs the dataset's class names")
        clip = CLIPModel.from_pretrained(name_or_path, use_safetensors=True)
        tok = AutoTokenizer.from_pretrained(name_or_path)
        model = CLIPZeroShotClassifier(clip, tok, label_names, template=clip_template or DEFAULT_TEMPLATE,
                                       train_encoder=clip_train_encoder)
        return model, _maybe_processor(name_or_path)
    model = AutoModelForImageClassification.from_pretrained(name_or_path, use_safetensors=True)
    return model, _maybe_processor(name_or_path)


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def has_image_processor(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in PROCESSOR_FILES)


def _maybe_processor(path: str):
    if not has_image_processor(path):
        return None
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(path)


def write_model_card(output_dir: str, *, base_model: str, method: str, forget: Mapping,
                     munba_args: Mapping, metrics: Mapping[str, float], dataset: str) -> str:
    """README.md with YAML metadata, the unlearning spec and the measured metrics."""
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, (int, float)) else f"| {k} | {v} |"
                     for k, v in metrics.items())
    text = f"""---
library_name: transformers
tags:
- machine-unlearning
- munba
- image-classification
---

# Unlearned image classifier ({method})

Produced by [hf_munba](https://github.com/) (MUNBa: Machine Unlearning via Nash Bargaining,
Wu & Harandi 2024) from `{base_model}` on `{dataset}`.

## What was forgotten
```json
{json.dumps(dict(forget), indent=2)}
```

## Unlearning options
```json
{json.dumps(dict(munba_args), indent=2, sort_keys=True)}
```

## Metrics (percent; run-time in seconds)
| metric | value |
|---|---|
{rows}
"""
    path = os.path.join(output_dir, "README.md")
    with open(path, "w") as f:
        f.write(text)
    return path
