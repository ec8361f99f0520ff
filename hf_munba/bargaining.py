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

Scale: all math runs on the cosine matrix C = D^-1 G D^-1 (D = diag |g_i|) in float64 on the
host, then a_i = b_i / |g_i|. There are no absolute epsilons, so the weights are right at any
scale of the Gram matrix (tested for norms from 1e-8 to 1e8). ``NashBargainer`` takes per-tensor
dot products in the gradients' own dtype (float32 for fp32 master weights), so only gradients
whose element products underflow float32 (elements below ~1e-19) lose precision.
"""

from __future__ import annotations

import contextlib
import enum
import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator, List, Optional, Sequence

import torch

__all__ = [
    "BargainingStatus",
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


def _solve_cosine_game(cos: List[List[float]], max_iter: int = 100) -> Optional[List[float]]:
    """Positive b with C b = 1/b for a unit-diagonal cosine matrix C, or None if infeasible.

    Newton's method on f(b) = 1/2 b^T C b - sum log b (strictly convex on b > 0; bounded below
    exactly when 0 is outside the convex hull of the unit gradients, i.e. when the game is
    feasible), with backtracking that keeps b positive and decreases f.
    """
    k = len(cos)
    if k == 1:
        return [1.0]
    if k == 2:
        one_plus_c = 1.0 + cos[0][1]
        if one_plus_c <= 0.0:
            return None
        b = 1.0 / math.sqrt(one_plus_c)
        return [b, b]
    c = torch.tensor(cos, dtype=torch.float64)
    total = float(c.sum())
    if total <= 0.0:
        return None  # the mean unit gradient is zero: no common improving direction
    b = torch.full((k,), math.sqrt(k / total), dtype=torch.float64)

    def potential(x: torch.Tensor) -> float:
        return float(0.5 * x @ c @ x - torch.log(x).sum())

    f = potential(b)
    for _ in range(max_iter):
        grad = c @ b - 1.0 / b
        if float((b * (c @ b) - 1.0).abs().max()) < 1e-12:
            return b.tolist()
        hess = c + torch.diag(1.0 / b**2)
        step = torch.linalg.solve(hess, -grad)
        t = 1.0
        while True:
            cand = b + t * step
            if bool((cand > 0).all()):
                f_cand = potential(cand)
                if f_cand <= f + 1e-4 * t * float(grad @ step):
                    break
            t *= 0.5
            if t < 1e-20:
                return None
        b, f = cand, f_cand
        if float(b.max()) > 1e12:
            return None  # diverging along a ray where sum b_i u_i = 0: infeasible
    return b.tolist() if float((b * (c @ b) - 1.0).abs().max()) < 1e-9 else None


def solve_nash_bargaining(
    gram: torch.Tensor | Sequence[Sequence[float]],
    *,
    opposed_tol: float = DEFAULT_OPPOSED_TOL,
    fallback_player: Optional[int] = 0,
) -> BargainingSolution:
    """Nash bargaining weights for a K x K Gram matrix, with the module's infeasibility rule.

    ``opposed_tol`` is the smallest ``1 + cos`` a two-player game may have; below it the
    direction is numerically meaningless (cancellation in g_1/|g_1| + g_2/|g_2|).
    """
    g = torch.as_tensor(gram, dtype=torch.float64).detach().cpu()
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] < 1:
        raise ValueError(f"gram must be a square K x K matrix, got shape {tuple(g.shape)}")
    k = g.shape[0]
    if fallback_player is not None and not 0 <= fallback_player < k:
        raise ValueError(f"fallback_player must be in [0, {k}) or None, got {fallback_player}")
    if not bool(torch.isfinite(g).all()):
        return BargainingSolution([0.0] * k, BargainingStatus.NONFINITE, [False] * k)
    g = 0.5 * (g + g.T)
    diag = g.diagonal().tolist()
    norms = [math.sqrt(x) if x > 0 else 0.0 for x in diag]
    active = [n > 0 for n in norms]
    idx = [i for i in range(k) if active[i]]
    if not idx:
        return BargainingSolution([0.0] * k, BargainingStatus.SKIPPED, active)

    cos = [[max(-1.0, min(1.0, float(g[i, j]) / (norms[i] * norms[j]))) if i != j else 1.0
            for j in idx] for i in idx]
    opposed = len(idx) == 2 and 1.0 + cos[0][1] <= opposed_tol
    b = None if opposed else _solve_cosine_game(cos)
    if b is not None:
        weights = [0.0] * k
        for bi, i in zip(b, idx):
            weights[i] = bi / norms[i]
        status = BargainingStatus.OK if len(idx) == k else BargainingStatus.NO_PROPOSAL
        return BargainingSolution(weights, status, active)

    # No direction improves every player with a proposal.
    if fallback_player is None or not active[fallback_player]:
        return BargainingSolution([0.0] * k, BargainingStatus.SKIPPED, [False] * k)
    weights = [0.0] * k
    weights[fallback_player] = 1.0 / norms[fallback_player]
    only = [i == fallback_player for i in range(k)]
    return BargainingSolution(weights, BargainingStatus.CONFLICT, only)


def nash_bargaining_weights(
    gram: torch.Tensor, *, opposed_tol: float = DEFAULT_OPPOSED_TOL
) -> torch.Tensor:
    """Positive weights ``a`` with ``gram @ a == 1 / a`` (the Nash bargaining solution).

    Returns a tensor of ``gram``'s dtype and device. Raises :class:`InfeasibleBargainingError`
    (its ``.solution`` holds the fallback the rule would use) when some gradient is zero or
    non-finite, or when no direction improves every player: it never returns NaN, inf or a
    non-positive weight.
    """
    gram = torch.as_tensor(gram)
    sol = solve_nash_bargaining(gram, opposed_tol=opposed_tol)
    if sol.status is not BargainingStatus.OK:
        raise InfeasibleBargainingError(
            f"no Nash bargaining solution for this Gram matrix (status: {sol.status.value})", sol
        )
    dtype = gram.dtype if gram.is_floating_point() else torch.float64
    return torch.tensor(sol.weights, dtype=dtype, device=gram.device)


@dataclass
class BargainStats:
    """What one bargaining step did; plain Python numbers, ready for a tracker."""

    status: BargainingStatus
    weights: List[float]
    norms: List[float]
    gram: List[List[float]] = field(repr=False)

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

    def _gram(self) -> torch.Tensor:
        k = self.num_players
        device = self.params[0].device
        gram = torch.zeros(k, k, dtype=torch.float64, device=device)
        for i in range(k):
            present = [g for g in self._grads[i] if g is not None]
            if present:
                norms = torch._foreach_norm(present, 2, dtype=torch.float32)
                gram[i, i] = torch.stack(norms).double().square().sum()
            for j in range(i + 1, k):
                dots = [
                    torch.dot(_flat32(a), _flat32(b))
                    for a, b in zip(self._grads[i], self._grads[j])
                    if a is not None and b is not None
                ]
                if dots:
                    gram[i, j] = gram[j, i] = torch.stack(dots).double().sum()
        if self.all_reduce_gram:
            torch.distributed.all_reduce(gram, group=self.process_group)
        return gram

    @torch.no_grad()
    def combine(self, grad_scale: Optional[float | torch.Tensor] = None) -> BargainStats:
        """Write the bargained gradient into each parameter's ``.grad`` and return statistics."""
        if self._active is not None:
            raise RuntimeError("combine() called inside a player() block")
        gram_t = self._gram()
        gram = gram_t.cpu().tolist()  # the step's one host sync
        sol = solve_nash_bargaining(
            gram, opposed_tol=self.opposed_tol, fallback_player=self.fallback_player
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
        return BargainStats(sol.status, list(weights), norms, gram)

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


def _flat32(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1)
    return t if t.dtype in (torch.float32, torch.float64) else t.float()
