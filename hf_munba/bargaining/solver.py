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
solve G a = 1/a by Newton's method on the convex potential 1/2 a^T G a - sum log a_i (the
K-player solve below).

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
    more: 0 in the convex hull of the unit gradients, found by the K-player solve below), the
    step follows ``fallback_player`` alone (default 0, the retain player: when the objectives
    truly conflict, protect the model), or is skipped when ``fallback_player`` is None;
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

The K-player solve (K >= 3). In unit-gradient coordinates b_i = a_i |g_i| the weights minimise

    f(b) = 1/2 b^T C b - sum_i w_i log b_i   over b > 0   (grad f = C b - w / b),

strictly convex (C is a Gram matrix). f is bounded below, and then has exactly one minimiser,
iff x^T C x > 0 for every x >= 0, x != 0: iff 0 is outside the convex hull of the unit
gradients, whatever the powers. Otherwise some x >= 0 has C x = 0 (or x^T C x <= 0); along
b + t x the quadratic part does not grow while -sum_i w_i log(b_i + t x_i) -> -inf: no
solution, and Newton's iterates run off to infinity along such a ray.

Newton in relative coordinates: the step b -> b (1 + t s) solves (B C B + W) s = w - b * (C b)
(B = diag b, W = diag w), the Newton system scaled by B. Its matrix has eigenvalues >= min w
however large b grows, so Cholesky factorises it where the unscaled Hessian C + W B^-2 of a
diverging iterate is singular (which once raised a LinAlgError out of ``combine``).
lambda^2 = (w - b * (C b)) . s is the squared Newton decrement; f is expected to fall by
lambda^2 / 2.

Acceptance rule. b is the solution when (i) the backward error max_i |b_i (C b)_i - w_i| /
(b_i (|C| b)_i) is at most 1e-13 -- the computed b_i (C b)_i carries a rounding error of about
K eps b_i (|C| b)_i, so this is the most that can be asked of a game with nearly opposed
gradients -- and (ii) every equation holds to within w_i / 2 (a game whose hull passes within
1e-6 of 0 has a conditioning ~1e12 and only ~1e-3 relative accuracy in float64; a ray to
infinity always has an equation off by w_i or more, see below). The line search is Armijo
on f with a slack of f's own rounding error, 4 K eps (1/2 b^T |C| b + sum_i w_i |log b_i|): near
the solution lambda^2 / 2 falls below the rounding of f, and a plain Armijo test then rejects
the exact Newton step because f "rose" by rounding (an audit found 4e-16 against a demanded
decrease of 5e-21: the search crawled, stopped just above the threshold and reported a
feasible game as a CONFLICT). A change below rounding is no evidence, so the full step is
taken and Newton's quadratic convergence brings the residual to rounding level. If the
decrement stays at rounding level for four steps without meeting (i), the best iterate is
accepted when its backward error is at most 1e-12.

Infeasibility detection. The game is infeasible when some x >= 0 has
x^T C x <= 8 K eps x^T |C| x, i.e. zero up to the rounding of the computed quadratic form. The
candidates: each pair (e_i + e_j) / 2 (this catches exactly opposed gradients at once: 1 + c_ij
at rounding level), the start, and every Newton iterate x = b / sum(b), before it is tested
as a solution (at a solution x^T C x = sum w / (sum b)^2, so a "solution" that far out is
reported as the certificate it also is). Along an infeasible ray b grows geometrically while
b^T C b stays O(log |b|), so the test fires after a few dozen steps. Condition (ii) keeps such
a ray from being accepted on (i) alone: if C x = 0 with x >= 0 then x^T C b = 0, i.e.
sum_i x_i w_i / b_i = sum_i x_i r_i / b_i (r = w - b * (C b)), so some |r_i| >= w_i. A game is
declared infeasible by a certificate only when its unit gradients' convex hull passes within
sqrt(8 K eps) ~ 1e-7 of 0, where the rounding of the Gram alone can decide feasibility; anything
else that stops Newton (no descent step, no factorisation, 100 steps) also reports "no
solution", which the property tests (tests/test_solver_properties.py) find only in that
rounding band. Infeasible is status CONFLICT, handled by the rule above.

