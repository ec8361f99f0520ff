"""Model cards for unlearned models and the push to the Hugging Face Hub.

The card is the Hub's README.md: YAML metadata (base_model, tags, library_name) that makes the
model findable, then what was forgotten and retained, the hyper-parameters, a validation image
grid and the measured metrics. Secrets never reach it: keys that look like tokens are dropped.
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, Mapping, Optional, Sequence

__all__ = ["SECRET_KEYS", "public_hparams", "sd_model_card", "push_folder_to_hub"]

SECRET_KEYS = ("hub_token", "token", "api_key", "password")
DEFAULT_TAGS = ("machine-unlearning", "munba", "diffusers", "stable-diffusion",
                "stable-diffusion-diffusers", "text-to-image")


def public_hparams(args: Mapping) -> Dict:
    """``args`` without secrets (anything named like a token), with paths and lists as strings."""
    out = {}
    for k, v in dict(args).items():
        if any(s in k.lower() for s in SECRET_KEYS):
            continue
        out[k] = v if isinstance(v, (int, float, bool, str)) or v is None else str(v)
    return out


def _table(rows: Mapping) -> str:
    lines = ["| name | value |", "|---|---|"]
    for k, v in rows.items():
        if isinstance(v, float):
            v = f"{v:.6g}"
        lines.append(f"| {k} | {str(v).replace('|', '/')} |")
    return "\n".join(lines)


def sd_model_card(*, base_model: str, forgotten: Sequence[str], retained: Sequence[str],
                  hparams: Mapping, metrics: Optional[Mapping] = None,
                  image_grid: Optional[str] = None, lora: bool = False,
                  extra_tags: Iterable[str] = (), repo_id: Optional[str] = None,
                  objective: Optional[str] = None):
    """A ``huggingface_hub.ModelCard`` for an unlearned Stable Diffusion model."""
    from huggingface_hub import ModelCard, ModelCardData

    tags = list(dict.fromkeys([*DEFAULT_TAGS, *(["lora"] if lora else []), *extra_tags]))
    # The Hub only accepts repo ids as base_model; a local path is named in the text instead.
    on_hub = not os.path.exists(base_model) and base_model.count("/") == 1
    data = ModelCardData(base_model=base_model if on_hub else None, library_name="diffusers",
                         tags=tags, license="creativeml-openrail-m", pipeline_tag="text-to-image")
    base_ref = f"[{base_model}](https://huggingface.co/{base_model})" if on_hub else f"`{base_model}`"
    usage = ("pipe = DiffusionPipeline.from_pretrained(BASE)\npipe.load_lora_weights(REPO)"
             if lora else "pipe = DiffusionPipeline.from_pretrained(REPO)")
    usage = usage.replace("BASE", repr(base_model)).replace("REPO", repr(repo_id or "<this repo>"))
    body = [
        "# Unlearned with MUNBa",
        "",
        f"This model is {base_ref} after machine unlearning with MUNBa (Machine Unlearning via "
        "Nash Bargaining, Wu & Harandi 2024), trained with `hf_munba`. Each optimizer step moves "
        "along the Nash bargaining direction of the forgetting and the retaining gradient.",
        "",
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
        body += ["## Metrics", "", _table(metrics), ""]
    body += ["## Training hyper-parameters", "", _table(public_hparams(hparams)), ""]
    body += ["## Limitations", "",
             "Unlearning suppresses a concept for the prompts and data it was trained on; it is "
             "not a proof that the concept cannot be recovered (e.g. by adversarial prompts or "
             "further fine-tuning). Evaluate before relying on it.", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


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
