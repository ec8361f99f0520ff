"""Model cards for unlearned models and the push to the Hugging Face Hub.

The card is the Hub's README.md: YAML metadata (base_model, tags, library_name and a
``model-index`` with the run's measured numbers, which the Hub shows as evaluation results) that
makes the model findable, then what was forgotten and retained, the hyper-parameters, a validation
image grid and the measured metrics. Secrets never reach it: keys that look like tokens are
dropped. Local paths never reach it either: a card is published, and ``/home/me/data/forget``
means nothing to its readers (and tells them about the author's machine), so a local path is
written as its last component and a local base model is not named as ``base_model``.

Both front ends' cards (:func:`sd_model_card`, :func:`classifier_model_card`) are built by one
writer, :func:`build_model_card`: ``huggingface_hub.ModelCardData`` for the metadata, the same
base-model rule (:func:`is_hub_id`), the same path and secret scrubbing (:func:`card_hparams`)
and the same tables; only the words and the metrics differ.
"""

from __future__ import annotations

import math
import os
from enum import Enum
from pathlib import PurePath
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

__all__ = ["SECRET_KEYS", "public_hparams", "tracker_hparams", "card_hparams", "is_hub_id",
           "eval_results", "card_text_with_eval_results", "build_model_card", "sd_model_card",
           "classifier_model_card", "write_classifier_model_card", "CLASSIFIER_CARD_METRICS",
           "HubAccessError", "check_hub_access", "push_folder_to_hub"]

SECRET_KEYS = ("hub_token", "token", "api_key", "password")
DEFAULT_TAGS = ("machine-unlearning", "munba", "diffusers", "stable-diffusion",
                "stable-diffusion-diffusers", "text-to-image")


def _json_native(v: Any) -> Any:
    if isinstance(v, Enum):  # e.g. TrainingArguments' optim / lr_scheduler_type
        return _json_native(v.value)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_json_native(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _json_native(x) for k, x in v.items()}
    return str(v)  # paths, dtypes, enums


def public_hparams(args: Mapping) -> Dict:
    """``args`` without secrets (anything named like a token), as JSON values: a list flag stays a
    list (``training_args.json`` round-trips it), a path becomes a string."""
    return {k: _json_native(v) for k, v in dict(args).items()
            if not any(s in k.lower() for s in SECRET_KEYS)}


def tracker_hparams(args: Mapping) -> Dict:
    """:func:`public_hparams` for ``init_trackers``: trackers take scalars only (None -> "none",
    a list or dict -> its JSON text)."""
    import json

    out = {}
    for k, v in public_hparams(args).items():
        out[k] = "none" if v is None else (json.dumps(v) if isinstance(v, (list, dict)) else v)
    return out


def _is_local_path(v: str) -> bool:
    return os.path.isabs(v) or v.startswith("~") or (os.sep in v or "/" in v) and os.path.exists(v)


def _public_path(v: str) -> str:
    return PurePath(os.path.expanduser(v).rstrip("/\\")).name or v


def card_hparams(args: Mapping) -> Dict:
    """:func:`public_hparams` for a published card: a local path is shown as its last component."""
    out = {}
    for k, v in public_hparams(args).items():
        if isinstance(v, str) and _is_local_path(v):
            v = _public_path(v)
        elif isinstance(v, list):
            v = " ".join(_public_path(x) if isinstance(x, str) and _is_local_path(x) else str(x)
                         for x in v)
        out[k] = v
    return out


def is_hub_id(name: str) -> bool:
    """A Hub repo id (``org/name``) that is not a local path: the only form the Hub accepts as
    ``base_model``."""
    return (not os.path.exists(os.path.expanduser(name)) and name.count("/") == 1
            and not name.startswith((".", "~", "/")) and all(p.strip() for p in name.split("/")))


# Run counters, not measurements: in the card's table but not in its model-index.
COUNTER_KEYS = ("skipped_steps", "bargaining_fallback_steps",  # run counters, not evaluations
                "forget_times_satisfied", "forget_satisfied_at_end")


def _flat_numbers(metrics: Mapping, prefix: str = "") -> Dict[str, float]:
    out = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat_numbers(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v) if isinstance(v, float) else v
    return out