A satisfied player (:class:`SatisfactionRule`): once a smoothed forget loss reaches its target
the forget player has what it came for, yet scale-free bargaining would keep giving it an equal
say (and half of every unit step) while its shrinking gradient turns against retaining. The rule
lowers its power (class default 0: it leaves, and the step follows the retain player's unit
gradient, the same step length as the conflict fallback; the front ends' default
``DEFAULT_SATISFIED_POWER`` = 0.1 keeps it in the game at a small power, so with opposed
gradients the step mostly follows retain and still makes a little forgetting progress, a_f (G a)_f
= 0.1) and gives it back when the loss rises again.

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
from typing import List, NamedTuple, Optional, Sequence

import torch

DEFAULT_OPPOSED_TOL = 1e-4
_EPS = 2.0 ** -52  # float64 machine epsilon
# K >= 3 acceptance (module docstring): the backward error max_i |b_i (C b)_i - w_i| / (b_i (|C| b)_i)
# at rounding level (_RES_TOL; _RES_ACCEPT when Newton stalls there), and every equation within
# _RES_W_MAX * w_i, which an iterate running off to infinity along an infeasible ray never is.
_RES_TOL = 1e-13
_RES_ACCEPT = 1e-12
_RES_W_MAX = 0.5
# Infeasibility certificate: x >= 0 with x^T C x <= _CERT_FACTOR * K * eps * x^T |C| x.
_CERT_FACTOR = 8


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


class _Outcome(NamedTuple):
    """A K-player solve: ``b`` (None when infeasible) and why it ended."""

    b: Optional[List[float]]
    reason: str  # "solved"; "certificate" (x below proves infeasibility); "failed"
    certificate: Optional[List[float]] = None  # x >= 0, sum x = 1, x^T C x = 0 up to rounding


def _solve_cosine_game(cos: List[List[float]], max_iter: int = 100,
                       powers: Optional[List[float]] = None) -> Optional[List[float]]:
    """Positive b with b_i (C b)_i = w_i for a unit-diagonal cosine matrix C, or None if infeasible.

    ``powers`` None means w = 1 (the symmetric game, C b = 1/b); unit powers run the same
    float operations, bit for bit. K >= 3: Newton's method on the potential (module docstring).
    """
    return _cosine_game_outcome(cos, max_iter, powers).b


def _cosine_game_outcome(cos: List[List[float]], max_iter: int = 100,
                         powers: Optional[List[float]] = None) -> _Outcome:
    k = len(cos)
    uniform = powers is None or all(w == 1.0 for w in powers)
    if k == 1:
        return _Outcome([1.0] if uniform else [math.sqrt(powers[0])], "solved")
    if k == 2:
        one_plus_c = 1.0 + cos[0][1]
        if one_plus_c <= 0.0:
            return _Outcome(None, "certificate", [0.5, 0.5])
        if uniform:
            b = 1.0 / math.sqrt(one_plus_c)
            return _Outcome([b, b], "solved")
        c = cos[0][1]
        t = _two_player_ratio(c, powers[1] / powers[0])
        x1 = math.sqrt(powers[0] / (1.0 + c * t))
        return _Outcome([x1, t * x1], "solved")
    c = torch.tensor(cos, dtype=torch.float64)
    tol = _CERT_FACTOR * k * _EPS
    # Pairs first: x = (e_i + e_j) / 2 has x^T C x = (1 + c_ij) / 2, x^T |C| x = (1 + |c_ij|) / 2.
    pair = (1.0 + c) - tol * (1.0 + c.abs())
    i, j = divmod(int(pair.argmin()), k)
    if float(pair[i, j]) <= 0.0:
        x = [0.0] * k
        x[i] = x[j] = 0.5
        return _Outcome(None, "certificate", x)  # (nearly) exactly opposed gradients
    w = torch.ones(k, dtype=torch.float64) if uniform else torch.tensor(powers, dtype=torch.float64)
    s = w.sqrt()  # start along sqrt(w) (the uniform vector for w = 1), scaled so |d|^2 = sum w
    quad = float(s @ c @ s)
    if quad <= tol * float(s @ c.abs() @ s):
        # s / sum(s) is itself a certificate: no common improving direction
        return _Outcome(None, "certificate", (s / s.sum()).tolist())
    b = s * math.sqrt(float(w.sum()) / quad)
    return _newton(c, w, b, max_iter)


