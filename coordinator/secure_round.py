"""The secure-aggregation steps of one round at the coordinator, without a transport.

The task carries the round's :class:`~fedmpq.secagg.SecAggSetup`; the devices answer on
their update topic with the protocol's messages and the coordinator answers on their task
topics.  :class:`SecureRound` runs the steps on one
:class:`~fedmpq.secagg.SecureAggregation` (which only ever holds masked inputs and their
running sum): keys -> roster, shares -> forwarded shares, masked inputs -> unmasking
request, answers -> the unmasked sum.  A step closes when every device still expected at
it answered or is gone (``gone``: the round state's dropped devices), or at its deadline:
``step_s`` after it opened, the round's deadline for the masked inputs (they come after
local training).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from coordinator.events import Outgoing
from fedmpq.errors import DecodeError
from fedmpq.secagg import SecAggError, SecAggSetup, SecureAggregation, SecureSum
from fedmpq.secagg.messages import AdvertiseKeys, MaskedInput, ShareKeys, UnmaskResponse
from fedmpq.topics import TASK
from fedmpq.wire.codec import DecodeLimits, Envelope, Message, decode_body, encode
from fedmpq.wire.messages import SECAGG_UPLINK

log = logging.getLogger("fedmpq.coordinator")

Clock = Callable[[], float]
#: (reason, detail) of a rejected frame, as ``coordinator.validation.Problem``.
Problem = tuple[str, str]

KEYS, SHARES, MASKED, UNMASK, DONE = "keys", "shares", "masked", "unmask", "done"
#: The message each step waits for.
_EXPECTS: dict[str, type] = {
    KEYS: AdvertiseKeys,
    SHARES: ShareKeys,
    MASKED: MaskedInput,
    UNMASK: UnmaskResponse,
}


class SecureRound:
    """One round's secure aggregation: steps, their deadlines and the frames they send.

    Parameters
    ----------
    setup
        The round's setup, as the tasks carry it.
    step_s
        How long a key, share or unmasking step waits.
    round_deadline
        When the masked inputs stop being waited for (clock time).
    clock
        The engine's clock.
    """

    def __init__(
        self, setup: SecAggSetup, step_s: float, round_deadline: float, clock: Clock
    ) -> None:
        self.setup = setup
        self.step_s = step_s
        self.round_deadline = round_deadline
        self.clock = clock
        self.server = SecureAggregation(setup)
        self.step = KEYS
        self.opened = clock()
        self.deadline = self.opened + step_s
        self.expected: set[str] = set(setup.client_ids)  # who the open step waits for
        self.answered: set[str] = set()
        self.counts: dict[str, int] = {}  # devices that answered each closed step
        self.step_seconds: dict[str, float] = {}
        self.sent: dict[str, list[bytes]] = defaultdict(list)  # frames per device, to resend
        self.result: SecureSum | None = None
        self.failure = ""

    @property
    def finished(self) -> bool:
        """The sum is unmasked, or the round cannot be aggregated securely."""
        return self.step == DONE

    def receive(
        self, client_id: str, env: Envelope, limits: DecodeLimits, gone: Iterable[str]
    ) -> tuple[list[Outgoing], Problem | None]:
        """Take a device's protocol message; the frames of the step it closed, if any."""
        msg: Any = decode_body(env, None, limits)
        if type(msg) not in SECAGG_UPLINK:
            return [], ("kind", f"{env.type} is not a secure-aggregation answer")
        if msg.client_id != client_id:
            return [], ("spoofed", f"{env.type} on {client_id}'s topic claims {msg.client_id!r}")
        if self.step == DONE or type(msg) is not _EXPECTS[self.step]:
            return [], ("secagg", f"{env.type} does not answer the open step ({self.step})")
        try:
            self._add(msg)
        except (SecAggError, DecodeError) as exc:
            return [], ("secagg", str(exc))
        self.answered.add(client_id)
        return self.tick(gone), None

    def tick(self, gone: Iterable[str]) -> list[Outgoing]:
        """Close the open step if nobody else is expected at it or its deadline passed."""
        if self.step == DONE:
            return []
        waiting = self.expected - self.answered - set(gone)
        if waiting and self.clock() < self.deadline:
            return []
        try:
            return self._close()
        except SecAggError as exc:
            self.failure = f"{self.step}: {exc}"
            log.warning("round %d: secure aggregation failed at %s", self.setup.round, exc)
            self._next(DONE, set(), 0.0)
            return []

    def _add(self, msg: object) -> None:
        if isinstance(msg, AdvertiseKeys):
            self.server.add_keys(msg)
        elif isinstance(msg, ShareKeys):
            self.server.add_shares(msg)
        elif isinstance(msg, MaskedInput):
            self.server.add_masked_input(msg)
        elif isinstance(msg, UnmaskResponse):
            self.server.add_unmask_response(msg)

    def _close(self) -> list[Outgoing]:
        """The next step's frames (:class:`SecAggError` if too few devices are left)."""
        now = self.clock()
        if self.step == KEYS:
            roster = self.server.roster()
            members = {k.client_id for k in roster.keys}
            self._next(SHARES, members, now + self.step_s)
            return self._to(members, lambda cid: roster)
        if self.step == SHARES:
            inboxes = {inbox.client_id: inbox for inbox in self.server.forward_shares()}
            self._next(MASKED, set(inboxes), max(self.round_deadline, now + self.step_s))
            return self._to(inboxes, inboxes.__getitem__)
        if self.step == MASKED:
            request = self.server.unmask_request()
            self._next(UNMASK, set(request.survivors), now + self.step_s)
            return self._to(request.survivors, lambda cid: request)
        self.result = self.server.result()
        self._next(DONE, set(), 0.0)
        return []

    def _next(self, step: str, expected: set[str], deadline: float) -> None:
        now = self.clock()
        self.counts[self.step] = len(self.answered)
        self.step_seconds[self.step] = now - self.opened
        self.step, self.expected, self.deadline = step, expected, deadline
        self.answered = set()
        self.opened = now

    def _to(self, devices: Iterable[str], message: Callable[[str], Message]) -> list[Outgoing]:
        out = []
        for cid in sorted(devices):
            frame = encode(message(cid))
            self.sent[cid].append(frame)
            out.append(Outgoing(TASK, cid, frame))
        return out

    def resend(self) -> list[Outgoing]:
        """Everything sent to each device this round, in order (after a reconnect); a
        device answers a question it answered with the same answer."""
        return [Outgoing(TASK, cid, f) for cid, frames in self.sent.items() for f in frames]

    def summary(self) -> dict[str, Any]:
        """For the metrics row: devices per step, step times, and why it failed if it did."""
        return {
            "devices": len(self.setup.client_ids),
            "threshold": self.setup.threshold,
            "answered": dict(self.counts),
            "step_seconds": dict(self.step_seconds),
            "failure": self.failure,
        }
