"""MunbaTrainer with bargaining powers and the satisfied forget player."""

import json
import shutil

import pytest
import torch

from hf_munba.testing import tiny_resnet_classifier
from hf_munba.classification.trainer import MunbaArguments, MunbaTrainer
from trainer_helpers import params_vector, targs, tiny_classification_data

# satisfied from the second step on: 10x the mean of the first two losses, no smoothing
FROM_STEP_2 = dict(forget_target=10.0, forget_target_mode="relative",
                   forget_target_reference_steps=2, forget_target_ema=0.0,
                   satisfied_power_forget=0.0)  # it leaves (the default power is 0.1)


def _trainer(tmp_path, munba_args=None, **kw):
    forget, retain = tiny_classification_data()
    return MunbaTrainer(model=tiny_resnet_classifier(num_labels=4), args=targs(tmp_path, **kw),
                        train_dataset=retain, forget_dataset=forget, munba_args=munba_args)


def test_satisfied_forget_player_leaves_and_is_logged(tmp_path):
    tr = _trainer(tmp_path / "rule", MunbaArguments(**FROM_STEP_2), max_steps=4)
    tr.train()
    logs = [h for h in tr.state.log_history if "munba/power_forget" in h]
    assert [h["munba/power_forget"] for h in logs] == [1.0, 0.0, 0.0, 0.0]
    assert [h["munba/forget_satisfied"] for h in logs] == [0.0, 1.0, 1.0, 1.0]
    assert logs[0]["munba/weight_forget"] > 0 and all(h["munba/weight_forget"] == 0 for h in logs[1:])
    assert "munba/forget_target" in logs[1]
    # step 1 (before the target) is exactly the paper's step
    paper = _trainer(tmp_path / "paper", MunbaArguments(), max_steps=1)
    paper.train()
    ref = [h for h in paper.state.log_history if "munba/power_forget" in h][0]
    assert {k: logs[0][k] for k in ref if k.startswith("munba/") and k in logs[0]} == \
        {k: v for k, v in ref.items() if k.startswith("munba/") and k in logs[0]}


def test_default_classifier_losses_have_no_target_and_power_is_honoured(tmp_path):
    tr = _trainer(tmp_path / "default", MunbaArguments(), max_steps=1)
    tr.train()
    assert tr.forget_rule is None  # random_label: no default target (the paper's rule)
    assert tr.state.log_history[0]["munba/power_forget"] == 1.0
    asym = _trainer(tmp_path / "asym", MunbaArguments(bargaining_power_forget=0.25), max_steps=1)
    asym.train()
    log = asym.state.log_history[0]
    assert log["munba/power_forget"] == 0.25
    a = torch.tensor([log["munba/weight_retain"], log["munba/weight_forget"]], dtype=torch.float64)
    n = torch.tensor([log["munba/grad_norm_retain"], log["munba/grad_norm_forget"]],
                     dtype=torch.float64)
    c = log["munba/cos"]
    x = a * n  # unit-gradient coordinates: x_i (C x)_i = w_i
    lhs = torch.stack([x[0] * (x[0] + c * x[1]), x[1] * (c * x[0] + x[1])])
    assert torch.allclose(lhs, torch.tensor([1.0, 0.25], dtype=torch.float64), rtol=1e-4)


def test_resume_keeps_the_rule_state_bitwise(tmp_path):
    kw = dict(max_steps=6, save_strategy="steps", save_steps=3)
    margs = MunbaArguments(**FROM_STEP_2)
    full = _trainer(tmp_path / "a", margs, **kw)
    full.train()
    part = _trainer(tmp_path / "b", margs, **kw)
    part.train()
    shutil.rmtree(tmp_path / "b" / "out" / "checkpoint-6")
    state = json.loads((tmp_path / "b" / "out" / "checkpoint-3" / "munba_state.json").read_text())
    assert state["forget_rule"]["satisfied"] is True
    resumed = _trainer(tmp_path / "b", margs, **kw)
    resumed.train(resume_from_checkpoint="latest")
    assert torch.equal(params_vector(resumed.model), params_vector(full.model))
    assert resumed.forget_rule.state_dict() == full.forget_rule.state_dict()


def test_bad_rule_options_are_one_clear_error():
    with pytest.raises(ValueError, match="negated"):
        MunbaArguments(forget_loss="neg_ce", forget_target=0.5, forget_target_mode="relative")
    with pytest.raises(ValueError, match="bargaining_power_forget"):
        MunbaArguments(bargaining_power_forget=0.0)
    with pytest.raises(ValueError, match="hysteresis"):
        MunbaArguments(forget_target=2.0, forget_target_hysteresis=0.9)
    assert MunbaArguments(method="weighted", forget_target=2.0).make_forget_rule() is None
