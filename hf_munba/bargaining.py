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

import contextlib
import enum
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "BargainingStatus",
    "SatisfactionRule",
    "NashWeighting",
    "DEFAULT_FORGET_TARGETS",
    "default_forget_target",
    "build_forget_rule",
    "DEFAULT_SATISFIED_POWER",
    "BargainingSolution",
    "InfeasibleBargainingError",
    "solve_nash_bargaining",
    "nash_bargaining_weights",
    "BargainStats",
    "NashBargainer",
]

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


class NashWeighting:
    """Gram matrix -> weights, TorchJD style (``weighting(gram)``): the solve, with its settings.

    ``NashWeighting(powers=[1.0, 0.5])(G)`` returns the same tensor as
    ``nash_bargaining_weights(G, powers=[1.0, 0.5])``; ``solution(G)`` returns the full
    :class:`BargainingSolution` with the infeasibility rule applied instead of raising.
    """

    def __init__(self, powers: Optional[Sequence[float]] = None, *,
                 opposed_tol: float = DEFAULT_OPPOSED_TOL, fallback_player: Optional[int] = 0):
        self.powers = None if powers is None else [float(x) for x in powers]
        self.opposed_tol = opposed_tol
        self.fallback_player = fallback_player

    def __call__(self, gram: torch.Tensor) -> torch.Tensor:
        return nash_bargaining_weights(gram, powers=self.powers, opposed_tol=self.opposed_tol)

    def solution(self, gram) -> BargainingSolution:
        return solve_nash_bargaining(gram, powers=self.powers, opposed_tol=self.opposed_tol,
                                     fallback_player=self.fallback_player)

    def __repr__(self) -> str:
        return (f"NashWeighting(powers={self.powers}, opposed_tol={self.opposed_tol}, "
                f"fallback_player={self.fallback_player})")


@dataclass
class BargainStats:
    """What one bargaining step did; plain Python numbers, ready for a tracker."""

    status: BargainingStatus
    weights: List[float]
    norms: List[float]
    gram: List[List[float]] = field(repr=False)
    powers: Optional[List[float]] = None  # None: every player had power 1

    @property
    def skipped(self) -> bool:
        """True when the optimizer step must not move the weights."""
        return self.status in (BargainingStatus.SKIPPED, BargainingStatus.NONFINITE)

    @property
    def cos(self) -> Optional[float]:
        """cos(g_1, g_2) for a two-player game (None if a gradient is zero or non-finite)."""
        if len(self.norms) != 2 or not all(n > 0 and math.isfinite(n) for n in self.norms):
            return None
        return self.gram[0][1] / (self.norms[0] * self.norms[1])

    def to_log_dict(self, names: Sequence[str] = ("retain", "forget"), prefix: str = "munba/"):
        out = {f"{prefix}skipped": float(self.skipped)}
        for i, (w, n) in enumerate(zip(self.weights, self.norms)):
            name = names[i] if i < len(names) else str(i)
            out[f"{prefix}weight_{name}"] = w
            out[f"{prefix}grad_norm_{name}"] = n
        if self.cos is not None:
            out[f"{prefix}cos"] = self.cos
        out[f"{prefix}fallback"] = float(self.status is not BargainingStatus.OK)
        for i, w in enumerate(self.powers or [1.0] * len(self.weights)):
            name = names[i] if i < len(names) else str(i)
            out[f"{prefix}power_{name}"] = w
        return out


