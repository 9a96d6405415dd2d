"""When to ask a silent selected device again for its update.

A task and an update are QoS 1 messages, but a broker may still drop one under load (its
per-client queue is bounded: a flood on the coordinator's topics overflows it) and a
device does not say when it got a task: it answers with its update, or not at all.  So
the coordinator asks a selected device that has neither answered nor been heard from
again, with exponential backoff: the first time after ``round_deadline_s / 8``, then
after twice as long each time, at most :data:`MAX_TASK_RESENDS` times and never at or
after the deadline (with the default 300 s deadline: at 37.5, 112.5 and 262.5 s).  A
device that already answered sends the same update again; one still training ignores
the task.  Hearing from a device (any valid frame of it) postpones its next re-send by
the current interval: it is there, and a reconnect already gets it its task again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

#: A silent device is asked again at most this many times per round.
MAX_TASK_RESENDS = 3
#: The first re-send waits this fraction of the round deadline; each next one twice as long.
FIRST_RESEND_FRACTION = 1 / 8


@dataclass
class TaskResends:
    """The re-send schedule of one round's tasks (times on the round's clock)."""

    first_after_s: float
    limit: int = MAX_TASK_RESENDS
    due: dict[str, float] = field(default_factory=dict)  # client id -> next re-send
    sent: dict[str, int] = field(default_factory=dict)  # client id -> re-sends so far

    @classmethod
    def for_deadline(cls, round_deadline_s: float) -> TaskResends:
        return cls(first_after_s=round_deadline_s * FIRST_RESEND_FRACTION)

    def interval(self, client_id: str) -> float:
        """How long ``client_id`` is given before it is asked (again)."""
        return self.first_after_s * 2.0 ** self.sent.get(client_id, 0)

    def arm(self, client_ids: Iterable[str], now: float) -> None:
        """Tasks went out to ``client_ids`` at ``now``: schedule their first re-send."""
        for cid in client_ids:
            self.sent.setdefault(cid, 0)
            self.due[cid] = now + self.interval(cid)

    def heard(self, client_id: str, now: float) -> None:
        """``client_id`` was heard from at ``now``: wait its current interval again."""
        if client_id in self.due:
            self.due[client_id] = now + self.interval(client_id)

    def take_due(self, now: float, waiting: set[str], deadline: float) -> list[str]:
        """The devices of ``waiting`` to ask again now (sorted), counted as asked; a device
        past its last re-send, or not waited for any more, leaves the schedule."""
        for cid in set(self.due) - waiting:
            del self.due[cid]
        if now >= deadline:
            return []
        asked = sorted(cid for cid, at in self.due.items() if at <= now)
        for cid in asked:
            self.sent[cid] += 1
            if self.sent[cid] >= self.limit:
                del self.due[cid]
            else:
                self.due[cid] = now + self.interval(cid)
        return asked