def eval_results(metrics: Mapping, *, forget_data: str = "forget set",
                 retain_data: str = "retain set") -> List:
    """``huggingface_hub.EvalResult``s (the card's model-index) of the numbers a run measured.

    ``before/``/``after/`` ``forget_loss`` and ``retain_loss`` (the training losses on fixed
    batches of D_f / D_r, with fixed noise) are reported on the forget / retain data; any other
    finite number (e.g. from the evaluation suite via ``--model_card_metrics``; nested JSON objects
    are flattened with ``/``) on "evaluation". Run counters (skipped steps) are left out.
    """
    from huggingface_hub import EvalResult

    results = []
    for key, value in _flat_numbers(metrics).items():
        if key in COUNTER_KEYS:
            continue
        leaf = key.rsplit("/", 1)[-1]
        if leaf in ("forget_loss", "retain_loss") and key.count("/") == 1:
            role = leaf.split("_")[0]
            data = forget_data if role == "forget" else retain_data
            name = f"{leaf.replace('_', ' ')} ({key.split('/')[0]} unlearning)"
        else:
            role, data, name = "generated", "generated images (evaluation)", key
        # the Hub groups results by (task, dataset type, config): the config keeps the sets apart
        results.append(EvalResult(
            task_type="text-to-image", task_name="Concept unlearning",
            dataset_type=data if is_hub_id(data) else "imagefolder", dataset_config=role,
            dataset_name=_public_path(data) if _is_local_path(data) else data,
            metric_type=key.replace("/", "_"), metric_name=name, metric_value=value))
    return results


def _table(rows: Mapping) -> str:
    lines = ["| name | value |", "|---|---|"]
    for k, v in rows.items():
        if isinstance(v, float):
            v = f"{v:.6g}"
        lines.append(f"| {k} | {str(v).replace('|', '/')} |")
    return "\n".join(lines)


def _shown_base(base_model: str) -> str:
    return base_model if is_hub_id(base_model) else _public_path(base_model)


def build_model_card(*, body: Sequence[str], base_model: Optional[str] = None, **metadata):
    """The one card writer: ``ModelCardData(**metadata)`` (``base_model`` only when it is a Hub
    id, never a local path) as the YAML header, then ``body`` (markdown lines)."""
    from huggingface_hub import ModelCard, ModelCardData

    on_hub = base_model is not None and is_hub_id(base_model)
    data = ModelCardData(base_model=base_model if on_hub else None, **metadata)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def sd_model_card(*, base_model: str, forgotten: Sequence[str], retained: Sequence[str],
                  hparams: Mapping, metrics: Optional[Mapping] = None,
                  image_grid: Optional[str] = None, lora: bool = False,
                  extra_tags: Iterable[str] = (), repo_id: Optional[str] = None,
                  objective: Optional[str] = None, model_name: Optional[str] = None,
                  forget_data: str = "forget set", retain_data: str = "retain set",
                  family: Optional[str] = None):
    """A ``huggingface_hub.ModelCard`` for an unlearned Stable Diffusion model.

    ``family``: the model family that ran (:meth:`ModelFamily.describe`, e.g. "sdxl
    (StableDiffusionXLPipeline, unet, target epsilon)"), shown under the base model and tagged.

    ``metrics`` fill the card's table and, through :func:`eval_results`, its model-index (named
    ``model_name``, default: the repo name); ``forget_data`` / ``retain_data`` name the data the
    losses were measured on (a Hub dataset id, or a local folder, shown by its last component).
    """
    family_tag = [f"munba-{family.split()[0]}"] if family else []
    tags = list(dict.fromkeys([*DEFAULT_TAGS, *(["lora"] if lora else []), *family_tag,
                               *extra_tags]))
    # The Hub only accepts repo ids as base_model; a local base is named by its folder name only.
    on_hub = is_hub_id(base_model)
    shown_base = _shown_base(base_model)
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else "munba-unlearned")
    results = eval_results(metrics or {}, forget_data=forget_data, retain_data=retain_data)
    metadata = dict(library_name="diffusers", tags=tags, license="creativeml-openrail-m",
                    pipeline_tag="text-to-image", model_name=model_name if results else None,
                    eval_results=results or None)
    base_ref = (f"[{base_model}](https://huggingface.co/{base_model})" if on_hub
                else f"a local pipeline (`{shown_base}`)")
    usage = ("pipe = DiffusionPipeline.from_pretrained(BASE)\npipe.load_lora_weights(REPO)"
             if lora else "pipe = DiffusionPipeline.from_pretrained(REPO)")
    usage = usage.replace("BASE", repr(base_model if on_hub else f"path/to/{shown_base}"))
    usage = usage.replace("REPO", repr(repo_id or "<this repo>"))
    body = [
        "# Unlearned with MUNBa",
        "",
        f"This model is {base_ref} after machine unlearning with MUNBa (Machine Unlearning via "
        "Nash Bargaining, Wu & Harandi 2024), trained with `hf_munba`. Each optimizer step moves "
        "along the Nash bargaining direction of the forgetting and the retaining gradient.",
        "",
        *([f"Model family: {family}.", ""] if family else []),
        "## Forgotten",
        "",
        *[f"- `{p}`" for p in forgotten],
        "",
        *([f"Objective: {objective}", ""] if objective else []),
        "## Retained",
        "",
        *[f"- `{p}`" for p in retained],
        "",
        "## Usage",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        usage,
        "```",
        "",
    ]
    if image_grid:
        body += ["## Validation images", "", f"![validation images]({image_grid})", ""]
    if metrics:
        body += ["## Metrics", "",
                 "Losses on fixed batches of the forget / retain data with fixed noise, before "
                 "and after unlearning (also in the card's metadata as evaluation results).", "",
                 _table(card_hparams(metrics)), ""]
    body += ["## Training hyper-parameters", "", _table(card_hparams(hparams)), ""]
    body += ["## Limitations", "",
             "Unlearning suppresses a concept for the prompts and data it was trained on; it is "
             "not a proof that the concept cannot be recovered (e.g. by adversarial prompts or "
             "further fine-tuning). Evaluate before relying on it.", ""]
    return build_model_card(body=body, base_model=base_model, **metadata)