class NashBargainer:
    """Combines per-player gradients of ``params`` into their Nash bargaining direction, in place.

    Usage, once per optimizer step (any number of micro-batches per player)::

        with bargainer.player(0):
            accelerator.backward(retain_loss)
        with bargainer.player(1):
            accelerator.backward(forget_loss)
        if accelerator.sync_gradients:
            stats = bargainer.combine(grad_scale=...)
            ...clip, optimizer.step() unless stats.skipped and no GradScaler..., zero_grad

    ``player(i)`` points each ``p.grad`` at player i's running gradient before the backward
    pass, so autograd (and DDP's all-reduce of the accumulated gradient) accumulates into it
    with no copy; gradient accumulation therefore bargains once, on the accumulated gradients.
    ``combine`` forms the K x K Gram with fused norms and per-tensor dot products (no flattened
    copy), solves it on the host (one device sync, which the logged statistics need anyway),
    and writes sum_i a_i g_i into ``p.grad`` in place, reusing player 0's buffers.

    ``grad_scale``: with fp16 loss scaling every player gradient carries the scale S while the
    bargained direction is scale-free, so the result is multiplied by S again for the scaler's
    unscale step. On non-finite gradients ``.grad`` receives the plain sum (so a GradScaler sees
    the inf and backs off) and ``stats.skipped`` is True: callers without a scaler must not step.

    ``all_reduce_gram``: for sharded gradients (each rank holds a slice of every gradient) the
    Gram is summed over ``process_group`` with one all-reduce. With DDP, gradients are already
    averaged during backward and this must stay False.

    ``powers``: default bargaining powers (see the module docstring; None = all 1, the paper);
    ``combine(powers=...)`` overrides them for one step (e.g. from a :class:`SatisfactionRule`).
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        num_players: int = 2,
        *,
        opposed_tol: float = DEFAULT_OPPOSED_TOL,
        fallback_player: Optional[int] = 0,
        all_reduce_gram: bool = False,
        process_group=None,
        powers: Optional[Sequence[float]] = None,
    ):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("NashBargainer got no parameters that require grad")
        if num_players < 2:
            raise ValueError(f"bargaining needs at least two players, got {num_players}")
        if fallback_player is not None and not 0 <= fallback_player < num_players:
            raise ValueError(f"fallback_player must be in [0, {num_players}) or None")
        self.num_players = num_players
        self.opposed_tol = opposed_tol
        self.fallback_player = fallback_player
        self.all_reduce_gram = all_reduce_gram
        self.process_group = process_group
        self.powers = _check_powers(powers, num_players)  # default for combine(); None = all 1
        self._grads: List[List[Optional[torch.Tensor]]] = [
            [None] * len(self.params) for _ in range(num_players)
        ]
        self._active: Optional[int] = None
        self.num_steps = 0
        self.num_skipped = 0
        self.num_fallbacks = 0

    @contextlib.contextmanager
    def player(self, index: int) -> Iterator[None]:
        """Backward passes inside this block accumulate into player ``index``'s gradient."""
        if not 0 <= index < self.num_players:
            raise ValueError(f"player index must be in [0, {self.num_players}), got {index}")
        if self._active is not None:
            raise RuntimeError("NashBargainer.player() blocks cannot be nested")
        store = self._grads[index]
        owned = {id(t) for buf in self._grads for t in buf if t is not None}
        for j, p in enumerate(self.params):
            if p.grad is not None and id(p.grad) not in owned:
                raise RuntimeError(
                    "a bargained parameter already has a .grad outside any player; call "
                    "optimizer.zero_grad(set_to_none=True) after each optimizer step"
                )
            p.grad = store[j]
        self._active = index
        try:
            yield
        finally:
            for j, p in enumerate(self.params):
                store[j] = p.grad
                p.grad = None
            self._active = None

    def _device_gram_terms(self) -> Tuple[torch.Tensor, List[Tuple[int, int, int]]]:
        """Per-tensor norms (diagonal) and dot products (off-diagonal) of the player gradients,
        concatenated into one vector on the device, in float32 (float64 only if the gradients
        are); plus (i, j, length) for each Gram entry's segment. Nothing float64 is made on the
        device for float32/bf16/fp16 gradients: Apple MPS has no float64. With
        ``all_reduce_gram`` the diagonal terms are squared norms, so the vector can be summed
        over ranks as is."""
        k = self.num_players
        parts: List[torch.Tensor] = []
        segments: List[Tuple[int, int, int]] = []
        for i in range(k):
            present = [g for g in self._grads[i] if g is not None]
            if present:
                norms = torch.stack(torch._foreach_norm(present, 2, dtype=torch.float32))
                parts.append(norms.square() if self.all_reduce_gram else norms)
                segments.append((i, i, len(present)))
            for j in range(i + 1, k):
                dots = [
                    torch.dot(_flat32(a), _flat32(b))
                    for a, b in zip(self._grads[i], self._grads[j])
                    if a is not None and b is not None
                ]
                if dots:
                    parts.append(torch.stack(dots))
                    segments.append((i, j, len(dots)))
        if not parts:
            return torch.zeros(0, device=self.params[0].device), segments
        dtype = torch.promote_types(torch.float32, max((p.dtype for p in parts),
                                                       key=lambda d: torch.finfo(d).bits))
        return torch.cat([p.to(dtype) for p in parts]), segments

    def _gram(self) -> List[List[float]]:
        """The K x K Gram in float64 on the host (the step's one device -> host copy)."""
        k = self.num_players
        terms, segments = self._device_gram_terms()
        if self.all_reduce_gram:
            torch.distributed.all_reduce(terms, group=self.process_group)
        host = terms.cpu()
        gram = [[0.0] * k for _ in range(k)]
        start = 0
        for i, j, n in segments:
            seg = host[start:start + n].double()
            start += n
            if i == j:
                value = seg.sum() if self.all_reduce_gram else seg.square().sum()
                gram[i][i] = float(value)
            else:
                gram[i][j] = gram[j][i] = float(seg.sum())
        return gram

    @torch.no_grad()
    def combine(self, grad_scale: Optional[float | torch.Tensor] = None,
                powers: Optional[Sequence[float]] = None) -> BargainStats:
        """Write the bargained gradient into each parameter's ``.grad`` and return statistics.

        ``powers`` overrides the bargainer's default powers for this step (validated first, so
        a bad value raises before any buffer is touched)."""
        if self._active is not None:
            raise RuntimeError("combine() called inside a player() block")
        powers = self.powers if powers is None else _check_powers(powers, self.num_players)
        gram = self._gram()  # the step's one host sync
        sol = solve_nash_bargaining(
            gram, powers=powers, opposed_tol=self.opposed_tol, fallback_player=self.fallback_player
        )
        norms = [math.sqrt(gram[i][i]) if gram[i][i] >= 0 else float("nan")
                 for i in range(self.num_players)]
        scale = 1.0
        if grad_scale is not None:
            scale = float(grad_scale)
        weights = sol.weights
        if sol.status is BargainingStatus.NONFINITE:
            apply = [1.0] * self.num_players  # the raw sum keeps the inf for a GradScaler
        else:
            apply = [w * scale for w in weights]
        self._write(apply)
        self.num_steps += 1
        self.num_skipped += int(sol.skipped)
        self.num_fallbacks += int(sol.status is not BargainingStatus.OK)
        return BargainStats(sol.status, list(weights), norms, gram,
                            None if powers is None else list(powers))

    def _write(self, weights: Sequence[float]) -> None:
        # Group parameters by which players have a gradient for them, then one foreach op each.
        out: List[Optional[torch.Tensor]] = [None] * len(self.params)
        for i, w in enumerate(weights):
            idx = [j for j, g in enumerate(self._grads[i]) if g is not None]
            if not idx:
                continue
            first = [j for j in idx if out[j] is None]
            rest = [j for j in idx if out[j] is not None]
            if first:
                tensors = [self._grads[i][j] for j in first]
                torch._foreach_mul_(tensors, w)
                for j, t in zip(first, tensors):
                    out[j] = t
            if rest and w != 0.0:
                torch._foreach_add_([out[j] for j in rest], [self._grads[i][j] for j in rest],
                                    alpha=w)
        for i in range(self.num_players):
            self._grads[i] = [None] * len(self.params)
        for p, g in zip(self.params, out):
            p.grad = g

    def reset(self) -> None:
        """Drop any recorded player gradients (e.g. after an aborted step)."""
        for i in range(self.num_players):
            self._grads[i] = [None] * len(self.params)


