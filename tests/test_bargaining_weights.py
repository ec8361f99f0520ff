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