def _newton(c: torch.Tensor, w: torch.Tensor, b: torch.Tensor, max_iter: int) -> _Outcome:
    """Damped Newton on f(b) = 1/2 b^T C b - sum_i w_i log b_i in relative steps b (1 + t s).

    Ends once the KKT residual is at rounding level, or when an iterate certifies infeasibility
    (b^T C b <= 8 K eps b^T |C| b), or when no step can be taken (module docstring).
    """
    k = len(w)
    abs_c = c.abs()
    eye = torch.eye(k, dtype=torch.float64)
    best, best_res, stalled = None, math.inf, 0
    for _ in range(max_iter):
        cb = c @ b
        bcb = b * cb
        scale = b * (abs_c @ b)  # b_i (|C| b)_i: the size of the rounding in b_i (C b)_i
        r = w - bcb
        res = float((r.abs() / scale).max())
        if not math.isfinite(res):
            break
        if float(bcb.sum()) <= _CERT_FACTOR * k * _EPS * float(scale.sum()):
            # x = b / sum(b) has x^T C x = 0 up to rounding: f -> -inf along it
            return _Outcome(None, "certificate", (b / b.sum()).tolist())
        sane = float((r.abs() / w).max()) <= _RES_W_MAX
        if sane and res <= _RES_TOL:
            return _Outcome(b.tolist(), "solved")
        if sane and res < best_res:
            best, best_res = b, res
        # Newton step in relative coordinates: (B C B + W) s = w - b * (C b), step = b * s.
        s = _spd_solve(b[:, None] * c * b[None, :] + torch.diag(w), r, eye)
        if s is None:
            break
        lam2 = float(r @ s)  # the Newton decrement squared, -grad . step
        if not lam2 > 0.0:
            break
        f = _potential(w, b, cb)
        # what rounding alone can change f by: a decrease below it is no evidence either way
        slack = 4 * k * _EPS * (0.5 * float(scale.sum()) + float((w * b.log().abs()).sum()))
        t = 1.0
        low = float(s.min())
        if low <= -1.0:
            t = 0.5 / -low  # stay inside b > 0 (halfway to the boundary)
        while True:
            cand = b * (1.0 + t * s)
            if bool((cand > 0).all()):
                if _potential(w, cand, c @ cand) <= f - 1e-4 * t * lam2 + slack:
                    break
            t *= 0.5
            if t < 1e-12:
                cand = None
                break
        if cand is None:
            break
        b = cand
        # the decrement at rounding level next to a solution: nothing left to gain (an iterate
        # running off along an infeasible direction is never next to one: it ends on the test above)
        stalled = stalled + 1 if sane and lam2 <= slack else 0
        if stalled > 3:
            break
    if best is not None and best_res <= _RES_ACCEPT:
        return _Outcome(best.tolist(), "solved")
    return _Outcome(None, "failed")


def _potential(w, b, cb) -> float:
    return float(0.5 * (b @ cb) - (w * b.log()).sum())


def _spd_solve(m: torch.Tensor, r: torch.Tensor, eye: torch.Tensor) -> Optional[torch.Tensor]:
    """m^-1 r for symmetric m by Cholesky; m is positive definite for a Gram (PSD) C. A C that
    rounding (or a non-Gram input) left indefinite gets the smallest diagonal shift that works."""
    shift = 0.0
    scale = float(m.diagonal().max())
    for _ in range(8):
        factor, info = torch.linalg.cholesky_ex(m + shift * eye if shift else m)
        if int(info) == 0:
            s = torch.cholesky_solve(r[:, None], factor)[:, 0]
            if bool(torch.isfinite(s).all()):
                return s
        shift = scale * (1e-14 if shift == 0.0 else 1e3 * shift / scale)
    return None


def _every_player_gains(g: torch.Tensor, idx: List[int], a: List[float]) -> bool:
    """Does every active player gain, (G a)_i > 0, on the float64 Gram itself?

    The solve runs on cosines; mapping its weights back through the norms rounds again. On a game
    inside the rounding band (0 within rounding of the unit gradients' hull) a player's gain can
    then come out of the float64 Gram as a tiny negative number on one machine's BLAS and positive
    on another's: such a game has no numerically meaningful common improving direction, so it is
    treated as infeasible instead of returning weights under which a player loses.
    """
    sub = g[idx][:, idx]
    av = torch.tensor(a, dtype=torch.float64)
    return bool((sub @ av > 0).all())


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
    if b is not None and not _every_player_gains(g, idx, [x / norms[i] for x, i in zip(b, idx)]):
        b = None  # solved in cosines, but in the Gram's own units a player's gain is rounding
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


