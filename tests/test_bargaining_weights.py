"""The Nash bargaining weights satisfy their defining equations G a = 1/a, whatever the scale."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_munba import (
    BargainingStatus,
    InfeasibleBargainingError,
    nash_bargaining_weights,
    solve_nash_bargaining,
)

DTYPES = [torch.float32, torch.float64]
# G a = 1/a has condition number ~ 1 / (1 + cos): rounding the weights to float32 (6e-8) then
# costs ~6e-8 / (1 + cos) in the equations, so near-opposed float32 games are checked to where
# 1e-5 is attainable.
MIN_COS = {torch.float32: -0.99, torch.float64: -0.9998}  # opposed_tol is 1e-4


def rounding_rtol(dtype, cos: float) -> float:
    """Tolerance for checking float-`dtype` weights against the exact float64 gradients.

    The weights solve the rounded Gram G + E exactly (|E_ij| <= u |G_ij|, u the unit roundoff)
    and are themselves rounded (a_i (1 + delta_i), |delta_i| <= u). At the solution
    |G_ij| a_i a_j = |cos_ij| / (1 + cos) for i != j and 1 / (1 + cos) for i = j, so the error
    in (G a)_i a_i = 1 is at most u (1 + |cos|) / (1 + cos) from E plus twice that from the
    rounding of a: 3 u (1 + |cos|) / (1 + cos) <= 6 u / (1 + cos). Near opposed gradients
    (cos -> -1) it grows as 1 / (1 + cos); e.g. float32 at cos = -0.989 allows 3.3e-5, where a
    fixed 1e-5 fails. A wrong formula (the supplement's sin^2 factor) is off by O(1) and fails.
    """
    u = torch.finfo(dtype).eps / 2
    return 1e-5 + 6 * u * (1 + abs(cos)) / (1 + cos)


def gram_of(vectors: torch.Tensor) -> torch.Tensor:
    return vectors @ vectors.T


def two_player_gram(n1: float, n2: float, cos: float, dtype) -> torch.Tensor:
    """Gram built from the norms and cosine directly, so extreme scales stay exact."""
    off = cos * n1 * n2
    return torch.tensor([[n1 * n1, off], [off, n2 * n2]], dtype=torch.float64).to(dtype)


def assert_kkt(gram: torch.Tensor, a: torch.Tensor, rtol: float = 1e-5):
    assert a.dtype == gram.dtype
    assert torch.isfinite(a).all() and (a > 0).all()
    lhs = (gram.double() @ a.double()) * a.double()  # (G a) * a == 1
    assert torch.allclose(lhs, torch.ones_like(lhs), rtol=rtol, atol=0), lhs


@settings(max_examples=300, deadline=None)
@given(
    log_n1=st.floats(-8, 8),
    log_n2=st.floats(-8, 8),
    cos=st.floats(-0.9999, 1.0),
    dtype=st.sampled_from(DTYPES),
)
def test_two_players_satisfy_kkt_across_scales(log_n1, log_n2, cos, dtype):
    cos = max(cos, MIN_COS[dtype])
    gram = two_player_gram(10.0**log_n1, 10.0**log_n2, cos, dtype)
    a = nash_bargaining_weights(gram)
    assert_kkt(gram, a)
    # the closed form a_i = 1 / (|g_i| sqrt(1 + c))
    n = gram.double().diagonal().sqrt()
    c = gram.double()[0, 1] / (n[0] * n[1])
    expected = 1.0 / (n * torch.sqrt(1 + c))
    assert torch.allclose(a.double(), expected, rtol=1e-5)


EDGE_COSINES = [0.0, 1.0, 1.0 - 1e-7, 0.999999, -0.9, -0.99, -0.9998, 1e-12, -1e-12]


@pytest.mark.parametrize("dtype,cos", [(d, c) for d in DTYPES for c in EDGE_COSINES
                                       if c >= MIN_COS[d]])
@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e8])
def test_edge_geometries(dtype, cos, scale):
    gram = two_player_gram(scale, 3 * scale, cos, dtype)
    assert_kkt(gram, nash_bargaining_weights(gram))


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    dim=st.integers(2, 64),
    dtype=st.sampled_from(DTYPES),
    log_scale=st.floats(-6, 6),
)
def test_random_gradients_both_players_improve(seed, dim, dtype, log_scale):
    g = torch.randn(2, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g = g * 10.0**log_scale
    gram = gram_of(g)
    sol = solve_nash_bargaining(gram)
    if sol.status is not BargainingStatus.OK:
        assert sol.status is BargainingStatus.CONFLICT
        return
    cos = float(gram[0, 1] / (gram[0, 0] * gram[1, 1]).sqrt())
    if cos < MIN_COS[dtype]:
        dtype = torch.float64
    a = nash_bargaining_weights(gram.to(dtype))
    assert_kkt(gram.to(dtype), a)
    d = a.double() @ g
    # every player improves, by exactly 1 / a_i, and |d|^2 = 2 -- up to the rounding of the Gram
    # and of a to `dtype` (see rounding_rtol), which the float64 check against g exposes
    rtol = rounding_rtol(dtype, cos)
    assert ((g @ d) > 0).all()
    assert torch.allclose(g @ d, 1 / a.double(), rtol=rtol)
    assert math.isclose(float(d.norm()), math.sqrt(2), rel_tol=rtol)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), s1=st.floats(1e-6, 1e6), s2=st.floats(1e-6, 1e6))
def test_direction_invariant_to_loss_scales(seed, s1, s2):
    g = torch.randn(2, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if float(torch.nn.functional.cosine_similarity(g[0], g[1], dim=0)) < -0.99:
        return
    d = nash_bargaining_weights(gram_of(g)) @ g
    gs = g * torch.tensor([[s1], [s2]], dtype=torch.float64)
    ds = nash_bargaining_weights(gram_of(gs)) @ gs
    assert torch.allclose(d, ds, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("k", [3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(10))
def test_more_players_satisfy_kkt(k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(32, generator=gen, dtype=torch.float64)
    # a shared component keeps the game feasible; random scales test scale handling
    g = (base + 0.8 * torch.randn(k, 32, generator=gen, dtype=torch.float64))
    g = g * torch.logspace(-4, 4, k, dtype=torch.float64)[:, None]
    gram = gram_of(g).to(dtype)
    a = nash_bargaining_weights(gram)
    assert_kkt(gram, a)
    d = a.double() @ g
    assert ((g @ d) > 0).all()
    assert math.isclose(float(d.norm()), math.sqrt(k), rel_tol=1e-5)


def test_three_players_with_zero_in_hull_is_a_conflict():
    g = torch.tensor([[1.0, 0.0], [-0.5, 0.8660254], [-0.5, -0.8660254]], dtype=torch.float64)
    sol = solve_nash_bargaining(gram_of(g))
    assert sol.status is BargainingStatus.CONFLICT
    assert sol.weights == [1.0, 0.0, 0.0]
    with pytest.raises(InfeasibleBargainingError):
        nash_bargaining_weights(gram_of(g))


@pytest.mark.parametrize("cos", [-1.0, -1.0 + 1e-6])
def test_opposed_gradients_fall_back_to_retain_player(cos):
    gram = two_player_gram(2.0, 5.0, cos, torch.float64)
    sol = solve_nash_bargaining(gram)
    assert sol.status is BargainingStatus.CONFLICT
    assert sol.weights == [0.5, 0.0]  # retain's unit gradient alone
    assert solve_nash_bargaining(gram, fallback_player=1).weights == [0.0, 0.2]
    skip = solve_nash_bargaining(gram, fallback_player=None)
    assert skip.status is BargainingStatus.SKIPPED and skip.skipped
    with pytest.raises(InfeasibleBargainingError) as err:
        nash_bargaining_weights(gram)
    assert err.value.status is BargainingStatus.CONFLICT


def test_zero_gradient_player_leaves_the_game():
    gram = torch.tensor([[4.0, 0.0], [0.0, 0.0]])
    sol = solve_nash_bargaining(gram)
    assert sol.status is BargainingStatus.NO_PROPOSAL
    assert sol.weights == [0.5, 0.0] and sol.active == [True, False]
    sol = solve_nash_bargaining(torch.zeros(2, 2))
    assert sol.status is BargainingStatus.SKIPPED and sol.weights == [0.0, 0.0]
    with pytest.raises(InfeasibleBargainingError):
        nash_bargaining_weights(gram)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_gram_is_reported_not_propagated(bad):
    gram = torch.tensor([[1.0, bad], [bad, 1.0]])
    sol = solve_nash_bargaining(gram)
    assert sol.status is BargainingStatus.NONFINITE and sol.skipped
    assert all(math.isfinite(w) and w == 0 for w in sol.weights)
    with pytest.raises(InfeasibleBargainingError):
        nash_bargaining_weights(gram)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="square"):
        nash_bargaining_weights(torch.ones(2, 3))
    with pytest.raises(ValueError, match="fallback_player"):
        solve_nash_bargaining(torch.eye(2), fallback_player=2)


def test_not_the_papers_simplified_formula():
    """The supplement's a_f = sqrt(sin^2 (1 - cos)) / |g_f| differs from the exact weight."""
    n1, n2, c = 1.0, 2.0, 0.3
    a = nash_bargaining_weights(two_player_gram(n1, n2, c, torch.float64))
    paper = math.sqrt((1 - c * c) * (1 - c)) / n2
    assert not math.isclose(float(a[1]), paper, rel_tol=1e-3)
    assert math.isclose(float(a[1]), 1 / (n2 * math.sqrt(1 + c)), rel_tol=1e-12)


# ---------------------------------------------------------------- bargaining powers (asymmetric)

from hf_munba import NashWeighting, SatisfactionRule, default_forget_target  # noqa: E402


def assert_asymmetric_kkt(gram: torch.Tensor, a: torch.Tensor, powers, rtol: float = 1e-7):
    """a_i (G a)_i == w_i, a > 0: the defining equations of the asymmetric solution."""
    g = gram.double()
    a = a.double()
    assert torch.isfinite(a).all() and (a > 0).all()
    lhs = a * (g @ a)
    w = torch.tensor(powers, dtype=torch.float64)
    assert torch.allclose(lhs, w, rtol=rtol, atol=0), (lhs, w)


@settings(max_examples=400, deadline=None)
@given(
    log_n1=st.floats(-8, 8),
    log_n2=st.floats(-8, 8),
    cos=st.floats(-0.9998, 1.0),
    log_rho=st.floats(-4, 4),
    log_wr=st.floats(-2, 2),
)
def test_asymmetric_two_players_satisfy_kkt_and_the_closed_form(log_n1, log_n2, cos, log_rho,
                                                                log_wr):
    w_r = 10.0**log_wr
    powers = [w_r, w_r * 10.0**log_rho]
    gram = two_player_gram(10.0**log_n1, 10.0**log_n2, cos, torch.float64)
    sol = solve_nash_bargaining(gram, powers=powers)
    assert sol.status is BargainingStatus.OK and sol.active == [True, True]
    a = torch.tensor(sol.weights, dtype=torch.float64)
    # near-opposed games amplify rounding by 1 / (1 + cos)
    assert_asymmetric_kkt(gram, a, powers, rtol=1e-9 / (1 + cos) + 1e-12)
    # DESIGN.md's closed form: t = x_f / x_r solves t^2 + c (1 - rho) t - rho = 0
    n = gram.diagonal().sqrt()
    x = a * n
    t = float(x[1] / x[0])
    rho = powers[1] / powers[0]
    c = float(gram[0, 1] / (n[0] * n[1]))
    assert t > 0
    assert math.isclose(t * t + c * (1 - rho) * t, rho, rel_tol=1e-8, abs_tol=1e-12 * max(1, rho))
    if c < 0:  # the root lies in (|c|, 1/|c|): both utilities c + t and 1 + c t stay positive
        assert -c < t < -1 / c
    assert math.isclose(float(x[0]), math.sqrt(powers[0] / (1 + c * t)), rel_tol=1e-8)
    # every player improves: g_i . d = w_i / a_i > 0 (in unit-gradient coordinates)
    assert c + t > 0 and 1 + c * t > 0


@pytest.mark.parametrize("k", [3, 4, 5])
@pytest.mark.parametrize("seed", range(40))
def test_asymmetric_more_players_satisfy_kkt(k, seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(24, generator=gen, dtype=torch.float64)
    g = base + 0.8 * torch.randn(k, 24, generator=gen, dtype=torch.float64)
    if seed % 4 == 0:  # one pair nearly opposed (cos ~ -0.999), the game still feasible
        g[1] = -g[0] + 0.05 * torch.randn(24, generator=gen, dtype=torch.float64)
        g[2] = g[0] - g[1] + 0.3 * torch.randn(24, generator=gen, dtype=torch.float64)
    g = g * torch.logspace(-3, 3, k, dtype=torch.float64)[:, None]
    powers = (10.0 ** (4 * torch.rand(k, generator=gen, dtype=torch.float64) - 2)).tolist()
    gram = gram_of(g)
    sol = solve_nash_bargaining(gram, powers=powers)
    if sol.status is BargainingStatus.CONFLICT:  # then the symmetric game is infeasible too
        assert solve_nash_bargaining(gram).status is BargainingStatus.CONFLICT
        return
    assert sol.status is BargainingStatus.OK
    a = torch.tensor(sol.weights, dtype=torch.float64)
    assert_asymmetric_kkt(gram, a, powers, rtol=1e-8)
    d = a @ g
    assert ((g @ d) > 0).all()
    assert math.isclose(float(d @ d), sum(powers), rel_tol=1e-8)  # |d|^2 = sum_i w_i


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("seed", range(20))
def test_unit_powers_are_todays_weights_bitwise(k, seed):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(k, 16, generator=gen, dtype=torch.float64) + torch.randn(16, generator=gen,
                                                                              dtype=torch.float64)
    gram = gram_of(g)
    plain = solve_nash_bargaining(gram)
    ones = solve_nash_bargaining(gram, powers=[1.0] * k)
    assert ones.weights == plain.weights and ones.status is plain.status
    assert torch.equal(nash_bargaining_weights(gram, powers=[1] * k), nash_bargaining_weights(gram))
    assert torch.equal(NashWeighting([1.0] * k)(gram), nash_bargaining_weights(gram))
    if k == 2:  # and today's closed form, exactly
        n = [math.sqrt(float(gram[i, i])) for i in range(2)]
        c = max(-1.0, min(1.0, float(gram[0, 1]) / (n[0] * n[1])))
        assert plain.weights == [1.0 / math.sqrt(1.0 + c) / n[0], 1.0 / math.sqrt(1.0 + c) / n[1]]


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), s1=st.floats(1e-6, 1e6), s2=st.floats(1e-6, 1e6),
       log_rho=st.floats(-3, 3), s_w=st.floats(1e-3, 1e3))
