"""A skipped optimizer step (non-finite gradients) leaves weights, optimizer state and the
learning-rate schedule exactly as they were: MunbaTrainer never calls the optimizer on it."""

import copy

import pytest
import torch
from transformers import TrainerCallback

from hf_munba.testing import tiny_resnet_classifier
from hf_munba.classification.trainer import MunbaTrainer
from trainer_helpers import params_vector, targs, tiny_classification_data

BAD = 3  # the third optimizer step sees a NaN forget batch


def _state_equal(a, b):
    """Optimizer / scheduler state dicts equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("method", ["munba", "weighted"])
@pytest.mark.parametrize("optim, optim_args", [("sgd", "momentum=0.9"), ("adamw_torch", None)])
def test_skipped_step_leaves_weights_optimizer_and_schedule_untouched(tmp_path, method, optim, optim_args):
    forget, retain = tiny_classification_data()
    clean = forget.columns["pixel_values"].clone()
    snaps = {}

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            bad = state.global_step == BAD - 1  # the step about to run is number BAD
            forget.columns["pixel_values"] = clean * float("nan") if bad else clean

        def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
            snaps[state.global_step] = (params_vector(model), copy.deepcopy(optimizer.state_dict()),
                                        copy.deepcopy(lr_scheduler.state_dict()))

    args = targs(tmp_path, max_steps=BAD + 2, optim=optim, optim_args=optim_args, weight_decay=0.01,
                 lr_scheduler_type="linear", learning_rate=0.05)
    tr = MunbaTrainer(model=tiny_resnet_classifier(num_labels=4), args=args, train_dataset=retain,
                      forget_dataset=forget, method=method, callbacks=[Probe()])
    tr.train()
    assert tr.num_nonfinite_steps == 1
    before, after = snaps[BAD - 1], snaps[BAD]
    assert not torch.equal(snaps[BAD - 2][0], before[0])  # a real step moves the weights
    assert torch.equal(before[0], after[0]), "a skipped step changed the weights"
    assert before[1]["state"] and _state_equal(before[1], after[1]), "a skipped step changed the optimizer state"
    assert _state_equal(before[2], after[2]), "a skipped step advanced the learning-rate schedule"
    assert not torch.equal(after[0], snaps[BAD + 1][0])  # training goes on after the skip
    # the schedule counts the updates really made: one fewer than the Trainer's steps
    assert tr.lr_scheduler.state_dict()["last_epoch"] == BAD + 2 - 1


def _with_cpu_grad_scaler(trainer):
    """What fp16 on a GPU gives the Trainer (accelerate's GradScaler), on CPU: the scaler scales
    the losses, unscales and checks the gradients, and wraps ``optimizer.step()``."""
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    return trainer.accelerator.scaler


def test_skipped_step_under_a_grad_scaler_does_not_step_the_optimizer(tmp_path):
    """Opposed players (the forget loss is exactly minus the retain loss on the same full batch:
    cos = -1) with ``fallback_player=None``: every step is skipped with *finite* gradients.
    A GradScaler finds nothing to skip in them, so an ``optimizer.step()`` would let AdamW's
    weight decay and moments move the weights; none may run, and the scale stays."""
    from hf_munba.classification.data import InMemoryDataset
    from hf_munba.classification.trainer import MunbaArguments

    _, retain = tiny_classification_data(n=32)
    data = InMemoryDataset({k: v[:8] for k, v in retain.columns.items()})
    model = tiny_resnet_classifier(num_labels=4)
    before = params_vector(model)
    args = targs(tmp_path, max_steps=3, per_device_train_batch_size=8, optim="adamw_torch",
                 weight_decay=0.1, lr_scheduler_type="linear")
    tr = MunbaTrainer(model=model, args=args, train_dataset=data, forget_dataset=data,
                      munba_args=MunbaArguments(forget_loss="neg_ce", fallback_player=None,
                                                max_consecutive_skips=100))
    scaler = _with_cpu_grad_scaler(tr)
    tr.train()
    assert tr.bargainer.num_skipped == 3 and tr.num_nonfinite_steps == 3
    assert torch.equal(params_vector(tr.model), before)
    assert not tr.optimizer.state_dict()["state"], "the optimizer was stepped"
    assert tr.lr_scheduler.state_dict()["last_epoch"] == 0
    assert scaler.get_scale() == 2.0 ** 8  # finite gradients: no overflow to back off from


def test_nonfinite_step_under_a_grad_scaler_backs_off_its_scale(tmp_path):
    forget, retain = tiny_classification_data()
    forget.columns["pixel_values"][:] = float("nan")
    model = tiny_resnet_classifier(num_labels=4)
    before = params_vector(model)
    tr = MunbaTrainer(model=model, args=targs(tmp_path, max_steps=2, optim="adamw_torch"),
                      train_dataset=retain, forget_dataset=forget)
    scaler = _with_cpu_grad_scaler(tr)
    tr.train()
    assert tr.num_nonfinite_steps == 2 and torch.equal(params_vector(tr.model), before)
    assert not tr.optimizer.state_dict()["state"]
    assert scaler.get_scale() == 2.0 ** 8 * scaler.get_backoff_factor() ** 2
