"""The in-place bargainer: per-player gradient buffers on the trained parameters, one combine per step."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from .combiners import NashWeighting, Weighting
from .solver import DEFAULT_OPPOSED_TOL, BargainingStatus, _check_powers, solve_nash_bargaining

__all__ = ["BargainStats", "NashBargainer"]


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
        for i, w in enumerate(self.weights):
            name = names[i] if i < len(names) else str(i)
            out[f"{prefix}weight_{name}"] = w
            if i < len(self.norms):  # a constant weighting forms no Gram: no norms
                out[f"{prefix}grad_norm_{name}"] = self.norms[i]
        if self.cos is not None:
            out[f"{prefix}cos"] = self.cos
        elif len(self.norms) > 2:  # K players: every pair's cosine (None-safe: zero gradients)
            for i in range(len(self.norms)):
                for j in range(i + 1, len(self.norms)):
                    ni, nj = self.norms[i], self.norms[j]
                    if ni > 0 and nj > 0 and math.isfinite(ni) and math.isfinite(nj):
                        a = names[i] if i < len(names) else str(i)
                        b = names[j] if j < len(names) else str(j)
                        out[f"{prefix}cos_{a}_{b}"] = self.gram[i][j] / (ni * nj)
        out[f"{prefix}fallback"] = float(self.status is not BargainingStatus.OK)
        for i, w in enumerate(self.powers or [1.0] * len(self.weights)):
            name = names[i] if i < len(names) else str(i)
            out[f"{prefix}power_{name}"] = w
        return out


class NashBargainer:
    """Combines per-player gradients of ``params`` into one update direction, in place.

    Usage, once per optimizer step (any number of micro-batches per player)::

        with bargainer.player(0) as scale:
            accelerator.backward(scale * retain_loss)
        with bargainer.player(1) as scale:
            accelerator.backward(scale * forget_loss)
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

    ``weighting`` (see :mod:`hf_munba.bargaining.combiners`): None is Nash bargaining with the
    settings above, a :class:`NashWeighting` brings its own. Any other weighting that needs the
    Gram matrix gets it and returns the weights. A weighting with ``needs_gram = False`` (the
    weighted sum, :class:`ConstantWeighting`) keeps no per-player buffers: ``player(i)`` yields
    its weight as the loss scale, so the front end's code is the same for every weighting
    (``scale`` is 1.0 for a bargained player) and every backward accumulates straight into
    ``.grad``. Such a step checks nothing itself: the shared step function skips it on non-finite
    losses or a non-finite clipped norm.
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
        weighting: Optional[Weighting] = None,
    ):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("NashBargainer got no parameters that require grad")
        if isinstance(weighting, NashWeighting):
            powers, opposed_tol = weighting.powers, weighting.opposed_tol
            fallback_player, weighting = weighting.fallback_player, None
        if weighting is not None and not isinstance(weighting, Weighting):
            raise TypeError(f"weighting must be a hf_munba Weighting, got {type(weighting).__name__}")
        self.weighting = weighting  # None: Nash bargaining with the settings below
        self.direct = weighting is not None and not weighting.needs_gram
        if self.direct:
            fixed = [float(x) for x in weighting()]
            if len(fixed) != num_players:
                raise ValueError(f"{weighting!r} has {len(fixed)} weights for {num_players} players")
            self._fixed = fixed
        if num_players < (1 if self.direct else 2):
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
    def player(self, index: int) -> Iterator[float]:
        """Backward passes inside this block accumulate into player ``index``'s gradient.

        Yields the scale to multiply the player's loss by: 1.0 when the gradient is kept apart
        and weighted in ``combine``, the player's weight for a constant weighting."""
        if not 0 <= index < self.num_players:
            raise ValueError(f"player index must be in [0, {self.num_players}), got {index}")
        if self._active is not None:
            raise RuntimeError("NashBargainer.player() blocks cannot be nested")
        if self.direct:
            self._active = index
            try:
                yield self._fixed[index]
            finally:
                self._active = None
            return
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
            yield 1.0
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

        ``powers`` overrides the bargainer's default powers for this step.

        If anything raises in here (bad ``powers``, a custom weighting, a device error), no
        gradient of this step survives: the player buffers are dropped and every ``.grad`` is
        set to None before the exception propagates, so the next step accumulates from zero
        (the buffers may be half-written by then, so they cannot be kept)."""
        if self._active is not None:
            raise RuntimeError("combine() called inside a player() block")
        if self.direct:
            powers = self.powers if powers is None else _check_powers(powers, self.num_players)
            self.num_steps += 1  # already summed, with the weights, by autograd
            return BargainStats(BargainingStatus.OK, list(self._fixed), [], [], None)
        try:
            return self._combine(grad_scale, powers)
        except BaseException:
            self.reset()
            for p in self.params:
                p.grad = None
            raise

    def _combine(self, grad_scale, powers) -> BargainStats:
        powers = self.powers if powers is None else _check_powers(powers, self.num_players)
        gram = self._gram()  # the step's one host sync
        if self.weighting is None:
            sol = solve_nash_bargaining(gram, powers=powers, opposed_tol=self.opposed_tol,
                                        fallback_player=self.fallback_player)
        else:
            sol = self.weighting.solution(gram)
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
        if self.direct:
            for p in self.params:
                p.grad = None

    def state_dict(self) -> dict:
        """The run counters, for checkpoints (the gradients never outlive a step)."""
        return {"num_steps": self.num_steps, "num_skipped": self.num_skipped,
                "num_fallbacks": self.num_fallbacks}

    def load_state_dict(self, state: dict) -> None:
        for k in ("num_steps", "num_skipped", "num_fallbacks"):
            setattr(self, k, int(state.get(k, 0)))



def _flat32(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1)
    return t if t.dtype in (torch.float32, torch.float64) else t.float()
