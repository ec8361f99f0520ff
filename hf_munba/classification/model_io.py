"""Loading classifiers to unlearn and writing the model card that records what was forgotten.

Sources: a saved ``AutoModelForImageClassification`` folder (safetensors only), a config JSON
(fresh weights, for training the original model), a saved :class:`CLIPZeroShotClassifier`, a
plain ``CLIPModel`` folder turned into a zero-shot classifier over the dataset's class names, or
a name the caller maps to a builder (``model_sources``). The library names no built-in models:
the tiny test models (``tiny-resnet`` / ``tiny-vit``) are ``hf_munba.testing`` factories, which
the library never imports; the command-line scripts pass them in as ``model_sources``.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Mapping, Optional, Sequence

__all__ = ["validate_model_source", "load_image_classifier", "write_model_card", "classifier_model_card",
           "is_hub_model_id", "has_image_processor", "ModelSources"]

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


# What the Hub's model-index shows for each metric the script measures: (name, metric type, split).
CARD_METRICS = {
    "acc_forget": ("Acc D_f (forget set; lower = more forgotten)", "accuracy", "train"),
    "acc_retain": ("Acc D_r (retain set)", "accuracy", "train"),
    "acc_test": ("Acc D_t (test set)", "accuracy", "test"),
    "mia_efficacy": ("MIA-efficacy (share of D_f a membership attack calls non-member)", "mia_efficacy",
                     "train"),
}
# TrainingArguments fields that describe the recipe (paths, tokens and logging options are left out).
CARD_TRAINING_ARGS = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                      "gradient_accumulation_steps", "optim", "optim_args", "lr_scheduler_type",
                      "warmup_steps", "weight_decay", "max_grad_norm", "seed", "bf16", "fp16")


def is_hub_model_id(name: str) -> bool:
    """``owner/name`` that is not a local path: the only form the Hub accepts as ``base_model``."""
    return (not os.path.exists(name) and name.count("/") == 1 and not name.startswith((".", "/", "~"))
            and all(part.strip() for part in name.split("/")))


def _public(value):
    """A card-safe value: enums as their value, local paths by their last component only."""
    value = getattr(value, "value", value)
    if isinstance(value, str) and (os.path.isabs(value) or os.path.exists(value)):
        return os.path.basename(os.path.normpath(value))
    return value


def _rows(mapping: Mapping) -> str:
    out = ["| name | value |", "|---|---|"]
    for k, v in mapping.items():
        v = _public(v)
        out.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {str(v).replace('|', '/')} |")
    return "\n".join(out)


def classifier_model_card(*, base_model: str, method: str, forget: Mapping, munba_args: Mapping,
                          metrics: Mapping[str, float], dataset: str, training_args=None):
    """A ``huggingface_hub.ModelCard``: license, pipeline tag, tags, ``base_model`` (a Hub id only,
    never a local path), a ``model-index`` with the metrics the run measured, and the recipe."""
    import math

    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    dataset_name = _public(dataset)
    dataset_type = "sklearn-digits" if dataset == "digits" else "imagefolder"
    model_name = f"{method}-{dataset_name}"
    results = [EvalResult(task_type="image-classification", task_name="Image classification after unlearning",
                          dataset_type=dataset_type, dataset_name=dataset_name, dataset_split=split,
                          metric_type=metric_type, metric_name=name, metric_value=round(float(metrics[key]), 4))
               for key, (name, metric_type, split) in CARD_METRICS.items()
               if isinstance(metrics.get(key), (int, float)) and math.isfinite(metrics[key])]
    on_hub = is_hub_model_id(base_model)
    data = ModelCardData(license="apache-2.0", library_name="transformers", pipeline_tag="image-classification",
                         tags=["machine-unlearning", "munba", "image-classification", method],
                         base_model=base_model if on_hub else None, model_name=model_name,
                         eval_results=results or None)
    base_ref = f"[{base_model}](https://huggingface.co/{base_model})" if on_hub else f"`{_public(base_model)}`"
    forgotten = dict(forget)
    what = (f"forgets {json.dumps(forgotten)}" if forgotten else "was trained on the whole training split "
            "(nothing forgotten: an original model to unlearn from)")
    hparams = {"method": method, **{f"munba.{k}": v for k, v in sorted(dict(munba_args).items())}}
    if training_args is not None:
        for k in CARD_TRAINING_ARGS:
            if hasattr(training_args, k):
                hparams[k] = getattr(training_args, k)
    body = [
        f"# {model_name}",
        "",
        f"An image classifier made from {base_ref} on `{dataset_name}` with `hf_munba` "
        f"(method `{method}`; MUNBa is Machine Unlearning via Nash Bargaining, Wu & Harandi 2024). "
        f"It {what}.",
        "",
        "```python",
        "from transformers import AutoModelForImageClassification",
        'model = AutoModelForImageClassification.from_pretrained("<this folder or repo>", use_safetensors=True)',
        "```",
        "",
        "## What was forgotten",
        "",
        "```json",
        json.dumps(forgotten, indent=2),
        "```",
        "",
        "## Metrics (percent; run-time in seconds)",
        "",
        _rows(metrics),
        "",
        "## Training hyper-parameters",
        "",
        _rows(hparams),
        "",
        "## Limitations",
        "",
        "The metrics are measured on the data named above. Unlearning makes the forget set look "
        "unseen to these tests; it is not a proof that the information cannot be recovered.",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def write_model_card(output_dir: str, *, base_model: str, method: str, forget: Mapping,
                     munba_args: Mapping, metrics: Mapping[str, float], dataset: str,
                     training_args=None) -> str:
    """``output_dir/README.md`` from :func:`classifier_model_card`; returns its path."""
    path = os.path.join(output_dir, "README.md")
    classifier_model_card(base_model=base_model, method=method, forget=forget, munba_args=munba_args,
                          metrics=metrics, dataset=dataset, training_args=training_args).save(path)
    return path
