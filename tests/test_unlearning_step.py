"""The one optimizer step (hf_munba.unlearning.step.unlearning_step) and the weighting interface."""

import math

import pytest
import torch

from hf_munba.bargaining import (ConstantWeighting, NashBargainer, NashWeighting, SatisfactionRule,
                                 Weighting, nash_bargaining_weights)
from hf_munba.unlearning import SkippedStepGuard, TooManySkippedSteps, unlearning_step


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def _losses(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    xr, xf = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    return (lambda: model(xr).pow(2).mean()), (lambda: -model(xf).sum(1).mean())


def _player_grads(model, lr_fn, lf_fn):
    out = []
    for fn in (lr_fn, lf_fn):
        model.zero_grad(set_to_none=True)
        fn().backward()
        out.append([p.grad.clone() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return out


def _run_players(bargainer, lr_fn, lf_fn):
    losses = []
    for i, fn in enumerate((lr_fn, lf_fn)):
        with bargainer.player(i) as scale:
            loss = fn()
            (scale * loss).backward()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("lam", [0.3, 1.0, 3.0])
def test_constant_weighting_is_the_weighted_sum_and_scales_with_lambda(lam):
    model = _model()
    lr_fn, lf_fn = _losses(model)
    gr, gf = _player_grads(model, lr_fn, lf_fn)
    b = NashBargainer(model.parameters(), 2, weighting=ConstantWeighting([1.0, lam]))
    assert b.direct
    _run_players(b, lr_fn, lf_fn)
    stats = b.combine()
    assert stats.weights == [1.0, lam] and not stats.skipped
    for p, a, c in zip(model.parameters(), gr, gf):
        torch.testing.assert_close(p.grad, a + lam * c)


def test_nash_weighting_object_gives_the_default_bargainer_bitwise():
    model = _model()
    lr_fn, lf_fn = _losses(model)
    grads = []
    for kwargs in ({}, {"weighting": NashWeighting()}):
        b = NashBargainer(model.parameters(), 2, **kwargs)
        _run_players(b, lr_fn, lf_fn)
        b.combine()
        grads.append([p.grad.clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    for a, c in zip(*grads):
        assert torch.equal(a, c)


def test_a_custom_weighting_receives_the_gram_matrix():
    seen = {}

    class Recorder(Weighting):
        def __call__(self, gram):
            seen["gram"] = gram.clone()
            return torch.tensor([0.25, 0.75], dtype=torch.float64)

    model = _model()
    lr_fn, lf_fn = _losses(model)
    gr, gf = _player_grads(model, lr_fn, lf_fn)
    b = NashBargainer(model.parameters(), 2, weighting=Recorder())
    _run_players(b, lr_fn, lf_fn)
    b.combine()
    flat = [torch.cat([t.flatten() for t in g]).double() for g in (gr, gf)]
    expect = torch.stack(flat) @ torch.stack(flat).T
    torch.testing.assert_close(seen["gram"], expect, rtol=1e-5, atol=1e-8)
    for p, a, c in zip(model.parameters(), gr, gf):
        torch.testing.assert_close(p.grad, 0.25 * a + 0.75 * c)


def test_bad_weightings_are_refused():
    model = _model()
    with pytest.raises(ValueError, match="weights"):
        ConstantWeighting([1.0, -1.0])
    with pytest.raises(ValueError, match="2 players"):
        NashBargainer(model.parameters(), 2, weighting=ConstantWeighting([1.0, 1.0, 1.0]))
    with pytest.raises(TypeError, match="Weighting"):
        NashBargainer(model.parameters(), 2, weighting=lambda g: g)


def _adam_state(opt):
    return {k: v.clone() if torch.is_tensor(v) else v
            for s in opt.state.values() for k, v in s.items()}


@pytest.mark.parametrize("weighting", [None, ConstantWeighting([1.0, 1.0])])
def test_a_step_bargains_clips_and_steps_once(weighting):
    model = _model()
    lr_fn, lf_fn = _losses(model)
    gr, gf = _player_grads(model, lr_fn, lf_fn)
    b = NashBargainer(model.parameters(), 2, weighting=weighting)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    losses = _run_players(b, lr_fn, lf_fn)
    res = unlearning_step(b, opt, losses=losses, lr_scheduler=sched,
                          clip=lambda: torch.nn.utils.clip_grad_norm_(b.params, 1e9))
    assert res.stepped and math.isfinite(res.grad_norm)
    assert res.losses == pytest.approx([float(x) for x in losses])
    if weighting is None:
        flat = [torch.cat([t.flatten() for t in g]).double() for g in (gr, gf)]
        w = nash_bargaining_weights(torch.stack(flat) @ torch.stack(flat).T).tolist()
        assert res.logs["munba/weight_forget"] == pytest.approx(w[1])
    else:
        w = [1.0, 1.0]
    for p, p0, a, c in zip(model.parameters(), before, gr, gf):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * (w[0] * a + w[1] * c),
                                   rtol=1e-5, atol=1e-6)
        assert p.grad is None  # zero_grad(set_to_none=True)
    assert sched.get_last_lr() == [0.05]


@pytest.mark.parametrize("weighting", [None, ConstantWeighting([1.0, 1.0])])
@pytest.mark.parametrize("clip", [True, False])
def test_a_nonfinite_step_changes_nothing_and_too_many_stop_the_run(weighting, clip):
    model = _model()
    lr_fn, lf_fn = _losses(model)
    b = NashBargainer(model.parameters(), 2, weighting=weighting)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    guard = SkippedStepGuard(max_consecutive=2)
    unlearning_step(b, opt, losses=_run_players(b, lr_fn, lf_fn), lr_scheduler=sched, guard=guard)
    weights, state = [p.detach().clone() for p in model.parameters()], _adam_state(opt)
    nan = (lambda: lr_fn() * float("nan")), lf_fn
    clip_fn = (lambda: torch.nn.utils.clip_grad_norm_(b.params, 1.0)) if clip else None
    res = unlearning_step(b, opt, losses=_run_players(b, *nan), lr_scheduler=sched, guard=guard,
                          clip=clip_fn, step=2)
    assert res.skipped and res.nonfinite and res.logs["step_skipped"] == 1.0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), weights))
    assert all(p.grad is None for p in model.parameters())
    after = _adam_state(opt)
    assert all(torch.equal(after[k], v) if torch.is_tensor(v) else after[k] == v
               for k, v in state.items())
    assert sched.get_last_lr() == [0.05] and guard.total == 1
    with pytest.raises(TooManySkippedSteps, match="2 consecutive"):
        unlearning_step(b, opt, losses=_run_players(b, *nan), lr_scheduler=sched, guard=guard,
                        clip=clip_fn, step=3)


def test_a_nan_gradient_with_finite_losses_is_caught_without_clipping():
    model = _model()
    lr_fn, lf_fn = _losses(model)
    b = NashBargainer(model.parameters(), 2, weighting=ConstantWeighting([1.0, 1.0]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    losses = _run_players(b, lr_fn, lf_fn)
    next(model.parameters()).grad[0, 0] = float("inf")
    res = unlearning_step(b, opt, losses=losses)
    assert res.skipped and res.nonfinite
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_the_forget_rule_sets_the_forget_power_and_is_logged():
    model = _model()
    lr_fn, lf_fn = _losses(model)
    b = NashBargainer(model.parameters(), 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    rule = SatisfactionRule(target=1e9, mode="absolute", satisfied_power=0.01)  # satisfied at once
    res = unlearning_step(b, opt, losses=_run_players(b, lr_fn, lf_fn), forget_rule=rule)
    assert res.stats.powers == [1.0, 0.01]
    assert res.logs["munba/power_forget"] == 0.01
    assert res.logs["munba/forget_satisfied"] == 1.0


def test_edit_gradients_sees_the_combined_gradient_before_clipping_and_never_on_a_skip():
    model = _model()
    lr_fn, lf_fn = _losses(model)
    b = NashBargainer(model.parameters(), 2, weighting=ConstantWeighting([1.0, 1.0]))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    order = []

    def edit(params):
        order.append("edit")
        for p in params:
            p.grad.zero_()

    def clip():
        order.append("clip")
        return torch.nn.utils.clip_grad_norm_(b.params, 1.0)

    before = [p.detach().clone() for p in model.parameters()]
    res = unlearning_step(b, opt, losses=_run_players(b, lr_fn, lf_fn), edit_gradients=edit,
                          clip=clip)
    assert order == ["edit", "clip"] and res.grad_norm == 0.0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    order.clear()
    nan = (lambda: lr_fn() * float("nan")), lf_fn
    unlearning_step(b, opt, losses=_run_players(b, *nan), edit_gradients=edit, clip=clip)
    assert order == []
