"""Evaluation images from a prompt set: a pipeline (optionally + LoRA) -> an imagefolder.

Unlike :func:`hf_munba.diffusion.generation.generate_images` (one seed range and one guidance scale for the
whole job, the shape of unlearning data), evaluation sets such as I2P fix a seed and a guidance
scale per prompt. Here the seeds come from :func:`~hf_munba.evaluation.prompts.load_prompt_set`
and are written into the manifest; the folder layout and the manifest keys (``file_name``,
``text``, ``seed``, ``guidance_scale``, ``num_inference_steps``, ``height``, ``width``,
``prompt_index``) are the same, plus ``image_index``, ``case_number``, ``categories``, ``label``.

Promises: one CPU ``torch.Generator`` per image, so an image does not depend on the batch size
(up to float rounding in batched kernels: at most one 8-bit level);
a killed run resumes (finished images are skipped, images and manifest are written atomically);
a folder made with other prompts or settings is refused rather than mixed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..diffusion.generation import generate_from_plan
from .prompts import PromptRecord

__all__ = ["load_pipeline", "evaluation_plan", "generate_evaluation_images"]


def load_pipeline(model_dir: str, lora_dir: Optional[str] = None, device: str = "cpu",
                  torch_dtype: Optional[torch.dtype] = None):
    """Load a saved pipeline for evaluation, with the safety checker off and LoRA applied.

    The safety checker would black out exactly the images the nudity metric has to count, so
    it is removed. A LoRA directory that loads no adapter is an error: evaluating the base model
    under the unlearned model's name is the mistake this refuses to make.
    """
    from diffusers import DiffusionPipeline

    model_dir = str(model_dir)
    if not (Path(model_dir) / "model_index.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a saved diffusers pipeline "
                                "(no model_index.json)")
    kwargs = {}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    components = json.loads((Path(model_dir) / "model_index.json").read_text(encoding="utf-8"))
    if "safety_checker" in components:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = DiffusionPipeline.from_pretrained(model_dir, **kwargs)
    if lora_dir is not None:
        if not Path(lora_dir).exists():
            raise FileNotFoundError(f"LoRA directory {lora_dir} does not exist")
        pipe.load_lora_weights(str(lora_dir), adapter_name="unlearned")
        adapters = pipe.get_list_adapters()
        if not any("unlearned" in names for names in adapters.values()):
            raise RuntimeError(f"no LoRA adapter was loaded from {lora_dir}; refusing to "
                               "evaluate the base model in its place")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def evaluation_plan(records: Sequence[PromptRecord], *, guidance_scale: float = 7.5,
                    num_inference_steps: int = 50, height: Optional[int] = None,
                    width: Optional[int] = None) -> List[Dict]:
    """Manifest lines for ``records`` (a record's own guidance scale wins over the default)."""
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if not records:
        raise ValueError("no prompts to generate")
    plan, names = [], set()
    for r in records:
        name = f"{r.prompt_index:04d}_{r.image_index:05d}.png"
        if name in names:
            raise ValueError(f"duplicate image {name}: prompt/image indices must be unique")
        names.add(name)
        plan.append({
            "file_name": name, "text": r.prompt, "seed": int(r.seed),
            "guidance_scale": float(r.guidance_scale if r.guidance_scale is not None
                                    else guidance_scale),
            "num_inference_steps": int(num_inference_steps), "height": height, "width": width,
            "prompt_index": r.prompt_index, "image_index": r.image_index,
            "case_number": r.case_number, "categories": r.categories, "label": r.label,
        })
    return plan


@torch.no_grad()
def generate_evaluation_images(pipe, records: Sequence[PromptRecord], output_dir, *,
                               batch_size: int = 4, guidance_scale: float = 7.5,
                               num_inference_steps: int = 50, height: Optional[int] = None,
                               width: Optional[int] = None, progress: bool = False,
                               **pipe_kwargs) -> List[Dict]:
    """Generate every record's image into ``output_dir`` (resumable); return the manifest."""
    plan = evaluation_plan(records, guidance_scale=guidance_scale,
                           num_inference_steps=num_inference_steps, height=height, width=width)
    return generate_from_plan(pipe, plan, output_dir, batch_size=batch_size, progress=progress,
                              **pipe_kwargs)
