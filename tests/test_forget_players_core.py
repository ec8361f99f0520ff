"""Several forget concepts as separate bargaining players: the shared core (methods + step)."""

import pytest
import torch

from hf_munba.bargaining import DEFAULT_SATISFIED_POWER
from hf_munba.unlearning import get_method, unlearning_step
from hf_munba.unlearning.methods import check_forget_names


def _step(method, grads, losses, rules):
    p = torch.nn.Parameter(torch.zeros(len(grads[0])))
    bargainer = method.make_bargainer([p])
    opt = torch.optim.SGD([p], lr=1.0)
    for i, g in enumerate(grads):
        with bargainer.player(i) as scale:
            (scale * (p * torch.tensor(g)).sum()).backward()
    return unlearning_step(bargainer, opt, losses=losses, forget_rules=rules,
                           powers=method.powers(), player_names=method.players())


def test_players_one_per_concept_retain_first():
    m = get_method("munba")(None, forget_names=["cat", "dog"])
    assert m.players() == ("retain", "forget_cat", "forget_dog")
    assert m.forget_players == (1, 2) and m.forget_player == 1
    assert get_method("munba")().players() == ("retain", "forget")  # pooled: unchanged
    assert get_method("ga")(None, forget_names=["a", "b"]).players() == ("forget_a", "forget_b")
    assert get_method("ft")(None, forget_names=["a", "b"]).players() == ("retain",)


def test_weighted_gives_each_concept_lambda():
    class Cfg:
        forget_weight = 0.3
    w = get_method("weighted")(Cfg(), forget_names=["a", "b", "c"]).weighting()
    assert w.weights == [1.0, 0.3, 0.3, 0.3]


@pytest.mark.parametrize("bad", [["a", "a"], ["a"], ["ok", "sp ace"], ["", "b"], "ab", ["a", 3]])
def test_bad_forget_names_one_clear_error(bad):
    with pytest.raises(ValueError):
        check_forget_names(bad)


def test_each_concept_has_its_own_rule_and_logs():
    m = get_method("munba")(None, forget_names=["a", "b"])
    rules = m.forget_rules("remap")
    assert sorted(rules) == [1, 2] and rules[1] is not rules[2]
    # first step sets each rule's reference (relative target = 0.25 x its own first loss)
    r = _step(m, [[1., 0, 0], [0, 1., 0], [0, 0, 1.]], [1.0, 4.0, 8.0], rules)
    assert r.logs["munba/forget_a_target"] == pytest.approx(1.0)
    assert r.logs["munba/forget_b_target"] == pytest.approx(2.0)
    assert {"loss/forget_a", "loss/forget_b", "munba/weight_forget_b",
            "munba/cos_retain_forget_a", "munba/cos_forget_a_forget_b"} <= set(r.logs)
    # concept a reaches its target, b does not: only a yields (its power drops), b keeps 1
    for _ in range(60):
        r = _step(m, [[1., 0, 0], [0, 1., 0], [0, 0, 1.]], [1.0, 0.01, 8.0], rules)
    assert rules[1].satisfied and not rules[2].satisfied
    assert r.logs["munba/power_forget_a"] == pytest.approx(DEFAULT_SATISFIED_POWER)
    assert r.logs["munba/power_forget_b"] == 1.0
    assert r.logs["munba/weight_forget_a"] < r.logs["munba/weight_forget_b"]


def test_single_and_several_rules_are_exclusive():
    m = get_method("munba")()
    p = torch.nn.Parameter(torch.zeros(2))
    b = m.make_bargainer([p])
    with pytest.raises(ValueError, match="not both"):
        unlearning_step(b, torch.optim.SGD([p], lr=1.0), losses=[1.0, 1.0],
                        forget_rule=m.forget_rule("remap"), forget_rules={1: m.forget_rule("remap")})