# What the Hub's model-index shows for each metric the classifier script measures:
# (name, metric type, split).
CLASSIFIER_CARD_METRICS = {
    "acc_forget": ("Acc D_f (forget set; lower = more forgotten)", "accuracy", "train"),
    "acc_retain": ("Acc D_r (retain set)", "accuracy", "train"),
    "acc_test": ("Acc D_t (test set)", "accuracy", "test"),
    "mia_efficacy": ("MIA-efficacy (share of D_f a membership attack calls non-member)",
                     "mia_efficacy", "train"),
}
# TrainingArguments fields that describe the recipe (paths, tokens and logging options left out).
CLASSIFIER_CARD_TRAINING_ARGS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "optim", "optim_args", "lr_scheduler_type", "warmup_steps",
    "weight_decay", "max_grad_norm", "seed", "bf16", "fp16")


def classifier_model_card(*, base_model: str, method: str, forget: Mapping, munba_args: Mapping,
                          metrics: Mapping[str, float], dataset: str, training_args=None):
    """A ``huggingface_hub.ModelCard`` for an unlearned image classifier: license, pipeline tag,
    tags, ``base_model`` (a Hub id only, never a local path), a ``model-index`` with the metrics
    the run measured (:data:`CLASSIFIER_CARD_METRICS`; unmeasured NaNs left out), the recipe."""
    import json

    from huggingface_hub import EvalResult

    dataset_name = _public_path(dataset) if _is_local_path(dataset) else dataset
    dataset_type = "sklearn-digits" if dataset == "digits" else "imagefolder"
    model_name = f"{method}-{dataset_name}"
    results = [EvalResult(task_type="image-classification",
                          task_name="Image classification after unlearning",
                          dataset_type=dataset_type, dataset_name=dataset_name, dataset_split=split,
                          metric_type=metric_type, metric_name=name,
                          metric_value=round(float(metrics[key]), 4))
               for key, (name, metric_type, split) in CLASSIFIER_CARD_METRICS.items()
               if isinstance(metrics.get(key), (int, float)) and math.isfinite(metrics[key])]
    base_ref = (f"[{base_model}](https://huggingface.co/{base_model})" if is_hub_id(base_model)
                else f"`{_shown_base(base_model)}`")
    forgotten = dict(forget)
    what = (f"forgets {json.dumps(forgotten)}" if forgotten else "was trained on the whole "
            "training split (nothing forgotten: an original model to unlearn from)")
    hparams = {"method": method, **{f"munba.{k}": v for k, v in sorted(dict(munba_args).items())}}
    if training_args is not None:
        for k in CLASSIFIER_CARD_TRAINING_ARGS:
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
        'model = AutoModelForImageClassification.from_pretrained("<this folder or repo>", '
        'use_safetensors=True)',
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
        _table(card_hparams(metrics)),
        "",
        "## Training hyper-parameters",
        "",
        _table(card_hparams(hparams)),
        "",
        "## Limitations",
        "",
        "The metrics are measured on the data named above. Unlearning makes the forget set look "
        "unseen to these tests; it is not a proof that the information cannot be recovered.",
        "",
    ]
    return build_model_card(
        body=body, base_model=base_model, license="apache-2.0", library_name="transformers",
        pipeline_tag="image-classification",
        tags=["machine-unlearning", "munba", "image-classification", method],
        model_name=model_name, eval_results=results or None)


