"""What the engine tracks while one round is open, and the metrics row it closes with."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil

from coordinator.aggregation import AggregationRule
from coordinator.resend import TaskResends
from fedmpq.policies import BitAllocation, ClientResult, LayerInfo
from fedmpq.wire.messages import StatusMessage, UpdateMessage

if TYPE_CHECKING:
    from coordinator.secure_round import SecureRound

Clock = Callable[[], float]
_PROCESS = psutil.Process()


@dataclass
class RoundState:
    """One open round: who was asked, what came back, and when it must close."""

    round: int
    fingerprint: str
    selected: dict[str, BitAllocation]
    rule: AggregationRule
    clock: Clock = time.monotonic
    # Measures offline_grace_s: the transport's time spent able to hear a device come
    # back (connected, with no backlog), not time lost while busy or cut off.
    grace_clock: Clock = time.monotonic
    accepted: dict[str, ClientResult] = field(default_factory=dict)
    uplink_bytes: int = 0
    emulated_s: float = 0.0
    # The models published (allocation key -> frame), for re-sending after a reconnect.
    model_frames: dict[str, bytes] = field(default_factory=dict)
    allocation_of: dict[str, str] = field(default_factory=dict)  # client id -> its key
    task_frames: dict[str, bytes] = field(default_factory=dict)
    # Link bytes by device as the broker delivers them: down = task (or notice) + model,
    # each as often as sent (re-sends count); up = accepted update; control_bytes = the
    # round's announcements x online devices.
    down_bytes: dict[str, int] = field(default_factory=dict)
    up_bytes: dict[str, int] = field(default_factory=dict)
    control_bytes: int = 0
    started: float = 0.0
    deadline: float = 0.0
    quorum_checked: bool = False  # the one retry for quorum was decided
    excluded: dict[str, str] = field(default_factory=dict)  # client id -> why
    dropped: dict[str, str] = field(default_factory=dict)  # selected, gone mid-round -> why
    # Selected devices whose last will arrived -> when; gone for good after the grace.
    offline_since: dict[str, float] = field(default_factory=dict)
    offline_grace_s: float = 0.0
    quorum_target: int = 0  # answers needed for the round to change the model
    # When to ask a selected device that has not answered again (never, unless set).
    resends: TaskResends = field(default_factory=lambda: TaskResends(math.inf))
    secure: SecureRound | None = None  # the round's secure aggregation, if the run has it

    def complete(self) -> bool:
        """Every selected device answered or is gone (offline past the grace counts)."""
        now = self.grace_clock()
        for client_id, since in list(self.offline_since.items()):
            if now - since >= self.offline_grace_s:
                del self.offline_since[client_id]
                self.dropped[client_id] = "offline"
        return len(self.accepted.keys() | self.dropped.keys()) == len(self.selected)

    def expired(self) -> bool:
        return self.clock() >= self.deadline

    def waiting(self) -> set[str]:
        """Selected devices the round still waits for: not answered, not gone, not offline
        (in their grace after a will: their reconnect brings their task again)."""
        gone = self.accepted.keys() | self.dropped.keys() | self.offline_since.keys()
        return set(self.selected) - gone

    def count_down(self, client_id: str, nbytes: int) -> None:
        """``nbytes`` more delivered to ``client_id`` this round: a task or a model, the
        first time or again (the broker counts every delivery, so do the rows)."""
        self.down_bytes[client_id] = self.down_bytes.get(client_id, 0) + nbytes

    def count_up(self, client_id: str, nbytes: int) -> None:
        """``nbytes`` more received from ``client_id`` this round (an update, or each step
        of a secure round)."""
        self.uplink_bytes += nbytes
        self.up_bytes[client_id] = self.up_bytes.get(client_id, 0) + nbytes

    def heard_from(self, client_id: str) -> None:
        """``client_id`` spoke for itself: wait longer before asking it again."""
        self.resends.heard(client_id, self.clock())

    def accept(self, msg: UpdateMessage, frame_bytes: int) -> None:
        """Record an aggregated update: its result for the policy and its cost."""
        allocation = self.selected[msg.client_id].bits
        sent_bits = {p.name: p.bits for p in msg.tensors if p.name in allocation}
        self.accepted[msg.client_id] = ClientResult(
            msg.client_id, msg.num_samples, sent_bits, dict(msg.bits_dropped), dict(msg.metrics)
        )
        # An update counts whatever was said of the device's liveness before it came.
        self.offline_since.pop(msg.client_id, None)
        self.dropped.pop(msg.client_id, None)
        self.count_up(msg.client_id, frame_bytes)
        self.emulated_s = max(self.emulated_s, msg.usage.emulated_seconds)

    def note_gone(self, status: StatusMessage) -> bool:
        """Stop waiting for a selected device that will not answer this round: it went
        offline (its last will, round 0, or a crash) or refused its task ("rejected") or
        failed it ("error").  A status about another round (a device announcing it will be
        away) does not count, nor one about a device whose update is aggregated.  True
        when the device was dropped now."""
        cid = status.client_id
        if status.state not in ("offline", "rejected", "error") or cid not in self.selected:
            return False
        current = status.round == self.round or (status.round == 0 and status.state == "offline")
        if not current or cid in self.accepted:
            return False
        if status.state == "offline":
            # A will also fires when the broker itself restarts: give the device the
            # grace to reconnect before the round stops waiting for it.
            self.offline_since.setdefault(cid, self.grace_clock())
            return False
        self.dropped[cid] = f"{status.state}: {status.detail}"
        return True

    def welcome_back(self, status: StatusMessage, *, reconnected: bool) -> bytes | None:
        """A selected device said it is online while the round is open: it is back, and
        no longer waited out (nor dropped, if it was dropped for going offline).  The task
        to send again if it ``reconnected`` (the broker may have lost the task or the
        update); the device answers a task it already answered with the same update,
        aggregated at most once."""
        cid = status.client_id
        if status.state != "online" or cid not in self.selected:
            return None
        self.offline_since.pop(cid, None)
        if self.dropped.get(cid) == "offline":
            del self.dropped[cid]
        task = self.task_frames.get(cid)
        if reconnected and task is not None and cid not in self.accepted:
            self.count_down(cid, len(task))
            return task
        return None


def metrics_row(
    rs: RoundState,
    layers: list[LayerInfo],
    evaluation: tuple[float, float],
    *,
    counted: bool,
    collected: float,
    rejected: dict[str, int],
) -> dict[str, Any]:
    """The metrics row of a closed round (``evaluation`` = loss, accuracy)."""
    loss, accuracy = evaluation
    return {
        "round": rs.round,
        "accuracy": accuracy,
        "loss": loss,
        "selected": len(rs.selected),
        "participants": sorted(rs.accepted),
        "counted": counted,
        "uplink_bytes": rs.uplink_bytes,
        "downlink_bytes": sum(rs.down_bytes.values()) + rs.control_bytes,
        "control_bytes": rs.control_bytes,
        "link_bytes": {
            cid: {"up": rs.up_bytes.get(cid, 0), "down": down}
            for cid, down in sorted(rs.down_bytes.items())
        },
        "client_bits": {cid: round_bits(rs.selected[cid], layers) for cid in sorted(rs.selected)},
        "client_metrics": {cid: dict(r.metrics) for cid, r in sorted(rs.accepted.items())},
        "round_seconds": rs.clock() - rs.started,
        # For soak tests: a leak shows as growth round over round.
        "coordinator_rss_bytes": _PROCESS.memory_info().rss,
        "coordinator_open_fds": _PROCESS.num_fds(),
        "collect_seconds": collected - rs.started,
        "emulated_seconds": rs.emulated_s,
        "rejected": rejected,
        "excluded": dict(rs.excluded),
        "dropped": dict(rs.dropped),
    }


def round_bits(allocation: BitAllocation, layers: list[LayerInfo]) -> float:
    """Parameter-weighted average bits of an allocation, rounded for the log."""
    return round(allocation.average_bits(layers), 3)
