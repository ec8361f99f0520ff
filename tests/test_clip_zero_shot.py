"""CLIP as a zero-shot classifier under MunbaTrainer: image or text attention is what moves."""

import torch

from hf_munba.classification.data import InMemoryDataset
from hf_munba.classification.clip_zero_shot import CLIPZeroShotClassifier
from hf_munba.testing import tiny_clip_model, tiny_clip_tokenizer
from hf_munba.classification.trainer import MunbaTrainer
from trainer_helpers import targs

torch.set_num_threads(1)
NAMES = ["cat", "dog", "bird"]


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, 32, 32, generator=g)
    y = torch.arange(24) % 3
    f = y == 0
    return (InMemoryDataset({"pixel_values": x[f], "labels": y[f]}),
            InMemoryDataset({"pixel_values": x[~f], "labels": y[~f]}))


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_prompts_and_logits():
    model = CLIPZeroShotClassifier(tiny_clip_model(), tiny_clip_tokenizer(), NAMES)
    assert model.prompt_ids.shape[0] == 3
    out = model(pixel_values=torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, 3) and out.logits.abs().max() <= 100.0 + 1e-3


def test_image_encoder_attention_trains_and_round_trips(tmp_path):
    forget, retain = _data()
    model = CLIPZeroShotClassifier(tiny_clip_model(), tiny_clip_tokenizer(), NAMES, train_encoder="image")
    before = _snapshot(model)
    tr = MunbaTrainer(model=model, args=targs(tmp_path, per_device_train_batch_size=4),
                      train_dataset=retain, forget_dataset=forget)
    tr.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("vision_model" in n and n.rsplit(".", 2)[-2] in
                           ("q_proj", "k_proj", "v_proj", "out_proj") for n in changed)
    model.save_pretrained(tmp_path / "saved")
    loaded = CLIPZeroShotClassifier.from_pretrained(str(tmp_path / "saved"))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(pixel_values=x).logits, model.eval()(pixel_values=x).logits)


def test_text_encoder_attention_trains(tmp_path):
    forget, retain = _data()
    model = CLIPZeroShotClassifier(tiny_clip_model(), tiny_clip_tokenizer(), NAMES, train_encoder="text")
    before = _snapshot(model)
    tr = MunbaTrainer(model=model, args=targs(tmp_path, per_device_train_batch_size=4),
                      train_dataset=retain, forget_dataset=forget)
    tr.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("text_model" in n for n in changed)
    assert "munba/cos" in tr.state.log_history[0]