def test_asymmetric_direction_is_scale_free(seed, s1, s2, log_rho, s_w):
    g = torch.randn(2, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if float(torch.nn.functional.cosine_similarity(g[0], g[1], dim=0)) < -0.99:
        return
    powers = [1.0, 10.0**log_rho]
    d = nash_bargaining_weights(gram_of(g), powers=powers) @ g
    gs = g * torch.tensor([[s1], [s2]], dtype=torch.float64)
    ds = nash_bargaining_weights(gram_of(gs), powers=powers) @ gs
    assert torch.allclose(d, ds, rtol=1e-7, atol=1e-9)  # loss scales cancel
    # scaling every power by s_w scales the direction by sqrt(s_w): only the ratio shapes it
    dw = nash_bargaining_weights(gram_of(g), powers=[s_w * w for w in powers]) @ g
    assert torch.allclose(dw, math.sqrt(s_w) * d, rtol=1e-7, atol=1e-9)


def test_low_power_with_opposed_gradients_holds_the_weak_player_at_zero_gain():
    """rho -> 0 with c < 0: d -> u_r - c u_f, retain projected so forget neither gains nor loses."""
    gram = two_player_gram(2.0, 0.01, -0.6, torch.float64)
    a = nash_bargaining_weights(gram, powers=[1.0, 1e-10])
    x = a * gram.diagonal().sqrt()
    assert math.isclose(float(x[1] / x[0]), 0.6, rel_tol=1e-6)


def test_a_player_with_power_zero_leaves_the_game():
    gram = two_player_gram(2.0, 5.0, -0.4, torch.float64)
    sol = solve_nash_bargaining(gram, powers=[1.0, 0.0])
    assert sol.status is BargainingStatus.OK  # not a fallback: the player chose to leave
    assert sol.weights == [0.5, 0.0] and sol.active == [True, False]  # retain's unit gradient
    assert solve_nash_bargaining(gram, powers=[4.0, 0.0]).weights == [1.0, 0.0]  # sqrt(w) / |g|
    with pytest.raises(InfeasibleBargainingError):
        nash_bargaining_weights(gram, powers=[1.0, 0.0])
    # K = 3: the two left bargain exactly as a two-player game
    g = torch.tensor([[1.0, 0.2, 0.0], [0.1, 1.0, 0.3], [-1.0, 0.4, 2.0]], dtype=torch.float64)
    three = solve_nash_bargaining(gram_of(g), powers=[1.0, 0.0, 1.0])
    two = solve_nash_bargaining(gram_of(g[[0, 2]]))
    assert three.weights[1] == 0.0
    assert three.weights[0] == pytest.approx(two.weights[0], rel=1e-12)
    assert three.weights[2] == pytest.approx(two.weights[1], rel=1e-12)
    # every player out: nothing to do
    assert solve_nash_bargaining(gram, powers=[0.0, 0.0]).status is BargainingStatus.SKIPPED


@pytest.mark.parametrize("powers,match", [([1.0, -1.0], ">= 0"), ([1.0, float("nan")], ">= 0"),
                                          ([1.0], "one entry per player"),
                                          ([1.0, float("inf")], ">= 0")])
def test_bad_powers_are_one_clear_error(powers, match):
    with pytest.raises(ValueError, match=match):
        solve_nash_bargaining(torch.eye(2, dtype=torch.float64), powers=powers)


def test_nash_weighting_is_the_solve_with_its_settings():
    g = torch.tensor([[1.0, 0.0, 0.5], [0.3, 1.0, 0.0]], dtype=torch.float64)
    w = NashWeighting(powers=[1.0, 2.0])
    assert torch.equal(w(gram_of(g)), nash_bargaining_weights(gram_of(g), powers=[1.0, 2.0]))
    assert "powers=[1.0, 2.0]" in repr(w)
    assert w.solution(gram_of(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))).status is \
        BargainingStatus.CONFLICT


