"""Helpers shared by the generative-evaluation tests (not a test module)."""

import pytest
import torch


def save_tiny_lora(sd_dir, lora_dir):
    """A random (non-zero) UNet LoRA for the tiny pipeline, saved as the SD training script does."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    from hf_munba.diffusion.export import save_lora

    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir))
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    save_lora(lora_dir, unet=pipe.unet)
    return lora_dir


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models on a shared, busy CPU run ~100x faster on one thread than on spinning ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_same_image(a, b):
    """Two 8-bit images made from the same seed by different batchings.

    Each image has its own generator, so the noise is identical; but CPU convolution and matmul
    kernels block a batch of 3 differently from a batch of 1, which leaves ~1e-6 differences in
    the float outputs. Rounding to 8 bits turns a few of those into one level. Anything beyond
    that (another seed, another prompt) differs by tens of levels almost everywhere.
    """
    import numpy as np

    a, b = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
    assert a.shape == b.shape
    diff = np.abs(a - b)
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.01, (int(diff.max()), float((diff > 0).mean()))
