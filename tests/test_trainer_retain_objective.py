"""MunbaTrainer's distilled retain loss (``retain_objective='distill'``): KL from the original model."""

import pytest
import torch

from hf_munba.classification.objectives import distilled_kl
from hf_munba.classification.trainer import MunbaArguments, MunbaTrainer
from hf_munba.testing import tiny_resnet_classifier, tiny_vit_classifier
from trainer_helpers import params_vector, targs, tiny_classification_data


def test_distilled_kl_is_the_kl_from_the_original():
    g = torch.Generator().manual_seed(0)
    logits, original = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    p0 = original.softmax(-1)
    by_hand = (p0 * (p0.log() - logits.log_softmax(-1))).sum(-1).mean()
    assert distilled_kl(logits, original).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert distilled_kl(original, original).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="without gradient"):
        distilled_kl(logits, original.requires_grad_())


@pytest.mark.parametrize("factory", [tiny_resnet_classifier, tiny_vit_classifier])
def test_distill_starts_at_zero_and_keeps_the_original(tmp_path, factory):
    """Step 1: the retain loss is exactly 0 (batch-norm in the same mode for both models), so the
    bargained step is the forget player's alone; later the loss is the KL to the untouched copy."""
    forget, retain = tiny_classification_data()
    model = factory(num_labels=4)
    before = params_vector(model)
    tr = MunbaTrainer(model=model, args=targs(tmp_path, max_steps=3), train_dataset=retain,
                      forget_dataset=forget, munba_args=MunbaArguments(retain_objective="distill"))
    tr.train()
    logs = [h for h in tr.state.log_history if "loss_retain" in h]
    assert logs[0]["loss_retain"] == 0.0
    assert "munba/cos" not in logs[0]  # a zero retain gradient proposes nothing: forget steps alone
    assert logs[-1]["loss_retain"] > 0.0
    assert torch.equal(params_vector(tr._original), before)  # the copy never trains
    assert not torch.equal(params_vector(tr.model), before)
    assert not any(p.requires_grad for p in tr._original.parameters())
    # the loss is the KL from the copy's predictions on the same batch, in the same mode
    batch = {k: torch.stack([retain[i][k] for i in range(8)]) for k in ("pixel_values", "labels")}
    tr.model.train()
    with torch.no_grad():
        got = tr._retain_base_loss(tr.model, batch, batch["labels"])
        tr._original.train()
        want = distilled_kl(tr.model(pixel_values=batch["pixel_values"]).logits,
                            tr._original(pixel_values=batch["pixel_values"]).logits)
    assert got.item() == pytest.approx(want.item(), rel=1e-5) and got.item() > 0


def test_distill_with_peft_switches_the_adapters_off_instead_of_copying(tmp_path):
    peft = pytest.importorskip("peft")
    forget, retain = tiny_classification_data()
    model = peft.get_peft_model(tiny_vit_classifier(num_labels=4), peft.LoraConfig(
        r=4, target_modules=r".*\.(q_proj|v_proj|query|value)$", modules_to_save=["classifier"]))
    tr = MunbaTrainer(model=model, args=targs(tmp_path, max_steps=3, learning_rate=0.5),
                      train_dataset=retain, forget_dataset=forget,
                      munba_args=MunbaArguments(retain_objective="distill"))
    tr.train()
    assert tr._original is None
    logs = [h for h in tr.state.log_history if "loss_retain" in h]
    assert logs[0]["loss_retain"] == 0.0 and logs[-1]["loss_retain"] > 0.0
    x = torch.stack([retain[i]["pixel_values"] for i in range(4)])
    tr.model.eval()
    with torch.no_grad():
        on = tr.model(pixel_values=x).logits
        with tr.model.disable_adapter():
            off = tr.model(pixel_values=x).logits
    assert not torch.allclose(on, off)  # the adapters are on again after the distilled forwards


@pytest.mark.parametrize("method,why", [("ft", "only loss would be zero"), ("retrain", "only loss would be zero"),
                                        ("ga", "no retain loss")])
def test_distill_refused_without_both_players(method, why):
    with pytest.raises(ValueError, match=why):
        MunbaArguments(method=method, retain_objective="distill")


def test_unknown_retain_objective_is_one_error():
    with pytest.raises(ValueError, match="unknown retain_objective"):
        MunbaArguments(retain_objective="mse")
    assert MunbaArguments().retain_objective == "ce"


def test_distilled_kl_gradient_is_p_minus_p0_and_exactly_zero_at_the_original():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 5, generator=g, dtype=torch.float64).requires_grad_()
    original = torch.randn(6, 5, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: distilled_kl(x, original), (logits,))
    same = original.clone().float().requires_grad_()
    distilled_kl(same, original.float()).backward()
    assert torch.count_nonzero(same.grad) == 0