def write_classifier_model_card(output_dir: str, **kwargs) -> str:
    """``output_dir/README.md`` from :func:`classifier_model_card` (same keywords); its path."""
    path = os.path.join(output_dir, "README.md")
    classifier_model_card(**kwargs).save(path)
    return path


def card_text_with_eval_results(text: str, metrics: Mapping, *, dataset_name: str,
                                model_name: str) -> str:
    """``text`` (a README.md, with or without YAML front matter) with ``metrics`` as the
    model-index results on the generated images, replacing earlier ones of that set.

    What the evaluation suite (``eval/evaluate_generation.py --model_card``) uses so its numbers
    reach the card's metadata, as the training script's do; the card's other metadata, its other
    results (the training losses) and its text are kept.
    """
    from huggingface_hub import ModelCard, ModelCardData

    new = eval_results(metrics)
    for r in new:
        r.dataset_name = dataset_name
    if not text.startswith("---"):
        if not new:
            return text
        data = ModelCardData(model_name=model_name, eval_results=new)
        return f"---\n{data.to_yaml()}\n---\n{text}"
    card = ModelCard(text)
    kept = [r for r in (card.data.eval_results or []) if r.dataset_config != "generated"]
    card.data.eval_results = (kept + new) or None
    if card.data.eval_results:
        card.data.model_name = card.data.model_name or model_name
    return str(card)


class HubAccessError(RuntimeError):
    """The Hub cannot take the push: offline, unreachable, no or a wrong token. One line, no token."""


def check_hub_access(repo_id: str, token: Optional[str] = None) -> str:
    """Make sure ``repo_id`` can be pushed to, before any training; returns the user name.

    Asks the Hub who the token (``token`` or the saved login) belongs to, so that no network,
    ``HF_HUB_OFFLINE``, a missing, invalid or read-only token, or a namespace the user cannot
    write to fails in seconds with one :class:`HubAccessError` line instead of after the run.
    The token never appears in a message.
    """
    import huggingface_hub
    from huggingface_hub import constants, errors

    where = constants.ENDPOINT
    if constants.HF_HUB_OFFLINE:
        raise HubAccessError("--push_to_hub needs the Hub, but HF_HUB_OFFLINE is set; unset it or "
                             "drop --push_to_hub (the model is saved locally either way)")
    try:
        info = huggingface_hub.whoami(token=token)
    except errors.LocalTokenNotFoundError:
        raise HubAccessError("--push_to_hub needs a Hub token: run `hf auth login` or pass "
                             "--hub_token") from None
    except errors.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        what = ("the Hub token is not valid (401)" if status == 401
                else f"the Hub at {where} answered HTTP {status}")
        raise HubAccessError(f"--push_to_hub: {what}; check --hub_token / `hf auth login`") from None
    except Exception as e:  # connection refused, DNS, timeouts: the transport's own types
        raise HubAccessError(f"--push_to_hub: cannot reach the Hub at {where} "
                             f"({type(e).__name__}); check the network or drop --push_to_hub") from None
    user = info.get("name", "")
    role = ((info.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise HubAccessError("--push_to_hub: the Hub token is read-only; use a token with write "
                             "access")
    namespace = repo_id.split("/")[0] if "/" in repo_id else user
    allowed = {user, *(o.get("name") for o in info.get("orgs", []) if isinstance(o, dict))}
    if namespace not in allowed:
        raise HubAccessError(f"--hub_model_id {repo_id}: the token's user {user!r} cannot write to "
                             f"{namespace!r} (its namespaces: {sorted(n for n in allowed if n)})")
    return user


def push_folder_to_hub(folder: str | os.PathLike, repo_id: str, *, token: Optional[str] = None,
                       private: bool = False, commit_message: str = "Upload unlearned model",
                       ignore_patterns: Sequence[str] = ("checkpoint-*", "checkpoint-*/**",
                                                         "logs/**", ".*")) -> str:
    """Create ``repo_id`` (if needed) and upload ``folder``; returns the repo id."""
    import huggingface_hub

    url = huggingface_hub.create_repo(repo_id, token=token, private=private, exist_ok=True,
                                      repo_type="model")
    repo_id = getattr(url, "repo_id", None) or repo_id
    huggingface_hub.upload_folder(repo_id=repo_id, folder_path=str(folder), token=token,
                                  commit_message=commit_message, repo_type="model",
                                  ignore_patterns=list(ignore_patterns))
    return repo_id
