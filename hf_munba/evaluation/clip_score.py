"""CLIP score: 100 * max(cos(image embedding, prompt embedding), 0), averaged over images.

The same definition as ``torchmetrics.multimodal.CLIPScore``; the CLIP model is any local
``CLIPModel`` directory (the usual choice is openai/clip-vit-large-patch14). Prompts longer than
the text encoder's context are truncated, as every CLIP-score implementation must.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from ._images import batched, load_rgb

__all__ = ["clip_scores_from_embeddings", "load_clip", "clip_scores", "summarize_clip_scores"]


def clip_scores_from_embeddings(image_embeds: torch.Tensor, text_embeds: torch.Tensor
                                ) -> torch.Tensor:
    """Per-pair CLIP score for row-aligned image and text embeddings (any scale)."""
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"embeddings differ in shape: {tuple(image_embeds.shape)} vs "
                         f"{tuple(text_embeds.shape)}")
    cos = torch.nn.functional.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1)
    return 100.0 * cos.clamp(min=0)


def load_clip(path: str, device: str = "cpu"):
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(path).to(device).eval(), CLIPProcessor.from_pretrained(path)


@torch.no_grad()
def clip_scores(model, processor, paths: Sequence, prompts: Sequence[str],
                batch_size: int = 32) -> List[float]:
    """CLIP score of each image file against its own prompt."""
    if len(paths) != len(prompts):
        raise ValueError(f"{len(paths)} images for {len(prompts)} prompts")
    device = next(model.parameters()).device
    max_len = model.config.text_config.max_position_embeddings
    scores: List[float] = []
    for idx in batched(list(range(len(paths))), batch_size):
        inputs = processor(text=[prompts[i] for i in idx], images=load_rgb([paths[i] for i in idx]),
                           return_tensors="pt", padding=True, truncation=True,
                           max_length=max_len).to(device)
        out = model(**inputs)
        scores.extend(clip_scores_from_embeddings(out.image_embeds, out.text_embeds).tolist())
    return scores


def summarize_clip_scores(scores: Sequence[float]) -> Dict[str, float]:
    if not scores:
        raise ValueError("no CLIP scores to summarise")
    t = torch.tensor(list(scores), dtype=torch.float64)
    return {"clip_score": float(t.mean()), "clip_score_std": float(t.std()) if len(t) > 1 else 0.0,
            "images": len(t)}
