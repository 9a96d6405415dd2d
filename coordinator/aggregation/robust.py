"""Clipping each update's change to a bound that adapts to the round.

No absolute bound: the bound is ``multiple`` times the median change norm of the round's
updates so far, so it follows the model through training (large early, small late) and
one device can move the mean at most ``multiple`` times as far as a typical one.  An
update over the bound is scaled down onto it, never rejected: an honest outlier (little
or skewed data) still counts, with its direction intact.

The first ``warmup`` updates of a round are held until that many have arrived (or the
round closes) so the first bound is already a median; after that each update is clipped
as it arrives against the median of every norm seen so far.  Memory: the held updates,
``warmup`` x model (3 by default), plus one float per update.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np

from fedmpq.wire.messages import KIND_DELTA

log = logging.getLogger("fedmpq.coordinator")

State = dict[str, np.ndarray]

#: Default clip: 10x the median change norm of the round, the first 3 updates held back.
CLIP_MULTIPLE = 10.0
CLIP_WARMUP = 3


def change_norm(
    tensors: Mapping[str, np.ndarray], global_state: Mapping[str, np.ndarray], kind: str
) -> float:
    """L2 norm of the change an update proposes to the global model, in float64 (so
    finite float32 weights never overflow it; inf only for non-finite inputs)."""
    total = 0.0
    for name, w in tensors.items():
        change = w.astype(np.float64)
        if kind != KIND_DELTA:
            change -= global_state[name]
        total += float(np.dot(change.ravel(), change.ravel()))
    return math.sqrt(total)


def clip_change(
    tensors: Mapping[str, np.ndarray],
    global_state: Mapping[str, np.ndarray],
    kind: str,
    factor: float,
) -> State:
    """``tensors`` with their change to the global model scaled by ``factor`` (0..1)."""
    if kind == KIND_DELTA:
        return {n: (t.astype(np.float64) * factor).astype(np.float32) for n, t in tensors.items()}
    out = {}
    for name, t in tensors.items():
        g = global_state[name].astype(np.float64)
        out[name] = (g + factor * (t.astype(np.float64) - g)).astype(np.float32)
    return out


def clip_factor(norm: float, bound: float) -> float:
    """How much an update of change ``norm`` is scaled to fit ``bound`` (1: not at all)."""
    return 1.0 if norm <= bound else (bound / norm if norm > 0 else 1.0)


class AdaptiveClip:
    """Clips each update's change to ``multiple`` x the round's median change norm."""

    def __init__(
        self,
        global_state: Mapping[str, np.ndarray],
        kind: str,
        *,
        multiple: float = CLIP_MULTIPLE,
        warmup: int = CLIP_WARMUP,
    ) -> None:
        self.global_state = global_state
        self.kind = kind
        self.multiple = multiple
        self.warmup = max(warmup, 1)
        self.norms: list[float] = []
        self.clipped = 0  # updates scaled down this round
        self._held: list[tuple[State, float, float]] = []  # (tensors, weight, norm)
        self._warm = False

    def bound(self) -> float:
        """The current bound: ``multiple`` x the median of the norms seen so far."""
        return self.multiple * float(np.median(self.norms)) if self.norms else math.inf

    def add(self, tensors: State, weight: float, norm: float) -> list[tuple[State, float]]:
        """Take one update of change ``norm``; return the updates ready to fold in, clipped."""
        self.norms.append(norm)
        if self._warm:
            return [self._clipped(tensors, weight, norm)]
        self._held.append((tensors, weight, norm))
        return self.flush() if len(self._held) >= self.warmup else []

    def flush(self) -> list[tuple[State, float]]:
        """The held updates, clipped against the median of what arrived (the round closes,
        or the warm-up is over)."""
        held, self._held, self._warm = self._held, [], True
        return [self._clipped(t, w, n) for t, w, n in held]

    def _clipped(self, tensors: State, weight: float, norm: float) -> tuple[State, float]:
        bound = self.bound()
        factor = clip_factor(norm, bound)
        if factor >= 1.0:
            return tensors, weight
        self.clipped += 1
        log.info(
            "update change %.3g clipped to %.3g (%.0fx the median)", norm, bound, self.multiple
        )
        return clip_change(tensors, self.global_state, self.kind, factor), weight