# ---------------------------------------------------------------- the satisfied player

def run_rule(rule, losses):
    return [rule.update(x) for x in losses]


def test_satisfaction_rule_on_a_scripted_sequence_with_hysteresis():
    rule = SatisfactionRule(target=0.25, mode="relative", ema=0.5, hysteresis=1.5)
    # reference = first loss 8 -> target T = 2, re-entry above 1.5 T = 3
    seq = [8.0, 4.0, 2.0, 1.0, 1.0, 3.0, 3.5, 4.0, 6.0, 1.0, 0.0]
    # ema:   8,   6,   4,  2.5, 1.75, 2.375, 2.9375, 3.46875, 4.734, 2.867, 1.43
    expect_satisfied = [False, False, False, False, True, True, True, False, False, False, True]
    got = []
    for x in seq:
        p = rule.update(x)
        got.append(rule.satisfied)
        assert p == (0.0 if rule.satisfied else 1.0)
    assert got == expect_satisfied
    assert rule.times_satisfied == 2 and rule.reference == 8.0 and rule.threshold == 2.0
    log = rule.log_dict()
    assert log["munba/forget_satisfied"] == 1.0 and log["munba/forget_target"] == 2.0
    assert log["munba/forget_loss_ema"] == pytest.approx(1.43359375)


