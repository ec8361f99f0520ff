"""MunbaTrainer: every method, both model families, accumulation, precision, NaN, resume."""

import math

import pytest
import torch

from hf_munba import NashBargainer  # noqa: F401  (the trainer must use the shared core)
from hf_munba.testing import tiny_resnet_classifier, tiny_vit_classifier
from hf_munba.classification.trainer import MunbaArguments, MunbaTrainer, NonFiniteTrainingError
from hf_munba.classification.methods import available_methods
from trainer_helpers import params_vector, targs, tiny_classification_data


@pytest.mark.parametrize("method", available_methods("classification"))
def test_every_method_trains_resnet(tmp_path, method):
    """Every registered classifier method runs on a BatchNorm model and logs exactly its players.
    What defines each method (its exact update) is checked in test_method_behaviour.py."""
    forget, retain = tiny_classification_data()
    model = tiny_resnet_classifier(num_labels=4)
    before = params_vector(model)
    tr = MunbaTrainer(model=model, args=targs(tmp_path), train_dataset=retain, forget_dataset=forget,
                      method=method)
    tr.train()
    after = params_vector(tr.model)
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    if not getattr(tr.method, "trains", True):  # iu: one edit in setup, no optimizer step, no logs
        assert tr.state.global_step == 0 and tr.state.log_history == []
        return
    logs = tr.state.log_history[0]
    assert ("loss_retain" in logs) == tr.method.uses_retain
    assert ("loss_forget" in logs) == tr.method.uses_forget
    if tr.method.uses_retain:
        assert math.isfinite(logs["loss_retain"])
    if tr.method.uses_forget:
        assert math.isfinite(logs["loss_forget"])
    assert ("munba/cos" in logs) == tr.method.bargains
    if method in ("munba", "munba-paper"):
        assert {"munba/cos", "munba/weight_retain", "munba/weight_forget"} <= set(logs)
        assert logs["grad_norm"] == pytest.approx(math.sqrt(2), rel=1e-4)  # |d| = sqrt(2), then clipped


def test_registry_lists_all_methods():
    assert set(available_methods()) >= {"munba", "weighted", "ft", "ga", "rl", "salun", "l1", "retrain",
                                        "iu", "be", "bs", "shs"}


def test_salun_updates_only_the_salient_half(tmp_path):
    forget, retain = tiny_classification_data()
    model = tiny_vit_classifier(num_labels=4)
    before = params_vector(model)
    tr = MunbaTrainer(model=model, args=targs(tmp_path, max_steps=1), train_dataset=retain,
                      forget_dataset=forget, method="salun")
    tr.train()
    changed = (params_vector(tr.model) != before).float().mean().item()
    assert 0.3 < changed <= 0.5 + 1e-6


def test_munba_step_is_the_bargained_direction_with_accumulation(tmp_path):
    """GA=2 x batch 4 == one bargained step on the 8 samples: w - lr * d / |d| (clip 1.0)."""
    forget, retain = tiny_classification_data(n=64)
    model = tiny_vit_classifier(num_labels=4)
    w0 = [p.detach().clone() for p in model.parameters()]
    lr = 0.1
    args = targs(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=1,
                 learning_rate=lr)
    tr = MunbaTrainer(model=model, args=args, train_dataset=retain, forget_dataset=forget,
                      munba_args=MunbaArguments(forget_loss="neg_ce"))
    # the exact samples the trainer will use: first 8 of its retain order, first 8 of the forget stream
    retain_idx = list(iter(tr.get_train_dataloader().batch_sampler))
    tr.train()
    ref = tiny_vit_classifier(num_labels=4)
    stream = tr._new_forget_stream()
    stream.batch_size = 8
    f_idx = stream.next_indices()
    import torch.nn.functional as F
    r_rows = [retain[i] for b in retain_idx[:2] for i in b]
    xr = torch.stack([r["pixel_values"] for r in r_rows]); yr = torch.stack([r["labels"] for r in r_rows])
    xf = forget["pixel_values"][f_idx]; yf = forget["labels"][f_idx]
    params = list(ref.parameters())
    gr = torch.autograd.grad(F.cross_entropy(ref(pixel_values=xr).logits, yr), params)
    gf = torch.autograd.grad(-F.cross_entropy(ref(pixel_values=xf).logits, yf), params)
    nr = torch.sqrt(sum((g * g).sum() for g in gr)); nf = torch.sqrt(sum((g * g).sum() for g in gf))
    d = [a / nr + b / nf for a, b in zip(gr, gf)]
    dn = torch.sqrt(sum((x * x).sum() for x in d))
    assert dn.item() > 1.0
    for p, w, di in zip(tr.model.parameters(), w0, d):
        torch.testing.assert_close(p.detach(), w - lr * di / dn, atol=2e-5, rtol=1e-4)