# Default satisfaction target per forget objective: (target, mode), or None for no target (the
# paper's plain rule). Chosen for what each loss does once forgetting is done:
#   remap / esd (SD): an MSE to a target prediction that falls towards 0 as the concept is
#     remapped: "smoothed loss at a quarter of its first steps' value" is scale-free and, on the
#     digits testbed, reached soon after the forgotten prompt stops producing its class
#     (docs/digits.md has the curves);
#   ga (SD) and neg_ce (classifiers): a negated loss, unbounded below, with no level that means
#     "done" (and negative, so a relative target is meaningless): no default target;
#   random_label (classifiers): cross-entropy against labels redrawn every batch cannot fall
#     below ~log(C - 1) however well the class is forgotten, so a fraction of its first value is
#     either unreachable or arbitrary: no default target (set an absolute one, e.g. log C).
DEFAULT_FORGET_TARGETS: Dict[str, Optional[Tuple[float, str]]] = {
    "remap": (0.25, "relative"),
    "esd": (0.25, "relative"),
    "ga": None,
    "neg_ce": None,
    "random_label": None,
}


def default_forget_target(objective: str) -> Optional[Tuple[float, str]]:
    """``(target, mode)`` the front ends use for ``objective`` when none is given, or None."""
    if objective not in DEFAULT_FORGET_TARGETS:
        raise ValueError(f"no default forget target for objective {objective!r}; known: "
                         f"{sorted(DEFAULT_FORGET_TARGETS)}")
    return DEFAULT_FORGET_TARGETS[objective]