def test_rule_changes_nothing_before_the_target_and_does_not_flip_flop():
    rule = SatisfactionRule()  # defaults: a quarter of the first loss, EMA 0.9, hysteresis 1.5
    gen = torch.Generator().manual_seed(0)
    decay = [float(torch.exp(torch.tensor(-0.05 * n))) for n in range(100)]
    noisy = [d * float(1 + 0.5 * (torch.rand((), generator=gen) - 0.5)) for d in decay]
    tail = [0.25 * float(1 + 0.8 * (torch.rand((), generator=gen) - 0.5)) for _ in range(200)]
    powers = run_rule(rule, noisy + tail)
    first = powers.index(0.0)
    assert all(p == 1.0 for p in powers[:first])  # power 1 until the target is reached
    assert rule.ema_value is not None and first > 10
    # losses hovering around the target (+-40%) never bring the player back and forth
    assert rule.times_satisfied == 1 and all(p == 0.0 for p in powers[first:])


@pytest.mark.parametrize("scale", [1e-6, 3.0, 1e5])
def test_relative_rule_is_scale_free(scale):
    gen = torch.Generator().manual_seed(1)
    shape = torch.cat([torch.linspace(1.0, 0.05, 60), torch.full((40,), 0.05),
                       torch.linspace(0.05, 1.0, 50)]).double()
    losses = (shape * (0.75 + 0.5 * torch.rand(150, generator=gen, dtype=torch.float64))).tolist()
    base = run_rule(SatisfactionRule(reference_steps=3), losses)
    scaled = run_rule(SatisfactionRule(reference_steps=3), [scale * x for x in losses])
    assert base == scaled and 0.0 in base and base[-1] == 1.0  # left, then came back


