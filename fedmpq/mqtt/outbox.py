"""What a connection still owes the broker: messages held while it is down, and QoS 1
messages sent but not yet acknowledged."""

from __future__ import annotations

import threading
from collections import deque

#: A message to publish: ``(topic, payload, qos, retain)``.
Message = tuple[str, bytes, int, bool]


class Outbox:
    """Held and unacknowledged messages of one connection, and whether there are none.

    Changed on the loop thread only; :attr:`idle` may be waited on from any thread.
    """

    def __init__(self) -> None:
        self._held: deque[Message] = deque()
        self._unacked: set[int] = set()  # mids of QoS 1 PUBLISHes awaiting their PUBACK
        self.idle = threading.Event()  # set while nothing is held or unacknowledged
        self.idle.set()

    def hold(self, message: Message) -> None:
        """Keep a message until the connection is up."""
        self._held.append(message)
        self.idle.clear()

    def take_held(self) -> deque[Message]:
        """The held messages, oldest first; the outbox keeps none of them."""
        held, self._held = self._held, deque()
        return held

    def sent(self, mid: int) -> None:
        """Track a QoS 1 PUBLISH until the broker acknowledges it."""
        self._unacked.add(mid)

    def acked(self, mid: int) -> None:
        """The broker acknowledged the PUBLISH with this message id."""
        self._unacked.discard(mid)
        self.update_idle()

    def update_idle(self) -> None:
        """Set :attr:`idle` if nothing is held or unacknowledged, else clear it."""
        if self._held or self._unacked:
            self.idle.clear()
        else:
            self.idle.set()
