"""What a device checks before it reads anything the coordinator sent.

With a coordinator key enrolled (``fedmpq keys``), every frame a device receives must carry
the coordinator's Ed25519 signature, and its sequence must not be older than the last one
accepted on the same topic kind: nobody else can task, stop or feed a device, and nothing
captured can be played back after something newer.  Refusals are logged at most once per
reason per second, so a flood cannot fill the device's log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from fedmpq.errors import DecodeError
from fedmpq.wire.codec import DecodeLimits, decode_envelope, verify_coordinator

log = logging.getLogger("fedmpq.agent")


class RateLimitedLog:
    """Logs a warning per reason at most once per ``interval_s``, counting what it held back."""

    def __init__(self, interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self.counts: dict[str, int] = {}

    def warn(self, reason: str, message: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        now = self.clock()
        last = self._last.get(reason)
        if last is not None and now - last < self.interval_s:
            self._held[reason] = self._held.get(reason, 0) + 1
            return
        self._last[reason] = now
        held = self._held.pop(reason, 0)
        log.warning("%s%s", message, f" (and {held} more since the last)" if held else "")


class DownlinkCheck:
    """One device's check of coordinator frames: signature, then sequence per topic kind.

    ``public_key`` None: frames are not signed (no keys enrolled) and pass unchecked.
    """

    def __init__(self, public_key: bytes | None, refusals: RateLimitedLog) -> None:
        self.public_key = public_key
        self.refusals = refusals
        self.accepted: dict[str, int] = {}  # topic kind -> sequence of the last frame taken

    def admit(self, client_id: str, kind: str, payload: bytes, limits: DecodeLimits) -> bool:
        """True if the frame that arrived on ``kind`` may be read."""
        if self.public_key is None:
            return True
        try:
            env = decode_envelope(payload, limits)
        except DecodeError as exc:
            self.refusals.warn("malformed", f"{client_id}: refused {kind} frame: {exc}")
            return False
        seq = verify_coordinator(env, self.public_key)
        if seq is None:
            self.refusals.warn(
                "signature", f"{client_id}: refused {kind} frame: not signed by the coordinator"
            )
            return False
        last = self.accepted.get(kind, 0)
        if seq < last:
            self.refusals.warn(
                "replay", f"{client_id}: refused {kind} frame: older than one already accepted"
            )
            return False
        self.accepted[kind] = seq  # an equal one is the same frame again (QoS 1, retained)
        return True
