"""The device registry: who is there, what they can do, whether they are online."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from fedmpq.wire.messages import DeviceProfile, RegisterMessage


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


class Registry:
    """Latest registration and liveness of every device seen in this run."""

    def __init__(self) -> None:
        self.devices: dict[str, DeviceRecord] = {}

    def register(self, msg: RegisterMessage) -> DeviceRecord:
        record = DeviceRecord(
            msg.client_id, msg.profile, msg.num_samples, msg.accepts_zstd, True, time.time()
        )
        self.devices[msg.client_id] = record
        return record

    def set_online(self, client_id: str, online: bool, *, announced: bool = False) -> None:
        """Record liveness; ``announced``: the device itself said so (not its will)."""
        record = self.devices.get(client_id)
        if record is not None:
            record.online = online
            record.away = not online and announced
            record.last_seen = time.time()

    def accounted_for(self) -> list[DeviceRecord]:
        """Devices online or away by their own word: everyone not lost to a broken link."""
        return [d for d in self.devices.values() if d.online or d.away]

    def online(self) -> list[DeviceRecord]:
        return [d for d in self.devices.values() if d.online]

    def select(self, count: int, rng: random.Random) -> list[DeviceRecord]:
        """``count`` online devices at random (all of them when count is 0 or too large)."""
        candidates = sorted(self.online(), key=lambda d: d.client_id)
        if count <= 0 or count >= len(candidates):
            return candidates
        return sorted(rng.sample(candidates, count), key=lambda d: d.client_id)
