"""The tiny offline models are deterministic and round-trip through save/from_pretrained."""

import numpy as np
import pytest
import torch

from hf_munba import testing


def test_tokenizer_is_byte_level_and_pads_to_77():
    tok = testing.tiny_clip_tokenizer()
    assert len(tok) == 514 and tok.model_max_length == 77
    ids = tok("a cat", padding="max_length", truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id
    assert tok("a cat").input_ids != tok("a dog").input_ids


def test_text_encoder_separates_prompts():
    tok = testing.tiny_clip_tokenizer()
    enc = testing.tiny_clip_text_model(tok)
    ids = tok(["nudity", "a person wearing clothes"], padding="max_length",
              return_tensors="pt").input_ids
    with torch.no_grad():
        e = enc(ids)[0]
    assert ((e[0] - e[1]).norm() / e[0].norm()) > 0.2


def test_sd_pipeline_round_trip_and_determinism(tmp_path):
    from diffusers import DiffusionPipeline

    pipe = testing.tiny_sd_pipeline(seed=3)

    def sample(p):
        g = torch.Generator().manual_seed(0)
        return p("a photo", num_inference_steps=2, height=16, width=16, generator=g,
                 output_type="np").images

    out = sample(pipe)
    assert out.shape == (1, 16, 16, 3)
    testing.save_tiny_sd_pipeline(tmp_path / "pipe", seed=3)
    assert list((tmp_path / "pipe" / "unet").glob("*.safetensors"))
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert np.array_equal(out, sample(reloaded))
    assert not np.array_equal(out, sample(testing.tiny_sd_pipeline(seed=4)))


@pytest.mark.parametrize("factory", [testing.tiny_vit_classifier, testing.tiny_resnet_classifier])
def test_classifiers_round_trip(factory, tmp_path):
    from transformers import AutoModelForImageClassification

    model = factory(num_labels=10, label_names=[f"d{i}" for i in range(10)]).eval()
    x = torch.randn(2, 1, 8, 8)
    model.save_pretrained(tmp_path)
    again = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, again(pixel_values=x).logits)
    assert again.config.id2label[3] == "d3"


def test_clip_model_and_processor(tmp_path):
    from PIL import Image
    from transformers import CLIPModel

    model, proc = testing.tiny_clip_model(), testing.tiny_clip_processor()
    image = Image.fromarray(np.full((40, 40, 3), 128, np.uint8))
    inputs = proc(text=["a cat", "a dog"], images=[image], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    assert logits.shape == (1, 2)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        again = CLIPModel.from_pretrained(tmp_path)(**inputs).logits_per_image
    assert torch.allclose(logits, again, atol=1e-5)
