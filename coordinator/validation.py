"""Checks an incoming device frame must pass before it can change anything.

Every failed check is counted by reason (``Rejections``) and logged; the engine then
drops the frame.  Robust aggregation: an update weighs at most the samples its device
registered (:func:`update_weight`), its change is clipped by the rule
(``coordinator.aggregation.robust``), and a round whose aggregate is non-finite or moves
the model much further than recent rounds did is discarded (:class:`MoveGuard`).
"""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping

import numpy as np

from coordinator.aggregation import change_norm
from coordinator.round_state import RoundState
from fedmpq.wire.codec import Envelope, verify_envelope
from fedmpq.wire.messages import KIND_WEIGHTS, UpdateMessage

log = logging.getLogger("fedmpq.coordinator")

#: (reason, detail) of a rejected frame.
Problem = tuple[str, str]


class Rejections:
    """Frames turned away, counted by reason for the metrics rows and the checkpoint.

    Each is counted; a reason is logged at most once per ``log_interval_s`` (with how many
    of that reason went unlogged since), so a flood cannot fill the log or stall the
    coordinator on writing it.
    """

    def __init__(
        self,
        counts: Mapping[str, int] | None = None,
        *,
        log_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.counts: Counter[str] = Counter(counts or {})
        self.log_interval_s = log_interval_s
        self.clock = clock
        self._logged_at: dict[str, float] = {}
        self._unlogged: Counter[str] = Counter()

    def reject(self, reason: str, client_id: str | None, detail: str) -> None:
        self.counts[reason] += 1
        now = self.clock()
        last = self._logged_at.get(reason)
        if last is not None and now - last < self.log_interval_s:
            self._unlogged[reason] += 1
            return
        self._logged_at[reason] = now
        more = self._unlogged.pop(reason, 0)
        also = f" (and {more} more {reason} since the last)" if more else ""
        log.warning("rejected %s message from %s: %s%s", reason, client_id, detail, also)


def signature_problem(
    keyring: Mapping[str, bytes] | None, client_id: str | None, env: Envelope
) -> Problem | None:
    """With device keys configured, a device's frame must be signed with its own key."""
    if keyring is None:
        return None
    key = keyring.get(client_id or "")
    if key is None:
        return "unknown_device", "no key enrolled for this device"
    if not verify_envelope(env, key):
        return "bad_signature", "signature does not match the device key"
    return None


def update_problem(
    msg: UpdateMessage,
    client_id: str,
    rs: RoundState | None,
    run_id: str,
    update_kind: str,
    token: Callable[[int, str], str],
) -> Problem | None:
    """Why an update cannot be aggregated in the open round ``rs``, or None (``token``:
    the token of a device's task in a round, which its update must echo)."""
    if msg.client_id != client_id:
        return "spoofed", f"update on {client_id}'s topic claims {msg.client_id!r}"
    if msg.run_id != run_id:
        return "wrong_run", f"run {msg.run_id!r}"
    if rs is None or msg.round != rs.round:
        return "stale", f"round {msg.round} is not open"
    if client_id not in rs.selected:
        return "unexpected", f"not selected for round {rs.round}"
    if not hmac.compare_digest(msg.token, token(rs.round, client_id)):
        return "token", "does not echo the token of the device's task"
    if client_id in rs.accepted:
        return "duplicate", f"already aggregated for round {rs.round}"
    if msg.model_fingerprint != rs.fingerprint:
        return "fingerprint", "trained from another global model"
    if msg.kind != update_kind:
        return "kind", f"sent {msg.kind}, policy wants {update_kind}"
    if msg.num_samples <= 0:
        return "samples", "num_samples must be positive"
    assigned = rs.selected[client_id].bits
    for p in msg.tensors:
        if p.name in assigned and p.bits > assigned[p.name]:
            return "bits", f"{p.name} at {p.bits} bits, assigned {assigned[p.name]}"
    return None


def shape_problem(
    tensors: Mapping[str, np.ndarray], global_state: Mapping[str, np.ndarray]
) -> Problem | None:
    shapes = {name: w.shape for name, w in tensors.items()}
    if shapes != {name: w.shape for name, w in global_state.items()}:
        return "shape", "tensor names or shapes differ from the model"
    return None


def norm_problem(norm: float, bound: float) -> Problem | None:
    """An update whose change is not finite never counts; ``bound`` > 0: nor one that would
    move the model further than ``bound`` (L2)."""
    if not math.isfinite(norm):
        return "norm", "the update's change to the model is not finite"
    if bound > 0 and norm > bound:
        return "norm", f"update norm {norm:.3g} exceeds {bound:.3g}"
    return None


def update_weight(msg: UpdateMessage, registered_samples: int) -> float:
    """An update's weight in the mean: its sample count, at most what its device registered
    (a device cannot outweigh the fleet by claiming more data than it enrolled with)."""
    return float(min(msg.num_samples, max(registered_samples, 1)))


class MoveGuard:
    """Discards a round whose aggregate is not finite or moves the model more than
    ``multiple`` x the median move of the last ``history`` counted rounds.

    The bound doubles with every round discarded in a row (and resets when one counts),
    so an honest fleet whose model legitimately starts moving faster (a new allocation, new
    devices) is held up a few rounds at most, never locked out; a poisoned aggregate many
    orders of magnitude off stays out.  ``multiple`` 0: only the finiteness check.
    """

    def __init__(self, multiple: float, history: int = 5) -> None:
        self.multiple = multiple
        self.moves: deque[float] = deque(maxlen=history)
        self.discarded_in_a_row = 0

    def bound(self) -> float:
        if self.multiple <= 0 or not self.moves:
            return math.inf
        return self.multiple * 2.0**self.discarded_in_a_row * float(np.median(self.moves))

    def check(
        self, new_state: Mapping[str, np.ndarray], global_state: Mapping[str, np.ndarray]
    ) -> Problem | None:
        """None if ``new_state`` may replace ``global_state`` (and remember its move)."""
        finite = all(np.isfinite(w).all() for w in new_state.values())
        move = change_norm(new_state, global_state, KIND_WEIGHTS) if finite else math.inf
        bound = self.bound()
        if not finite or not move <= bound:
            self.discarded_in_a_row += 1
            if not finite:
                return "aggregate", "the aggregate is not finite: round discarded"
            return "aggregate", f"the aggregate moves {move:.3g}, over {bound:.3g}: discarded"
        self.discarded_in_a_row = 0
        self.moves.append(move)
        return None
