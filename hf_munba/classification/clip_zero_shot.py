"""CLIP as an image classifier: logits = scale * cos(image embedding, class-prompt embeddings).

This is how the paper unlearns with CLIP (prompts "A photo of a {c}, a type of pet", logits
100 * cos): the classifier has no head, so forgetting a class means moving either the image
encoder or the text encoder. Only the chosen encoder's attention projections (q, k, v, out)
are trained, as in the paper. The wrapper takes ``pixel_values`` (and ignores ``labels``), so
it drops into :class:`~hf_munba.classification.trainer.MunbaTrainer` and the classification evaluation like any
``AutoModelForImageClassification``.
"""

from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

import torch
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

__all__ = ["CLIPZeroShotClassifier", "DEFAULT_TEMPLATE", "ZERO_SHOT_CONFIG_NAME"]

DEFAULT_TEMPLATE = "A photo of a {}, a type of pet."
ZERO_SHOT_CONFIG_NAME = "zero_shot_config.json"
_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")


class CLIPZeroShotClassifier(nn.Module):
    """Zero-shot CLIP classifier over ``class_names``; trains ``train_encoder``'s attention."""

    def __init__(self, clip_model, tokenizer=None, class_names: Sequence[str] = (),
                 template: str = DEFAULT_TEMPLATE, train_encoder: str = "image",
                 logit_scale: Optional[float] = 100.0, prompt_ids: Optional[List[List[int]]] = None):
        super().__init__()
        if train_encoder not in ("image", "text"):
            raise ValueError(f"train_encoder must be 'image' or 'text', got {train_encoder!r}")
        if "{}" not in template:
            raise ValueError(f"template must contain '{{}}' for the class name, got {template!r}")
        if len(class_names) < 2:
            raise ValueError("a zero-shot classifier needs at least two class names")
        self.clip = clip_model
        self.class_names = list(class_names)
        self.template = template
        self.train_encoder = train_encoder
        self.logit_scale = logit_scale
        self.config = clip_model.config
        if prompt_ids is None:
            if tokenizer is None:
                raise ValueError("give a tokenizer (or pre-tokenised prompt_ids)")
            enc = tokenizer([template.format(c) for c in self.class_names], padding="max_length",
                            truncation=True, max_length=min(77, tokenizer.model_max_length))
            prompt_ids = [list(map(int, ids)) for ids in enc["input_ids"]]
            masks = [list(map(int, m)) for m in enc["attention_mask"]]
        else:
            masks = [[1] * len(p) for p in prompt_ids]
        self.register_buffer("prompt_ids", torch.tensor(prompt_ids, dtype=torch.long), persistent=False)
        self.register_buffer("prompt_mask", torch.tensor(masks, dtype=torch.long), persistent=False)
        self._prompt_masks = masks
        self.set_trainable(train_encoder)

    def set_trainable(self, train_encoder: str) -> None:
        tower = self.clip.vision_model if train_encoder == "image" else self.clip.text_model
        for p in self.clip.parameters():
            p.requires_grad_(False)
        for name, module in tower.named_modules():
            if name.split(".")[-1] in _ATTENTION:
                for p in module.parameters():
                    p.requires_grad_(True)

    def _features(self, fn, **kw) -> torch.Tensor:
        out = fn(**kw)
        emb = out.pooler_output if hasattr(out, "pooler_output") else out
        return emb / emb.norm(dim=-1, keepdim=True)

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None, **_):
        img = self._features(self.clip.get_image_features, pixel_values=pixel_values)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_encoder == "text"):
            txt = self._features(self.clip.get_text_features, input_ids=self.prompt_ids,
                                 attention_mask=self.prompt_mask)
        scale = self.logit_scale if self.logit_scale is not None else self.clip.logit_scale.exp()
        logits = scale * img @ txt.to(img.dtype).T
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)

    def reinitialise_(self, seed: int) -> None:
        torch.manual_seed(seed)
        fresh = type(self.clip)(self.clip.config)
        self.clip.load_state_dict(fresh.state_dict())

    # ------------------------------------------------------------ save/load
    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        os.makedirs(save_directory, exist_ok=True)
        self.clip.save_pretrained(save_directory, **kwargs)
        cfg = {"class_names": self.class_names, "template": self.template,
               "train_encoder": self.train_encoder, "logit_scale": self.logit_scale,
               "prompt_ids": self.prompt_ids.tolist(), "prompt_mask": self._prompt_masks}
        with open(os.path.join(save_directory, ZERO_SHOT_CONFIG_NAME), "w") as f:
            json.dump(cfg, f, indent=2)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "CLIPZeroShotClassifier":
        from transformers import CLIPModel

        cfg_path = os.path.join(path, ZERO_SHOT_CONFIG_NAME)
        if not os.path.isfile(cfg_path):
            raise ValueError(f"{path} has no {ZERO_SHOT_CONFIG_NAME}: not a saved CLIPZeroShotClassifier")
        with open(cfg_path) as f:
            cfg = json.load(f)
        clip = CLIPModel.from_pretrained(path, use_safetensors=True, **kwargs)
        model = cls(clip, class_names=cfg["class_names"], template=cfg["template"],
                    train_encoder=cfg["train_encoder"], logit_scale=cfg["logit_scale"],
                    prompt_ids=cfg["prompt_ids"])
        mask = torch.tensor(cfg["prompt_mask"], dtype=torch.long)
        model.prompt_mask.copy_(mask)
        model._prompt_masks = cfg["prompt_mask"]
        return model
