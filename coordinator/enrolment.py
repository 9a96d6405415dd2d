"""What devices say about themselves: registrations and statuses.

A signed registration enrols its device at once; an unsigned one waits (in a bounded
backlog) until the device answers a liveness probe sent to its task topic, so a flood of
registrations from nowhere never reaches the registry.  A status updates the registry and
the open round (a device dropping out, or coming back for its task).
"""

from __future__ import annotations

import hmac
import logging
from collections import OrderedDict
from collections.abc import Callable

from coordinator.events import Outgoing
from coordinator.registry import Registry
from coordinator.round_state import RoundState
from coordinator.validation import Rejections
from fedmpq.topics import TASK
from fedmpq.wire.codec import DecodeLimits, Envelope, decode_body, encode
from fedmpq.wire.messages import NoticeMessage, RegisterMessage, StatusMessage

log = logging.getLogger("fedmpq.coordinator")

#: Unsigned registrations waiting for their liveness probe to be answered, at most.
MAX_PENDING_REGISTRATIONS = 4096


class Enrolment:
    """Registrations (with liveness probes for unsigned ones) and statuses of a run."""

    def __init__(
        self,
        run_id: str,
        registry: Registry,
        rejections: Rejections,
        limits: DecodeLimits,
        *,
        signed: bool,
        token: Callable[[int, str], str],
    ) -> None:
        self.run_id = run_id
        self.registry = registry
        self.rejections = rejections
        self.limits = limits
        self.signed = signed  # device keys configured: registrations carry signatures
        self.token = token
        # Unsigned registrations waiting for their probe to be answered, oldest first.
        self.pending: OrderedDict[str, RegisterMessage] = OrderedDict()

    def register(self, client_id: str | None, env: Envelope) -> list[Outgoing]:
        """A signed registration counts at once; an unsigned one once the device answers
        a liveness probe on its task topic (which an agent echoes in a status)."""
        msg = decode_body(env, RegisterMessage, self.limits)
        if msg.client_id != client_id:
            self.rejections.reject("spoofed", client_id, f"registers as {msg.client_id!r}")
            return []
        if self.signed:
            self._enroll(msg)
            return []
        self.pending.pop(msg.client_id, None)
        self.pending[msg.client_id] = msg
        if len(self.pending) > MAX_PENDING_REGISTRATIONS:
            dropped, _ = self.pending.popitem(last=False)
            self.rejections.reject("unproven", dropped, "registration never proved liveness")
        notice = NoticeMessage(self.run_id, msg.client_id, 0, self._probe(msg.client_id))
        return [Outgoing(TASK, msg.client_id, encode(notice))]

    def status(self, client_id: str | None, env: Envelope, rs: RoundState | None) -> list[Outgoing]:
        """Note a status in the registry and the open round ``rs``; return the task of a
        selected device that comes back for it."""
        status = decode_body(env, StatusMessage, self.limits)
        if status.client_id != client_id or self._probe_answered(status):
            return []
        verdict = self.registry.note_status(status)
        if verdict == "ignored":
            log.info(
                "ignored %s status of %s: not of its current connection, or older than its last",
                status.state,
                client_id,
            )
            return []
        if rs is None:
            return []
        rs.heard_from(status.client_id)
        if rs.note_gone(status):
            log.info("round %d: %s dropped out (%s)", rs.round, client_id, status.state)
        task = rs.welcome_back(status, reconnected=verdict == "connected")
        return [] if task is None else [Outgoing(TASK, client_id, task)]

    def _probe(self, client_id: str) -> str:
        return f"liveness probe {self.token(0, client_id)}"

    def _enroll(self, msg: RegisterMessage) -> None:
        self.registry.register(msg)
        log.info("registered %s (%d samples)", msg.client_id, msg.num_samples)

    def _probe_answered(self, status: StatusMessage) -> bool:
        """True if ``status`` answers a liveness probe (it then enrolls the device)."""
        if status.round != 0 or status.state != "rejected":
            return False
        if not hmac.compare_digest(status.detail, self._probe(status.client_id)):
            return False
        msg = self.pending.pop(status.client_id, None)
        if msg is not None:
            self._enroll(msg)
            # The answer came over the device's current connection: learn its nonce here,
            # as statuses sent before the device was enrolled were about no known device.
            self.registry.note_status(status)
        return True
