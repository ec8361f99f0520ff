"""MunbaTrainer with several forget sets, each its own bargaining player (forget_<name>)."""

import json
import shutil

import pytest
import torch

from hf_munba.classification.data import InMemoryDataset
from hf_munba.classification.trainer import MunbaArguments, MunbaTrainer
from hf_munba.testing import tiny_resnet_classifier
from trainer_helpers import params_vector, targs

# every concept satisfied from its second step on (10x its own first losses), then it leaves
FROM_STEP_2 = dict(forget_target=10.0, forget_target_mode="relative",
                   forget_target_reference_steps=2, forget_target_ema=0.0,
                   satisfied_power_forget=0.0)


def _data(n=64, num_classes=4, seed=0):
    """Class c has a bright pixel row c; classes 0 and 1 are forgotten. (D_f per class, D_r)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    for i in range(n):
        x[i, :, int(y[i]), :] += 1.0

    def sub(mask):
        return InMemoryDataset({"pixel_values": x[mask], "labels": y[mask]})

    return {"c0": sub(y == 0), "c1": sub(y == 1)}, sub((y == 0) | (y == 1)), sub(y >= 2)


def _trainer(tmp_path, forget, retain, munba_args=None, **kw):
    return MunbaTrainer(model=tiny_resnet_classifier(num_labels=4), args=targs(tmp_path, **kw),
                        train_dataset=retain, forget_dataset=forget, munba_args=munba_args)


def test_one_player_per_concept_logs_per_concept_values(tmp_path):
    per_class, pooled, retain = _data()
    tr = _trainer(tmp_path / "k", per_class, retain, max_steps=3)
    tr.train()
    assert tr.method.players() == ("retain", "forget_c0", "forget_c1")
    assert tr.bargainer.num_players == 3
    log = tr.state.log_history[0]
    for key in ("loss_retain", "loss_forget_c0", "loss_forget_c1", "munba/weight_retain",
                "munba/weight_forget_c0", "munba/weight_forget_c1", "munba/grad_norm_forget_c1",
                "munba/power_forget_c0", "munba/cos_retain_forget_c0", "munba/cos_forget_c0_forget_c1"):
        assert key in log and log[key] == log[key], key
    assert "loss_forget" not in log and "munba/weight_forget" not in log
    # one batch per concept per micro-batch, drawn from that concept only
    assert [s.batches_drawn for s in tr._forget_streams.values()] == [3, 3]
    # the same two classes pooled into one player: a different bargain, different weights
    po = _trainer(tmp_path / "p", pooled, retain, max_steps=3)
    po.train()
    assert po.method.players() == ("retain", "forget") and po.bargainer.num_players == 2
    assert "munba/weight_forget" in po.state.log_history[0]
    assert po.state.log_history[0]["munba/weight_retain"] != log["munba/weight_retain"]
    assert not torch.equal(params_vector(po.model), params_vector(tr.model))


def test_one_entry_dict_is_the_pooled_player(tmp_path):
    per_class, _, retain = _data()
    a = _trainer(tmp_path / "a", {"c0": per_class["c0"]}, retain, max_steps=2)
    a.train()
    b = _trainer(tmp_path / "b", per_class["c0"], retain, max_steps=2)
    b.train()
    assert a.method.players() == ("retain", "forget")
    assert torch.equal(params_vector(a.model), params_vector(b.model))


def test_each_concept_has_its_own_rule_and_resume_is_bitwise(tmp_path):
    per_class, _, retain = _data()
    kw = dict(max_steps=6, save_strategy="steps", save_steps=3)
    margs = MunbaArguments(**FROM_STEP_2)
    full = _trainer(tmp_path / "a", per_class, retain, margs, **kw)
    full.train()
    assert sorted(full.forget_rules) == [1, 2] and full.forget_rule is None
    logs = [h for h in full.state.log_history if "munba/power_forget_c0" in h]
    assert [h["munba/forget_c0_satisfied"] for h in logs][:2] == [0.0, 1.0]
    assert "munba/forget_c1_target" in logs[1]
    part = _trainer(tmp_path / "b", per_class, retain, margs, **kw)
    part.train()
    shutil.rmtree(tmp_path / "b" / "out" / "checkpoint-6")
    state = json.loads((tmp_path / "b" / "out" / "checkpoint-3" / "munba_state.json").read_text())
    assert state["forget_names"] == ["c0", "c1"]
    assert set(state["forget_streams"]) == set(state["forget_rules"]) == {"forget_c0", "forget_c1"}
    assert state["forget_streams"]["forget_c0"]["batches_drawn"] == 3
    resumed = _trainer(tmp_path / "b", per_class, retain, margs, **kw)
    resumed.train(resume_from_checkpoint="latest")
    assert torch.equal(params_vector(resumed.model), params_vector(full.model))
    for i in (1, 2):
        assert resumed.forget_rules[i].state_dict() == full.forget_rules[i].state_dict()
    assert {p: s.state_dict() for p, s in resumed._forget_streams.items()} == \
        {p: s.state_dict() for p, s in full._forget_streams.items()}
    # a checkpoint of pooled players is not resumed with per-concept players
    pooled = _trainer(tmp_path / "b", per_class["c0"], retain, margs, **kw)
    with pytest.raises(ValueError, match="forget players"):
        pooled.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-3"))


def test_setup_sees_every_concept(tmp_path):
    per_class, _, retain = _data()
    tr = _trainer(tmp_path, per_class, retain, munba_args=MunbaArguments(method="salun"), max_steps=1)
    seen = sum(len(b["labels"]) for b in tr.iter_forget_batches_once())
    assert seen == len(per_class["c0"]) + len(per_class["c1"])
    tr.train()
    assert sum(int(m.sum()) for m in tr.method.masks) > 0


def test_bad_forget_sets_are_one_clear_error(tmp_path):
    per_class, _, retain = _data()
    empty = InMemoryDataset({"pixel_values": torch.zeros(0, 1, 8, 8), "labels": torch.zeros(0)})
    cases = [({"c0": per_class["c0"], "c1": empty}, None, "concept 'c1' is empty"),
             ({"c0": per_class["c0"], "bad name": per_class["c1"]}, None, "letters, digits"),
             ([per_class["c0"], per_class["c1"]], None, "dict name -> dataset"),
             ({}, None, "empty dict"),
             (per_class, MunbaArguments(method="ft"), "uses no forget set")]
    for forget, margs, msg in cases:
        with pytest.raises(ValueError, match=msg):
            _trainer(tmp_path, forget, retain, margs)