# The front ends' power for a satisfied forget player. Not 0 (leaving): on the digits testbed a
# forget player that left regressed (forget "seven", LoRA: 0% -> 30% forget accuracy by the end,
# its loss still inside the hysteresis band), while a small power kept forgetting at 0% with the
# same retained accuracy (docs/digits.md). With cos(g_r, g_f) < 0 and w_f -> 0 the step tends to
# the retain direction with the forget player held at zero first-order gain (t -> |c|): it
# follows retain without undoing the forgetting; with cos > 0 it is retain's direction alone.
DEFAULT_SATISFIED_POWER = 0.01

# Objectives whose loss is negated (unbounded below, negative): a relative target is meaningless.
NEGATED_OBJECTIVES = ("ga", "neg_ce")


def build_forget_rule(objective: str, *, target: Optional[float] = None,
                      mode: Optional[str] = None, ema: float = 0.9, hysteresis: float = 1.5,
                      reference_steps: int = 1,
                      satisfied_power: float = DEFAULT_SATISFIED_POWER,
                      power: float = 1.0) -> Optional["SatisfactionRule"]:
    """The forget player's :class:`SatisfactionRule` as both front ends configure it, or None.

    ``target``/``mode`` None take the objective's default (:data:`DEFAULT_FORGET_TARGETS`); an
    objective without a default gets no rule unless a target is given. A relative target on a
    negated loss (``ga``, ``neg_ce``) is refused with one clear error.
    """
    default = default_forget_target(objective)
    if target is None:
        if default is None:
            return None
        target = default[0]
        mode = mode or default[1]
    mode = mode or (default[1] if default is not None else "absolute")
    if mode == "relative" and objective in NEGATED_OBJECTIVES:
        raise ValueError(f"a relative forget target needs a positive loss, but the {objective!r} "
                         "forget loss is negated (unbounded below); give an absolute target "
                         "(mode 'absolute') or none")
    return SatisfactionRule(target, mode=mode, ema=ema, hysteresis=hysteresis,
                            reference_steps=reference_steps, satisfied_power=satisfied_power,
                            power=power)