def test_vit_bf16_autocast_cpu(tmp_path):
    forget, retain = tiny_classification_data()
    model = tiny_vit_classifier(num_labels=4)
    tr = MunbaTrainer(model=model, args=targs(tmp_path, bf16=True, eval_strategy="steps", eval_steps=2),
                      train_dataset=retain, forget_dataset=forget, eval_dataset=retain)
    tr.train()
    assert any(math.isfinite(h.get("eval_loss", float("nan"))) for h in tr.state.log_history)
    logs = tr.state.log_history[0]
    assert math.isfinite(logs["munba/cos"]) and logs["munba/weight_forget"] > 0
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in tr.model.parameters())


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    forget, retain = tiny_classification_data()
    forget.columns["pixel_values"][:] = float("nan")
    model = tiny_vit_classifier(num_labels=4)
    before = params_vector(model)
    tr = MunbaTrainer(model=model, args=targs(tmp_path, max_steps=3), train_dataset=retain,
                      forget_dataset=forget)
    tr.train()
    assert tr.num_nonfinite_steps == 3 and tr.bargainer.num_skipped == 3
    assert torch.equal(params_vector(tr.model), before)
    assert tr.state.log_history[0]["munba/nonfinite_steps_total"] >= 1
    tr = MunbaTrainer(model=model, args=targs(tmp_path, max_steps=5), train_dataset=retain,
                      forget_dataset=forget, munba_args=MunbaArguments(max_consecutive_skips=2),
                      method="weighted")
    with pytest.raises(NonFiniteTrainingError, match="2 consecutive"):
        tr.train()


def test_resume_from_checkpoint_is_bitwise_identical(tmp_path):
    forget, retain = tiny_classification_data()
    kw = dict(max_steps=6, save_strategy="steps", save_steps=3)
    full = MunbaTrainer(model=tiny_resnet_classifier(num_labels=4), args=targs(tmp_path / "a", **kw),
                        train_dataset=retain, forget_dataset=forget)
    full.train()
    part = MunbaTrainer(model=tiny_resnet_classifier(num_labels=4), args=targs(tmp_path / "b", **kw),
                        train_dataset=retain, forget_dataset=forget)
    part.train()
    import shutil
    shutil.rmtree(tmp_path / "b" / "out" / "checkpoint-6")
    resumed = MunbaTrainer(model=tiny_resnet_classifier(num_labels=4), args=targs(tmp_path / "b", **kw),
                           train_dataset=retain, forget_dataset=forget)
    resumed.train(resume_from_checkpoint="latest")
    assert torch.equal(params_vector(resumed.model), params_vector(full.model))
    ckpt = tmp_path / "a" / "out" / "checkpoint-3"
    assert (ckpt / "munba_state.json").exists() and not (ckpt / "training_args.bin").exists()


def test_bad_options_fail_before_training(tmp_path):
    forget, retain = tiny_classification_data()
    with pytest.raises(ValueError, match="unknown unlearning method"):
        MunbaArguments(method="nope")
    with pytest.raises(ValueError, match="unknown forget loss"):
        MunbaArguments(forget_loss="mse")
    with pytest.raises(ValueError, match="forget_weight"):
        MunbaArguments(forget_weight=0)
    with pytest.raises(ValueError, match="needs a forget_dataset"):
        MunbaTrainer(model=tiny_resnet_classifier(4), args=targs(tmp_path), train_dataset=retain)
    with pytest.raises(ValueError, match="fp16"):
        MunbaTrainer(model=tiny_resnet_classifier(4), args=targs(tmp_path, fp16=True),
                     train_dataset=retain, forget_dataset=forget)
