"""Checks an incoming device frame must pass before it can change anything.

Every failed check is counted by reason (``Rejections``) and logged; the engine then
drops the frame.  Robust-aggregation checks (sample caps, adaptive norm bounds) belong
here beside the fixed bound.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping

import numpy as np

from coordinator.aggregation import update_norm
from coordinator.round_state import RoundState
from fedmpq.wire.codec import Envelope, verify_envelope
from fedmpq.wire.messages import UpdateMessage

log = logging.getLogger("fedmpq.coordinator")

#: (reason, detail) of a rejected frame.
Problem = tuple[str, str]


class Rejections:
    """Frames turned away, counted by reason for the metrics rows and the checkpoint."""

    def __init__(self, counts: Mapping[str, int] | None = None) -> None:
        self.counts: Counter[str] = Counter(counts or {})

    def reject(self, reason: str, client_id: str | None, detail: str) -> None:
        self.counts[reason] += 1
        log.warning("rejected %s message from %s: %s", reason, client_id, detail)


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
    msg: UpdateMessage, client_id: str, rs: RoundState | None, run_id: str, update_kind: str
) -> Problem | None:
    """Why an update cannot be aggregated in the open round ``rs``, or None."""
    if msg.client_id != client_id:
        return "spoofed", f"update on {client_id}'s topic claims {msg.client_id!r}"
    if msg.run_id != run_id:
        return "wrong_run", f"run {msg.run_id!r}"
    if rs is None or msg.round != rs.round:
        return "stale", f"round {msg.round} is not open"
    if client_id not in rs.selected:
        return "unexpected", f"not selected for round {rs.round}"
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


def norm_problem(
    tensors: Mapping[str, np.ndarray],
    global_state: Mapping[str, np.ndarray],
    kind: str,
    bound: float,
) -> Problem | None:
    """``bound`` > 0: the update may move the model at most this far (L2)."""
    if bound <= 0:
        return None
    norm = update_norm(tensors, global_state, kind)
    if not norm <= bound:
        return "norm", f"update norm {norm:.3g} exceeds {bound:.3g}"
    return None