class SatisfactionRule:
    """When is a player done? An EMA of its loss against a target, with hysteresis.

    Call :meth:`update` once per optimizer step with the step's loss (averaged over the
    micro-batches of gradient accumulation, and over ranks: pass ``all_reduce=True`` under DDP,
    or a value the caller already reduced), *before* bargaining; it returns the player's power
    for that step:

      * EMA: m_1 = L_1, m_n = ema * m_{n-1} + (1 - ema) * L_n (default ema 0.9);
      * target T: ``target`` itself (``mode='absolute'``) or ``target`` times the reference,
        the mean loss of the first ``reference_steps`` steps (``mode='relative'``, default: a
        quarter of the first value; scale-free like MUNBa: any positive scale on the loss
        cancels). Until the reference is known the player is never satisfied;
      * satisfied when m_n <= T; satisfied players get ``satisfied_power`` (default 0: the
        player leaves the game and the step follows the others alone); it comes back when
        m_n > ``hysteresis`` * T (default 1.5). The band between T and hysteresis * T, plus the
        EMA's smoothing, keeps the decision from flipping step to step;
      * before the target is first reached the power is ``power`` (default 1), so nothing
        changes until then; non-finite losses (skipped steps) leave the state untouched.

    Every rank must take the same decision: with DDP the loss is reduced over ranks before the
    EMA (identical float on every rank, so identical decisions). Under gradient accumulation the
    rule decides once per optimizer step, on the micro-batch mean. The state is plain floats
    (:meth:`state_dict` / :meth:`load_state_dict`, JSON-safe and exact) for checkpoints.
    ``mode='relative'`` needs a positive reference: if the first losses are <= 0 (a negated
    loss) the rule is inert (never satisfied) and ``inert`` says so.
    """

    MODES = ("relative", "absolute")

    def __init__(self, target: float = 0.25, *, mode: str = "relative", ema: float = 0.9,
                 hysteresis: float = 1.5, reference_steps: int = 1,
                 satisfied_power: float = 0.0, power: float = 1.0):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if not math.isfinite(target) or (mode == "relative" and target <= 0):
            raise ValueError(f"a relative target must be a positive finite fraction, got {target}")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        if not (math.isfinite(hysteresis) and hysteresis >= 1.0):
            raise ValueError(f"hysteresis must be a finite factor >= 1, got {hysteresis}")
        if reference_steps < 1:
            raise ValueError(f"reference_steps must be >= 1, got {reference_steps}")
        if not (math.isfinite(satisfied_power) and satisfied_power >= 0.0):
            raise ValueError(f"satisfied_power must be finite and >= 0, got {satisfied_power}")
        if not (math.isfinite(power) and power > 0.0):
            raise ValueError(f"power must be finite and > 0, got {power}")
        if satisfied_power >= power:
            raise ValueError(f"satisfied_power ({satisfied_power}) must be below power ({power})")
        self.target, self.mode, self.ema = float(target), mode, float(ema)
        self.hysteresis, self.reference_steps = float(hysteresis), int(reference_steps)
        self.satisfied_power, self.base_power = float(satisfied_power), float(power)
        self.steps = 0  # finite losses seen
        self.ema_value: Optional[float] = None
        self.reference: Optional[float] = None
        self._reference_sum = 0.0
        self.satisfied = False
        self.times_satisfied = 0  # how often the player left (or was lowered)
        self.last_change_step: Optional[int] = None

    def __repr__(self) -> str:
        return (f"SatisfactionRule(target={self.target}, mode={self.mode!r}, ema={self.ema}, "
                f"hysteresis={self.hysteresis}, reference_steps={self.reference_steps}, "
                f"satisfied_power={self.satisfied_power}, power={self.base_power})")

    @property
    def threshold(self) -> Optional[float]:
        """The target value T of the EMA (None until a relative reference is known)."""
        if self.mode == "absolute":
            return self.target
        if self.reference is None or self.reference <= 0:
            return None
        return self.target * self.reference

    @property
    def inert(self) -> bool:
        """True when a relative rule met a non-positive reference and can never fire."""
        return self.mode == "relative" and self.reference is not None and self.reference <= 0

    @property
    def power(self) -> float:
        return self.satisfied_power if self.satisfied else self.base_power

    def update(self, loss, *, all_reduce: bool = False, process_group=None) -> float:
        """Feed this optimizer step's loss; returns the power for this step.

        ``loss``: a float or a scalar tensor. ``all_reduce=True`` averages it over the ranks of
        ``process_group`` first (a no-op without an initialised process group), so every rank
        sees the same number; the tensor stays on its device (NCCL needs CUDA tensors).
        """
        if isinstance(loss, torch.Tensor):
            t = loss.detach().reshape(()).float()
            if all_reduce and torch.distributed.is_available() and torch.distributed.is_initialized():
                t = t.clone()
                torch.distributed.all_reduce(t, group=process_group)
                t = t / torch.distributed.get_world_size(process_group)
            value = float(t)
        else:
            value = float(loss)
            if all_reduce and torch.distributed.is_available() and torch.distributed.is_initialized():
                return self.update(torch.tensor(value), all_reduce=True, process_group=process_group)
        if not math.isfinite(value):
            return self.power
        self.steps += 1
        self.ema_value = value if self.ema_value is None else (
            self.ema * self.ema_value + (1.0 - self.ema) * value)
        if self.mode == "relative" and self.reference is None:
            self._reference_sum += value
            if self.steps >= self.reference_steps:
                self.reference = self._reference_sum / self.reference_steps
        threshold = self.threshold
        if threshold is not None:
            if not self.satisfied and self.ema_value <= threshold:
                self.satisfied = True
                self.times_satisfied += 1
                self.last_change_step = self.steps
            elif self.satisfied and self.ema_value > self.hysteresis * threshold:
                self.satisfied = False
                self.last_change_step = self.steps
        return self.power

    def log_dict(self, name: str = "forget", prefix: str = "munba/") -> Dict[str, float]:
        """What trackers and history.jsonl record each step."""
        out = {f"{prefix}{name}_satisfied": float(self.satisfied),
               f"{prefix}{name}_times_satisfied": float(self.times_satisfied)}
        if self.ema_value is not None:
            out[f"{prefix}{name}_loss_ema"] = self.ema_value
        if self.threshold is not None:
            out[f"{prefix}{name}_target"] = self.threshold
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {"steps": self.steps, "ema_value": self.ema_value, "reference": self.reference,
                "reference_sum": self._reference_sum, "satisfied": self.satisfied,
                "times_satisfied": self.times_satisfied,
                "last_change_step": self.last_change_step,
                "config": {"target": self.target, "mode": self.mode, "ema": self.ema,
                           "hysteresis": self.hysteresis, "reference_steps": self.reference_steps,
                           "satisfied_power": self.satisfied_power, "power": self.base_power}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        cfg = state.get("config")
        mine = self.state_dict()["config"]
        if cfg is not None and cfg != mine:
            raise ValueError(f"the checkpoint's satisfaction rule {cfg} differs from this run's "
                             f"{mine}; resume with the same settings")
        self.steps = int(state["steps"])
        self.ema_value = None if state["ema_value"] is None else float(state["ema_value"])
        self.reference = None if state["reference"] is None else float(state["reference"])
        self._reference_sum = float(state["reference_sum"])
        self.satisfied = bool(state["satisfied"])
        self.times_satisfied = int(state["times_satisfied"])
        lc = state.get("last_change_step")
        self.last_change_step = None if lc is None else int(lc)


def _flat32(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1)
    return t if t.dtype in (torch.float32, torch.float64) else t.float()
