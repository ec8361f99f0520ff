"""Shared pieces of the SD library tests: one paired batch for the tiny pipeline."""

import torch


def paired_batch(pipe):
    """Two retain and two forget 16x16 images with their prompts, the anchor and the empty prompt,
    as ``SDUnlearner`` takes them when latents are not cached."""
    g = torch.Generator().manual_seed(0)
    px = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    ids = lambda t: pipe.tokenizer([t] * 2, padding="max_length", max_length=77,  # noqa: E731
                                   return_tensors="pt").input_ids
    return {"retain_pixel_values": px, "forget_pixel_values": px.flip(0),
            "retain_input_ids": ids("a person"), "forget_input_ids": ids("nudity"),
            "anchor_input_ids": ids("a photo of a person wearing clothes"),
            "uncond_input_ids": ids("")}