def test_absolute_rule_and_non_finite_losses():
    rule = SatisfactionRule(target=0.5, mode="absolute", ema=0.0, hysteresis=2.0)
    assert run_rule(rule, [1.0, float("nan"), 0.4, float("inf"), 0.9, 1.1]) == \
        [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert rule.steps == 4  # the non-finite losses (skipped steps) left no trace


def test_relative_rule_is_inert_on_a_negated_loss():
    rule = SatisfactionRule()
    assert run_rule(rule, [-1.0, -5.0, -10.0]) == [1.0, 1.0, 1.0]
    assert rule.inert and rule.threshold is None


def test_rule_state_round_trips_exactly_and_refuses_other_settings():
    import json

    gen = torch.Generator().manual_seed(2)
    losses = (torch.rand(60, generator=gen, dtype=torch.float64) * torch.linspace(1, 0.01, 60).double()).tolist()
    a = SatisfactionRule(reference_steps=2)
    run_rule(a, losses[:30])
    b = SatisfactionRule(reference_steps=2)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert run_rule(a, losses[30:]) == run_rule(b, losses[30:])
    assert a.state_dict() == b.state_dict()
    with pytest.raises(ValueError, match="same settings"):
        SatisfactionRule(target=0.1).load_state_dict(a.state_dict())


@pytest.mark.parametrize("kwargs,match", [
    (dict(target=0.0), "positive"), (dict(mode="sometimes"), "mode"), (dict(ema=1.0), "ema"),
    (dict(hysteresis=0.5), "hysteresis"), (dict(reference_steps=0), "reference_steps"),
    (dict(satisfied_power=-1.0), "satisfied_power"), (dict(satisfied_power=1.0), "below")])
def test_rule_bad_settings_are_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SatisfactionRule(**kwargs)


def test_default_targets_per_objective():
    assert default_forget_target("remap") == (0.25, "relative")
    assert default_forget_target("ga") is None and default_forget_target("neg_ce") is None
    assert default_forget_target("random_label") is None
    with pytest.raises(ValueError, match="objective"):
        default_forget_target("nope")


def test_build_forget_rule_takes_the_objectives_default():
    from hf_munba import build_forget_rule

    rule = build_forget_rule("remap")
    assert (rule.target, rule.mode, rule.ema, rule.hysteresis) == (0.25, "relative", 0.9, 1.5)
    assert build_forget_rule("ga") is None and build_forget_rule("random_label") is None
    absolute = build_forget_rule("random_label", target=2.4)
    assert absolute.mode == "absolute" and absolute.target == 2.4
    assert build_forget_rule("remap", target=0.1, power=2.0).base_power == 2.0
    with pytest.raises(ValueError, match="negated"):
        build_forget_rule("neg_ce", target=0.5, mode="relative")


def test_front_end_default_keeps_a_satisfied_forget_player_at_a_small_power():
    from hf_munba import build_forget_rule
    from hf_munba.bargaining import DEFAULT_SATISFIED_POWER

    assert build_forget_rule("remap").satisfied_power == DEFAULT_SATISFIED_POWER == 0.1
    rule = build_forget_rule("remap", ema=0.0)
    assert run_rule(rule, [1.0, 0.2]) == [1.0, 0.1]
    # with opposed gradients a satisfied forget player is not sacrificed: it keeps a small
    # first-order gain, a tenth of what the retain player gets, and retain gets most of the step
    gram = two_player_gram(1.0, 1.0, -0.4, torch.float64)
    a = nash_bargaining_weights(gram, powers=[1.0, DEFAULT_SATISFIED_POWER])
    gains = gram @ a
    assert float(a[1] / a[0]) > 0.4 and float(gains[1]) > 0
    assert float(a[1] * gains[1]) == pytest.approx(0.1 * float(a[0] * gains[0]), rel=1e-9)
    assert float(gains[0]) > float(gains[1])
