r"""Nash bargaining over gradients: the one piece of math every hf_munba front end shares.

Each optimizer step, K players (for unlearning: retain, forget) propose gradients g_1..g_K.
MUNBa takes the update direction d that maximises sum_i log(g_i . d) over the ball |d|^2 <= K
(Nash bargaining; Wu & Harandi 2024, following Nash-MTL, Navon et al. 2022). Writing
d = sum_i a_i g_i, the KKT conditions are

    G a = 1 / a  (element-wise),   G = Gram matrix of the g_i,  a > 0,
    so g_i . d = 1 / a_i > 0 (every player improves) and |d|^2 = a^T G a = K.

Two players, c = cos(g_1, g_2): multiplying row i by a_i and subtracting gives
a_1 |g_1| = a_2 |g_2|, and then

    a_i = 1 / (|g_i| sqrt(1 + c)),   d = (g_1/|g_1| + g_2/|g_2|) / sqrt(1 + c),   |d| = sqrt(2).

(The paper supplement's "simplified" a_f = sqrt(sin^2(phi)(1 - cos(phi))) / |g_f| is sin^2(phi)
times this value and is wrong; it is not used here.) More players have no closed form: we
solve G a = 1/a by Newton's method on the convex potential 1/2 a^T G a - sum log a_i.

What users must know:
  * d depends only on the unit gradients, so any positive scale on a loss (a loss weight, the
    reference code's ``beta``, the 1/N of gradient accumulation) cancels: only the learning
    rate sets the step length.
  * |d| = sqrt(K), so gradient clipping at max_norm=1.0 (the paper's setting) always binds on a
    bargained two-player step; the effective update norm is then exactly 1.

Infeasible games follow one documented rule (``solve_nash_bargaining``):
  * a player whose gradient is exactly zero has no proposal and leaves the game; the others
    bargain among themselves (one player alone gets a = 1/|g|, i.e. its unit gradient);
  * if no direction improves every remaining player (two players: 1 + c <= ``opposed_tol``;
    more: the Newton solve finds no positive solution), the step follows ``fallback_player``
    alone (default 0, the retain player: when the objectives truly conflict, protect the model),
    or is skipped when ``fallback_player`` is None;
  * non-finite gradients skip the step.
Every outcome is reported in a ``BargainingStatus``; nothing returns NaN, inf or a negative
weight.

Bargaining power (asymmetric Nash bargaining). With powers w_i > 0 the direction maximises
sum_i w_i log(g_i . d); the KKT conditions of d = sum_i a_i g_i become

    a_i (G a)_i = w_i,   so g_i . d = w_i / a_i > 0 and |d|^2 = a^T G a = sum_i w_i.

In unit-gradient coordinates x_i = a_i |g_i| (C the cosine matrix): x_i (C x)_i = w_i. Two
players, c = cos, rho = w_2 / w_1, t = x_2 / x_1: dividing the two equations gives
t (c + t) / (1 + c t) = rho, i.e.

    t^2 + c (1 - rho) t - rho = 0,   t = (-c(1 - rho) + sqrt(c^2 (1 - rho)^2 + 4 rho)) / 2,
    x_1 = sqrt(w_1 / (1 + c t)),   x_2 = t x_1,   d = x_1 (g_1/|g_1| + t g_2/|g_2|).

The product of the roots is -rho < 0, so exactly one root is positive. For c >= 0 both
utilities c + t and 1 + c t are positive; for c < 0 the quadratic is negative at t = |c|
(rho (c^2 - 1)) and positive at t = 1/|c| (1/c^2 - 1), so the root lies in (|c|, 1/|c|) and
again c + t > 0 and 1 + c t > 0: every player still improves. rho = 1 gives t = 1, plain MUNBa
(and w = 1 runs exactly the equal-power code, bitwise). The root is taken in the form without
cancellation (2 rho / (q + sqrt(q^2 + 4 rho)) when q = c (1 - rho) > 0). Scaling every power by
s scales d by sqrt(s); only the ratios shape the direction. As rho -> 0 with c < 0, t -> |c|
and d -> u_1 - c u_2: the low-power player is held at zero gain, never sacrificed. More players:
the same Newton solve on 1/2 x^T C x - sum_i w_i log x_i. A player with power exactly 0 is out
of the game (it is not bargained with and gets weight 0); it is not a fallback.

A satisfied player (:class:`SatisfactionRule`): once a smoothed forget loss reaches its target
the forget player has what it came for, yet scale-free bargaining would keep giving it an equal
say (and half of every unit step) while its shrinking gradient turns against retaining. The rule
lowers its power (class default 0: it leaves, and the step follows the retain player's unit
gradient, the same step length as the conflict fallback; the front ends' default
``DEFAULT_SATISFIED_POWER`` = 0.01 keeps it in the game at a small power, so with opposed
gradients the step follows retain without undoing the forgetting) and gives it back when the
loss rises again.

Scale: all math runs on the cosine matrix C = D^-1 G D^-1 (D = diag |g_i|) in float64 on the
host, then a_i = b_i / |g_i|. There are no absolute epsilons, so the weights are right at any
scale of the Gram matrix (tested for norms from 1e-8 to 1e8). ``NashBargainer`` takes per-tensor
norms and dot products on the device in float32 (or the gradients' own float64), copies that
short vector to the host once, and sums it into the K x K Gram in float64 there: no float64
tensor is ever created on the device (Apple MPS has no float64). Only gradients whose element
products underflow float32 (elements below ~1e-19) lose precision.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

DEFAULT_OPPOSED_TOL = 1e-4


class BargainingStatus(str, enum.Enum):
    """How a bargaining step was resolved."""

    OK = "ok"  # the Nash bargaining solution of all players
    NO_PROPOSAL = "no_proposal"  # some player's gradient was zero; the rest bargained
    CONFLICT = "conflict"  # no direction improves every player; fallback player alone
    SKIPPED = "skipped"  # nothing to do: every gradient zero, or conflict with no fallback
    NONFINITE = "nonfinite"  # NaN/inf in a gradient: the step must be skipped


class InfeasibleBargainingError(ValueError):
    """Raised by :func:`nash_bargaining_weights` when the game has no Nash bargaining solution."""

    def __init__(self, message: str, solution: "BargainingSolution"):
        super().__init__(message)
        self.solution = solution
        self.status = solution.status


@dataclass(frozen=True)
class BargainingSolution:
    """Weights (one per player, >= 0, finite) and how they were obtained."""

    weights: List[float]
    status: BargainingStatus
    active: List[bool]  # players that took part in the final bargain

    @property
    def skipped(self) -> bool:
        return self.status in (BargainingStatus.SKIPPED, BargainingStatus.NONFINITE)


def _two_player_ratio(c: float, rho: float) -> float:
    """The positive root t of t^2 + c (1 - rho) t - rho = 0 (see the module docstring)."""
    q = c * (1.0 - rho)
    root = math.sqrt(q * q + 4.0 * rho)
    return 2.0 * rho / (q + root) if q > 0 else 0.5 * (root - q)


def _solve_cosine_game(cos: List[List[float]], max_iter: int = 100,
                       powers: Optional[List[float]] = None) -> Optional[List[float]]:
    """Positive b with b_i (C b)_i = w_i for a unit-diagonal cosine matrix C, or None if infeasible.

    ``powers`` None means w = 1 (the symmetric game, C b = 1/b). Newton's method on
    f(b) = 1/2 b^T C b - sum_i w_i log b_i (strictly convex on b > 0; bounded below exactly when
    0 is outside the convex hull of the unit gradients, i.e. when the game is feasible, whatever
    the powers), with backtracking that keeps b positive and decreases f.
    """
    k = len(cos)
    uniform = powers is None or all(w == 1.0 for w in powers)
    if k == 1:
        return [1.0] if uniform else [math.sqrt(powers[0])]
    if k == 2:
        one_plus_c = 1.0 + cos[0][1]
        if one_plus_c <= 0.0:
            return None
        if uniform:
            b = 1.0 / math.sqrt(one_plus_c)
            return [b, b]
        c = cos[0][1]
        t = _two_player_ratio(c, powers[1] / powers[0])
        x1 = math.sqrt(powers[0] / (1.0 + c * t))
        return [x1, t * x1]
    c = torch.tensor(cos, dtype=torch.float64)
    total = float(c.sum())
    if total <= 0.0:
        return None  # the mean unit gradient is zero: no common improving direction
    if uniform:
        w = torch.ones(k, dtype=torch.float64)  # w / b and w * log b are then exact: same path
        b = torch.full((k,), math.sqrt(k / total), dtype=torch.float64)
    else:
        w = torch.tensor(powers, dtype=torch.float64)
        s = w.sqrt()
        b = s * math.sqrt(float(w.sum()) / float(s @ c @ s))
    b_start = b.clone()
    b = _newton(c, w, b, max_iter, full_steps_near_solution=False)
    if b is None:
        # The plain Armijo search can stall next to the solution: the potential's decrease
        # (~lambda^2 / 2, lambda^2 = -grad . step the Newton decrement) falls below float64
        # rounding of f, and only tiny steps pass (DESIGN.md). Retry taking full Newton steps in
        # the quadratic phase; games the first pass solves keep their bits exactly.
        b = _newton(c, w, b_start, max_iter, full_steps_near_solution=True)
    return b


def _newton(c: torch.Tensor, w: torch.Tensor, b: torch.Tensor, max_iter: int,
            full_steps_near_solution: bool) -> Optional[List[float]]:
    def potential(x: torch.Tensor) -> float:
        return float(0.5 * x @ c @ x - (w * torch.log(x)).sum())

    def residual(x: torch.Tensor) -> float:
        return float((x * (c @ x) / w - 1.0).abs().max())

    f = potential(b)
    for _ in range(max_iter):
        grad = c @ b - w / b
        if residual(b) < 1e-12:
            return b.tolist()
        hess = c + torch.diag(w / b**2)
        step = torch.linalg.solve(hess, -grad)
        near = full_steps_near_solution and -float(grad @ step) < 1e-2
        t = 1.0
        while True:
            cand = b + t * step
            if bool((cand > 0).all()):
                f_cand = potential(cand)
                if near or f_cand <= f + 1e-4 * t * float(grad @ step):
                    break
            t *= 0.5
            if t < 1e-20:
                return None
        b, f = cand, f_cand
        if float(b.max()) > 1e12:
            return None  # diverging along a ray where sum b_i u_i = 0: infeasible
    return b.tolist() if residual(b) < 1e-9 else None


def _check_powers(powers, k: int) -> Optional[List[float]]:
    if powers is None:
        return None
    w = [float(x) for x in (powers.tolist() if isinstance(powers, torch.Tensor) else powers)]
    if len(w) != k:
        raise ValueError(f"powers must have one entry per player ({k}), got {len(w)}")
    if not all(math.isfinite(x) and x >= 0.0 for x in w):
        raise ValueError(f"bargaining powers must be finite and >= 0, got {w}")
    return w


def solve_nash_bargaining(
    gram: torch.Tensor | Sequence[Sequence[float]],
    *,
    powers: Optional[Sequence[float]] = None,
    opposed_tol: float = DEFAULT_OPPOSED_TOL,
    fallback_player: Optional[int] = 0,
) -> BargainingSolution:
    """Nash bargaining weights for a K x K Gram matrix, with the module's infeasibility rule.

    ``powers``: bargaining powers w_i >= 0 (default all 1, the paper's symmetric game): the
    weights then solve a_i (G a)_i = w_i. A player with power 0 is out of the game (weight 0,
    ``active`` False) without changing the status; if it was the only other player, the rest
    step alone on their own (power-scaled) unit gradient.
    ``opposed_tol`` is the smallest ``1 + cos`` a two-player game may have; below it the
    direction is numerically meaningless (cancellation in g_1/|g_1| + g_2/|g_2|).
    """
    g = torch.as_tensor(gram, dtype=torch.float64).detach().cpu()
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] < 1:
        raise ValueError(f"gram must be a square K x K matrix, got shape {tuple(g.shape)}")
    k = g.shape[0]
    if fallback_player is not None and not 0 <= fallback_player < k:
        raise ValueError(f"fallback_player must be in [0, {k}) or None, got {fallback_player}")
    w = _check_powers(powers, k)
    if not bool(torch.isfinite(g).all()):
        return BargainingSolution([0.0] * k, BargainingStatus.NONFINITE, [False] * k)
    g = 0.5 * (g + g.T)
    diag = g.diagonal().tolist()
    norms = [math.sqrt(x) if x > 0 else 0.0 for x in diag]
    playing = [True] * k if w is None else [x > 0.0 for x in w]
    active = [n > 0 and p for n, p in zip(norms, playing)]
    idx = [i for i in range(k) if active[i]]
    if not idx:
        return BargainingSolution([0.0] * k, BargainingStatus.SKIPPED, active)

    cos = [[max(-1.0, min(1.0, float(g[i, j]) / (norms[i] * norms[j]))) if i != j else 1.0
            for j in idx] for i in idx]
    opposed = len(idx) == 2 and 1.0 + cos[0][1] <= opposed_tol
    sub_w = None if w is None else [w[i] for i in idx]
    b = None if opposed else _solve_cosine_game(cos, powers=sub_w)
    if b is not None:
        weights = [0.0] * k
        for bi, i in zip(b, idx):
            weights[i] = bi / norms[i]
        with_proposal = sum(playing)
        status = BargainingStatus.OK if len(idx) == with_proposal else BargainingStatus.NO_PROPOSAL
        return BargainingSolution(weights, status, active)

    # No direction improves every player with a proposal.
    if fallback_player is None or not active[fallback_player]:
        return BargainingSolution([0.0] * k, BargainingStatus.SKIPPED, [False] * k)
    weights = [0.0] * k
    scale = 1.0 if w is None or w[fallback_player] == 1.0 else math.sqrt(w[fallback_player])
    weights[fallback_player] = scale / norms[fallback_player]
    only = [i == fallback_player for i in range(k)]
    return BargainingSolution(weights, BargainingStatus.CONFLICT, only)


def nash_bargaining_weights(
    gram: torch.Tensor, *, powers: Optional[Sequence[float]] = None,
    opposed_tol: float = DEFAULT_OPPOSED_TOL
) -> torch.Tensor:
    """Positive weights ``a`` with ``a * (gram @ a) == powers`` (default 1: ``gram @ a == 1/a``).

    Returns a tensor of ``gram``'s dtype and device. Raises :class:`InfeasibleBargainingError`
    (its ``.solution`` holds the fallback the rule would use) when some gradient is zero or
    non-finite, some power is 0, or no direction improves every player: it never returns NaN,
    inf or a non-positive weight.
    """
    gram = torch.as_tensor(gram)
    sol = solve_nash_bargaining(gram, powers=powers, opposed_tol=opposed_tol)
    if sol.status is not BargainingStatus.OK or not all(sol.active):
        raise InfeasibleBargainingError(
            f"no Nash bargaining solution for this Gram matrix (status: {sol.status.value})", sol
        )
    dtype = gram.dtype if gram.is_floating_point() else torch.float64
    return torch.tensor(sol.weights, dtype=dtype, device=gram.device)


