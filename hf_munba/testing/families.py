"""Tiny, randomly initialised pipelines of every model family, built offline from configs.

The same recipe as :func:`hf_munba.testing.factories.tiny_sd_pipeline` (DESIGN.md §7, §9): a few
layers of width 32 or less, byte-level CLIP tokenizers written on the fly, and a T5 tokenizer
made with ``tokenizers`` (a character Unigram model; no sentencepiece, no download). Every
pipeline saves with ``save_pretrained`` and reloads with ``DiffusionPipeline.from_pretrained``,
so tests can point the SD script at a real folder of each family. The test-only package: the
library never imports it.
"""

from __future__ import annotations

import os
from typing import Callable, Dict

import torch

from .factories import _text_config, tiny_clip_text_model, tiny_clip_tokenizer, tiny_sd_pipeline, tiny_vae

__all__ = ["tiny_t5_tokenizer", "tiny_t5_encoder", "tiny_sd2_pipeline", "tiny_sdxl_pipeline",
           "tiny_sd3_pipeline", "tiny_flux_pipeline", "TINY_FAMILY_PIPELINES",
           "save_tiny_family_pipeline"]

_T5_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"-_()/"


def tiny_t5_tokenizer(model_max_length: int = 64):
    """A ``T5TokenizerFast`` over single characters (a ``tokenizers`` Unigram model).

    ids: 0 <pad>, 1 </s>, 2 <unk>, then one piece per character; the post-processor appends
    </s> as T5's does, so ``encode_prompt`` of SD 3 / Flux sees what a real T5 tokenizer gives.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" if c == " " else c, -1.0) for c in _T5_CHARS]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                           unk_token="<unk>", model_max_length=model_max_length, extra_ids=0)


def tiny_t5_encoder(tokenizer=None, seed: int = 0, d_model: int = 32):
    """A 2-layer ``T5EncoderModel`` of width ``d_model``."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = tokenizer or tiny_t5_tokenizer()
    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
        num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, initializer_factor=5.0, dropout_rate=0.0))


def _clip_with_projection(tokenizer, seed: int, hidden_size: int = 32, projection_dim: int = 32):
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(_text_config(tokenizer, hidden_size=hidden_size,
                                                    projection_dim=projection_dim))


def tiny_sd2_pipeline(seed: int = 0):
    """SD 2.x in miniature: the SD 1.x pipeline with a v-prediction scheduler."""
    from diffusers import DDIMScheduler

    pipe = tiny_sd_pipeline(seed)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config,
                                               prediction_type="v_prediction")
    return pipe


def tiny_sdxl_pipeline(seed: int = 0):
    """SDXL in miniature: two CLIP text encoders (the second with a projection, pooled), a UNet
    with the text/time ``add_embedding`` and cross-attention of width 32 + 32."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tok, tok2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
        attention_head_dim=2, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, transformer_layers_per_block=1)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", num_train_timesteps=1000,
                                   steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed), text_encoder=tiny_clip_text_model(tok, seed), tokenizer=tok,
        text_encoder_2=_clip_with_projection(tok2, seed + 1), tokenizer_2=tok2, unet=unet,
        scheduler=sched, force_zeros_for_empty_prompt=True)


def _tiny_flow_vae(seed: int):
    vae = tiny_vae(seed)
    vae.register_to_config(scaling_factor=1.5, shift_factor=0.1)  # both used, as in SD 3 / Flux
    return vae


def tiny_sd3_pipeline(seed: int = 0):
    """SD 3 in miniature: CLIP-L, CLIP-G (both pooled) and T5, a joint-attention transformer."""
    from diffusers import (FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)

    tok, tok2, tok3 = tiny_clip_tokenizer(), tiny_clip_tokenizer(), tiny_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
        caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_flow_vae(seed), text_encoder=_clip_with_projection(tok, seed), tokenizer=tok,
        text_encoder_2=_clip_with_projection(tok2, seed + 1), tokenizer_2=tok2,
        text_encoder_3=tiny_t5_encoder(tok3, seed + 2), tokenizer_3=tok3)


def tiny_flux_pipeline(seed: int = 0):
    """Flux in miniature: CLIP (pooled) + T5, a double/single-stream transformer on packed 2x2
    latents with a guidance embedding (as Flux dev)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok, tok2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    return FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_flow_vae(seed), text_encoder=tiny_clip_text_model(tok, seed), tokenizer=tok,
        text_encoder_2=tiny_t5_encoder(tok2, seed + 1), tokenizer_2=tok2)


TINY_FAMILY_PIPELINES: Dict[str, Callable] = {
    "sd": tiny_sd_pipeline, "sd2": tiny_sd2_pipeline, "sdxl": tiny_sdxl_pipeline,
    "sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}


def save_tiny_family_pipeline(family: str, path: str | os.PathLike, seed: int = 0) -> str:
    """Write the tiny pipeline of ``family`` with ``save_pretrained`` and return the path."""
    pipe = TINY_FAMILY_PIPELINES[family](seed)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return str(path)
