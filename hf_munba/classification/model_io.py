"""Loading classifiers to unlearn and writing the model card that records what was forgotten.

Sources: a saved ``AutoModelForImageClassification`` folder (safetensors only), a config JSON
(fresh weights, for training the original model), a saved :class:`CLIPZeroShotClassifier`, a
plain ``CLIPModel`` folder turned into a zero-shot classifier over the dataset's class names, or
a name the caller maps to a builder (``model_sources``). The library names no built-in models:
the tiny test models (``tiny-resnet`` / ``tiny-vit``) are ``hf_munba.testing`` factories, which
the library never imports; the command-line scripts pass them in as ``model_sources``.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping, Optional, Sequence

# The classifier's model card is written by the one card writer in hf_munba.utils.model_card
# (shared with the SD card); these names stay importable from here for one release.
from ..utils.model_card import CLASSIFIER_CARD_METRICS as CARD_METRICS  # noqa: F401
from ..utils.model_card import CLASSIFIER_CARD_TRAINING_ARGS as CARD_TRAINING_ARGS  # noqa: F401
from ..utils.model_card import classifier_model_card  # noqa: F401
from ..utils.model_card import is_hub_id as is_hub_model_id  # noqa: F401

__all__ = ["validate_model_source", "load_image_classifier", "write_model_card", "classifier_model_card",
           "is_hub_model_id", "has_image_processor", "ModelSources", "CARD_METRICS", "CARD_TRAINING_ARGS"]

#: name -> builder(num_labels=, num_channels=, seed=, label_names=) returning a fresh model
ModelSources = Mapping[str, Callable[..., object]]


def validate_model_source(name_or_path: str, model_sources: Optional[ModelSources] = None) -> None:
    """Fail fast, before anything is loaded, on a source :func:`load_image_classifier` cannot use."""
    if model_sources and name_or_path in model_sources:
        return
    if os.path.isfile(name_or_path):
        if not name_or_path.endswith(".json"):
            raise ValueError(f"model file {name_or_path!r} must be a config .json")
        return
    if not os.path.isdir(name_or_path):
        named = f", or one of {tuple(model_sources)}" if model_sources else ""
        raise ValueError(f"model {name_or_path!r} is not a folder, a config .json{named} "
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
                          clip_template: Optional[str] = None, seed: int = 0,
                          model_sources: Optional[ModelSources] = None):
    """The model, and the image processor to use with it (None when not needed).

    ``model_sources`` maps extra names to builders (called with ``num_labels``, ``num_channels``,
    ``seed``, ``label_names``), e.g. the test models of ``hf_munba.testing`` in the CLIs.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageClassification

    from .clip_zero_shot import DEFAULT_TEMPLATE, ZERO_SHOT_CONFIG_NAME, CLIPZeroShotClassifier

    validate_model_source(name_or_path, model_sources)
    if model_sources and name_or_path in model_sources:
        return model_sources[name_or_path](num_labels=num_labels, num_channels=num_channels,
                                           seed=seed, label_names=label_names), None
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
                     munba_args: Mapping, metrics: Mapping[str, float], dataset: str,
                     training_args=None) -> str:
    """``output_dir/README.md`` from :func:`~hf_munba.utils.model_card.classifier_model_card`."""
    from ..utils.model_card import write_classifier_model_card

    return write_classifier_model_card(output_dir, base_model=base_model, method=method,
                                       forget=forget, munba_args=munba_args, metrics=metrics,
                                       dataset=dataset, training_args=training_args)
