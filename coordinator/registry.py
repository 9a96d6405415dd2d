"""The device registry: who is there, what they can do, whether they are connected.

Liveness comes from the device's connection: every status a device sends carries the
nonce of the MQTT connection it was sent over, and its last will carries the same one
(``StatusMessage.connection``).  A status of an earlier connection (a replayed will) or one
older than the newest seen over the current connection (a replay) is ignored; only the
broker publishes a connection's will, and only once that connection is gone.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from fedmpq.wire.messages import STATUS_CONNECTED, DeviceProfile, RegisterMessage, StatusMessage

log = logging.getLogger("fedmpq.coordinator")

#: What a status meant to the registry: ignored (not about the device's current
#: connection), noted, or the first word of a new connection (the device reconnected).
StatusVerdict = Literal["ignored", "noted", "connected"]


@dataclass
class DeviceRecord:
    client_id: str
    profile: DeviceProfile
    num_samples: int
    accepts_zstd: bool
    online: bool = True
    last_seen: float = 0.0
    # Said itself that it is unavailable (a status for a round, e.g. churn or a crash),
    # rather than lost its connection (its last will): not waited for.
    away: bool = False
    data_fingerprint: str = ""
    connection: str = ""  # nonce of the device's current connection ("" = not known yet)
    status_at: float = 0.0  # sent_at of the newest status seen over that connection


def is_will(status: StatusMessage) -> bool:
    """A connection's last will (also what a device says when it shuts down untrained)."""
    return status.state == "offline" and status.round == 0


class Registry:
    """Latest registration and liveness of every device seen in this run."""

    def __init__(self) -> None:
        self.devices: dict[str, DeviceRecord] = {}

    def register(self, msg: RegisterMessage) -> DeviceRecord:
        known = self.devices.get(msg.client_id)
        record = DeviceRecord(
            msg.client_id, msg.profile, msg.num_samples, msg.accepts_zstd, True, time.time()
        )
        record.data_fingerprint = msg.data_fingerprint
        if known is not None:  # a re-registration does not start a new connection
            record.connection, record.status_at = known.connection, known.status_at
        self._warn_shared_data(record)
        self.devices[msg.client_id] = record
        return record

    def _warn_shared_data(self, record: DeviceRecord) -> None:
        fp = record.data_fingerprint
        twins = [
            d.client_id
            for d in self.devices.values()
            if fp and d.data_fingerprint == fp and d.client_id != record.client_id
        ]
        if twins:
            log.warning(
                "%s trains on the same data as %s (data fingerprint %s): give each agent its"
                " own share (--partition-index)",
                record.client_id,
                ", ".join(sorted(twins)),
                fp,
            )

    def note_status(self, status: StatusMessage) -> StatusVerdict:
        """Record the liveness ``status`` reports, unless it is not about the device's
        current connection (see the module docstring)."""
        record = self.devices.get(status.client_id)
        if record is None:
            return "noted"
        new = status.connection != record.connection
        if record.connection:
            if not new and status.sent_at < record.status_at and not is_will(status):
                return "ignored"  # a replay of an older status of this connection
            # A device whose will arrived may come back with any clock (a board that
            # rebooted without a real-time clock); an online one only with a newer status.
            newer = not record.online or status.sent_at >= record.status_at
            if new and not (status.connection and status.state == "online" and newer):
                return "ignored"  # of an earlier connection, or without the nonce it uses
        # The first nonce learned is no reconnect: the device said so when it registered.
        # Agents that send no nonce announce a reconnect in the detail instead.
        legacy_connect = not status.connection and status.detail == STATUS_CONNECTED
        reconnect = new and bool(record.connection)
        connected = status.state == "online" and (reconnect or legacy_connect)
        record.status_at = status.sent_at if new else max(record.status_at, status.sent_at)
        record.connection = status.connection
        record.online = status.state != "offline"
        record.away = not record.online and status.round > 0
        record.last_seen = time.time()
        return "connected" if connected else "noted"

    def note_update(self, client_id: str) -> None:
        """An accepted update: the device is there, whatever its last will said. After a
        broker restart the will of the broken connection can arrive after the device's
        update and before its new connection's status; the next round must not leave
        out a device that has just answered."""
        record = self.devices.get(client_id)
        # Not one that announced it will be away (churn): that word is about later rounds.
        if record is not None and not record.away:
            record.online = True
            record.last_seen = time.time()

    def accounted_for(self) -> list[DeviceRecord]:
        """Devices online or away by their own word: everyone not lost to a broken link."""
        return [d for d in self.devices.values() if d.online or d.away]

    def online(self) -> list[DeviceRecord]:
        return [d for d in self.devices.values() if d.online]

    def select(
        self,
        count: int,
        rng: random.Random,
        *,
        silent: Collection[str] = (),
        proven: Collection[str] = (),
    ) -> list[DeviceRecord]:
        """``count`` online devices at random (all when 0 or too many), leaving out the
        ``silent`` ones (asked before, never answered nor spoke since), and with at least
        half the places kept for ``proven`` devices (that answered a task before), if there
        are any: a flood of registrations from devices that never answer cannot fill a round."""
        candidates = sorted(
            (d for d in self.online() if d.client_id not in silent), key=lambda d: d.client_id
        )
        if count <= 0 or count >= len(candidates):
            return candidates
        trusted = [d for d in candidates if d.client_id in proven]
        reserved = min(len(trusted), math.ceil(count / 2))
        if reserved == 0 or len(trusted) == len(candidates):
            return sorted(rng.sample(candidates, count), key=lambda d: d.client_id)
        chosen = rng.sample(trusted, reserved)
        rest = [d for d in candidates if d not in chosen]
        chosen += rng.sample(rest, count - reserved)
        return sorted(chosen, key=lambda d: d.client_id)
