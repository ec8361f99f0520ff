"""Gradient checkpointing changes memory, never the bargained step.

Each player's backward pass recomputes its own checkpointed forward, so with
``--gradient_checkpointing`` (SD) or ``activation_checkpointing=True`` (``gradient_checkpointing``
before transformers 5; MunbaTrainer) the two player gradients, the Gram matrix and the combined
``.grad`` must equal those without it. The forward
pre-hooks prove the checkpointing really ran (a checkpointed block runs again during backward).
"""

import dataclasses

import pytest
import torch
from transformers import TrainingArguments

from hf_munba import NashBargainer
from hf_munba.diffusion.params import (add_lora_adapter, enable_gradient_checkpointing, freeze_all_but,
                                select_parameter_names)
from hf_munba.diffusion.unlearner import SDUnlearner
from hf_munba.testing import tiny_sd_pipeline, tiny_vit_classifier
from hf_munba.classification.trainer import MunbaTrainer
from sd_helpers import paired_batch
from trainer_helpers import params_vector, targs, tiny_classification_data

torch.set_num_threads(1)


def _bargained_sd_step(component, lora, checkpointing):
    """One bargained step's combined gradient, stats and the number of block forwards."""
    pipe = tiny_sd_pipeline()
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    trained = pipe.unet if component == "unet" else pipe.text_encoder
    if lora:
        params = add_lora_adapter(trained, rank=2, subset="full", component=component)
        with torch.no_grad():  # B = 0 at init would make every LoRA-A gradient zero
            for n, p in trained.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(n)))
    else:
        subset = "noxattn" if component == "unet" else "full"
        params = freeze_all_but(trained, select_parameter_names(trained, subset, component))
    if checkpointing:
        enable_gradient_checkpointing(trained)  # what --gradient_checkpointing calls
    trained.train()
    inside = "down_blocks.0.attentions.0.transformer_blocks.0" if component == "unet" else "encoder.layers.0.mlp"
    # by name suffix: transformers 5.0 nests CLIPTextModel's layers under .text_model, later releases do not
    block = next(m for n, m in trained.named_modules() if n == inside or n.endswith("." + inside))
    calls = []
    # a module inside the checkpointed region, and a pre-hook: recomputation stops early,
    # before a forward hook would fire
    block.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))

    unlearner = SDUnlearner(pipe.unet, pipe.text_encoder, pipe.vae, pipe.scheduler,
                            train_component=component, lora=lora,
                            forget_objective="esd" if component == "text_encoder" else "remap",
                            target_model="frozen" if lora else "current")
    bargainer = NashBargainer(params)
    batch = paired_batch(pipe)
    torch.manual_seed(7)
    with bargainer.player(0):
        unlearner.retain_loss(batch).backward()
    with bargainer.player(1):
        unlearner.forget_loss(batch).backward()
    stats = bargainer.combine()
    return [p.grad.clone() for p in params], stats, sum(calls)


@pytest.mark.parametrize("component,lora", [("unet", False), ("unet", True),
                                            ("text_encoder", False), ("text_encoder", True)])
def test_sd_bargained_gradient_is_unchanged_by_checkpointing(component, lora):
    plain, plain_stats, plain_calls = _bargained_sd_step(component, lora, checkpointing=False)
    ckpt, ckpt_stats, ckpt_calls = _bargained_sd_step(component, lora, checkpointing=True)
    assert ckpt_calls > plain_calls, "the checkpointed block was not recomputed in backward"
    assert plain_stats.status.value == ckpt_stats.status.value == "ok"
    assert all(n > 0 for n in plain_stats.norms)
    torch.testing.assert_close(torch.tensor(ckpt_stats.gram), torch.tensor(plain_stats.gram),
                               rtol=1e-5, atol=0)
    for a, b in zip(ckpt, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_munba_trainer_step_is_unchanged_by_checkpointing(tmp_path):
    # transformers 5 renamed the argument (the old name warns until v6)
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    flag = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    forget, retain = tiny_classification_data()
    after = {}
    for checkpointing in (False, True):
        model = tiny_vit_classifier(num_labels=4)
        calls = []
        # the first block's MLP inside layer 0 (vit.layers.0.mlp; transformers 5.0 names it
        # vit.encoder.layer.0.intermediate)
        inner = next(m for n, m in model.named_modules()
                     if n in ("vit.layers.0.mlp", "vit.encoder.layer.0.intermediate"))
        inner.register_forward_pre_hook(lambda *_: calls.append(1))
        tr = MunbaTrainer(model=model, args=targs(tmp_path / str(checkpointing), max_steps=2,
                                                  **{flag: checkpointing}),
                          train_dataset=retain, forget_dataset=forget, method="munba")
        tr.train()
        after[checkpointing] = (params_vector(tr.model), len(calls), tr.state.log_history[0])
    (w_plain, n_plain, log_plain), (w_ckpt, n_ckpt, log_ckpt) = after[False], after[True]
    assert n_ckpt > n_plain
    assert log_ckpt["munba/cos"] == pytest.approx(log_plain["munba/cos"], rel=1e-5, abs=1e-7)
    torch.testing.assert_close(w_ckpt, w_plain, rtol=1e-5, atol=1e-6)
