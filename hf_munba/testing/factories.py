"""Deterministic tiny models built from configs in code, for tests, the quickstart and benchmarks.

Nothing here downloads anything: the CLIP tokenizer is written on the fly from the 256
byte-level characters (a valid byte-level BPE with no merges), so every prompt tokenizes to one
token per character. Models are randomly initialised under a fixed seed.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch

__all__ = [
    "CLASSIFIER_SOURCES",
    "tiny_clip_tokenizer",
    "tiny_clip_text_model",
    "tiny_unet",
    "tiny_vae",
    "tiny_sd_pipeline",
    "save_tiny_sd_pipeline",
    "tiny_clip_model",
    "tiny_clip_processor",
    "tiny_vit_classifier",
    "tiny_resnet_classifier",
]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_level_vocab() -> dict:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}


def tiny_clip_tokenizer(model_max_length: int = 77, save_dir: Optional[str] = None):
    """A CLIPTokenizer with a byte-level vocabulary (514 tokens) and no merges."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(save_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(_byte_level_vocab()), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=model_max_length)
    if len(tok) < 500:
        raise RuntimeError(f"tiny tokenizer has only {len(tok)} tokens; vocab was not read")
    return tok


def _text_config(tokenizer, hidden_size=32, layers=2, heads=2, projection_dim=32,
                 initializer_factor=5.0):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_factor=initializer_factor,
    )


def tiny_clip_text_model(tokenizer=None, seed: int = 0, hidden_size: int = 32,
                         initializer_factor: float = 5.0):
    """A 2-layer CLIPTextModel; ``initializer_factor`` > 1 so random prompts stay distinguishable."""
    from transformers import CLIPTextModel

    tokenizer = tokenizer or tiny_clip_tokenizer()
    torch.manual_seed(seed)
    return CLIPTextModel(_text_config(tokenizer, hidden_size=hidden_size,
                                      initializer_factor=initializer_factor)).eval()


def tiny_unet(seed: int = 0, cross_attention_dim: int = 32, sample_size: int = 8,
              block_out_channels: Sequence[int] = (32, 32)):
    """A two-block UNet2DConditionModel with cross-attention (attn2) and self-attention (attn1)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,  # the number of heads, for legacy reasons
        norm_num_groups=8,
    )


def tiny_vae(seed: int = 0):
    """A two-block AutoencoderKL with 4 latent channels and a down-sampling factor of 2."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=16,
    )


def tiny_sd_pipeline(seed: int = 0, scheduler: str = "ddim"):
    """A complete, randomly initialised StableDiffusionPipeline that runs at 16x16 pixels.

    The safety checker is left out (``requires_safety_checker=False``): there is nothing to check
    in random weights, and the checker would need a CLIP vision model downloaded from a hub.
    """
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

    tokenizer = tiny_clip_tokenizer()
    sched_cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[scheduler]
    kwargs = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  num_train_timesteps=1000, clip_sample=False)
    if scheduler == "ddim":
        kwargs["steps_offset"] = 1
    sched = sched_cls(**kwargs)
    return StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_clip_text_model(tokenizer, seed),
        tokenizer=tokenizer,
        unet=tiny_unet(seed),
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_sd_pipeline(path: str | os.PathLike, seed: int = 0) -> str:
    """Write :func:`tiny_sd_pipeline` with ``save_pretrained`` (safetensors) and return the path."""
    pipe = tiny_sd_pipeline(seed)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def tiny_clip_model(seed: int = 0, image_size: int = 32, patch_size: int = 8):
    """A CLIPModel with 2-layer, width-32 text and vision towers."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    tokenizer = tiny_clip_tokenizer()
    text = _text_config(tokenizer, initializer_factor=1.0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=image_size,
                              patch_size=patch_size, projection_dim=32)
    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32)
    return CLIPModel(cfg).eval()


def tiny_clip_processor(image_size: int = 32):
    """A CLIPProcessor (the tiny tokenizer + an image processor resizing to ``image_size``)."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    return CLIPProcessor(image_processor=image_processor, tokenizer=tiny_clip_tokenizer())


def _labels(num_labels: int, label_names: Optional[Sequence[str]]):
    names = list(label_names) if label_names else [str(i) for i in range(num_labels)]
    return {i: n for i, n in enumerate(names)}, {n: i for i, n in enumerate(names)}


def tiny_vit_classifier(num_labels: int = 10, image_size: int = 8, num_channels: int = 1,
                        seed: int = 0, label_names: Optional[Sequence[str]] = None):
    """A 2-layer ViTForImageClassification (patch 2) sized for 8x8 digits."""
    from transformers import ViTConfig, ViTForImageClassification

    id2label, label2id = _labels(num_labels, label_names)
    cfg = ViTConfig(image_size=image_size, patch_size=2, num_channels=num_channels,
                    hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=num_labels, id2label=id2label,
                    label2id=label2id)
    torch.manual_seed(seed)
    return ViTForImageClassification(cfg)


def tiny_resnet_classifier(num_labels: int = 10, num_channels: int = 1, seed: int = 0,
                           label_names: Optional[Sequence[str]] = None):
    """A two-stage ResNetForImageClassification (widths 16/32)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    id2label, label2id = _labels(num_labels, label_names)
    cfg = ResNetConfig(num_channels=num_channels, embedding_size=16, hidden_sizes=[16, 32],
                       depths=[1, 1], layer_type="basic", num_labels=num_labels,
                       id2label=id2label, label2id=label2id, downsample_in_first_stage=False)
    torch.manual_seed(seed)
    return ResNetForImageClassification(cfg)


#: ``--model_name_or_path tiny-resnet`` / ``tiny-vit`` in the classifier CLIs: random tiny models
#: for an offline try-out and the tests, handed to ``load_image_classifier(model_sources=...)``
#: (the library itself never imports this package).
CLASSIFIER_SOURCES = {"tiny-resnet": tiny_resnet_classifier, "tiny-vit": tiny_vit_classifier}
