"""What binds an emulated device to its profile (``fedmpq.profiles``), not the host's.

:class:`ProfileBinding` holds the rules and the seeded draws, without I/O or training;
``edge_client.emulated_device.EmulatedDevice`` applies them around a real device.

* **Reported profile** -- it registers with the profile's RAM, cores, GFLOPS, links and
  name, never the host's (:meth:`ProfileBinding.reported_profile`).
* **Memory** -- a task is fitted into the profile's free RAM (RAM minus the OS share) by
  the same function a real device applies to its measured free RAM
  (``edge_client.memory.fit_batch_size``).
* **Time** -- compute time is the host's CPU time for the task stretched by
  ``host_gflops / profile_gflops`` (the host's figure from the same matmul probe a real
  device runs), or, with ``compute_time="analytic"``, the task's FLOP count at the
  profile's GFLOPS (``fedmpq.resources.training_seconds``: repeatable, blind to host
  load, but blind to framework overhead too); each transfer takes
  ``latency + bytes / bandwidth`` (``fedmpq.resources.transfer_seconds``).
  The sum is reported as ``ResourceUsage.emulated_seconds``; the coordinator logs the
  round's maximum beside real time.  Nothing waits unless ``realtime`` is set: then the
  update is held back until the emulated time has passed.
* **Churn** -- availability is a two-state Markov chain stepped once per round: an
  online device goes offline with probability ``1 / mean_session_rounds``; an offline
  one comes back with the probability that makes ``online_probability`` its long-run
  share.  Round *r+1*'s state is drawn when round *r*'s global model arrives and, if it
  changes, announced at once with a status message for round *r+1*, so the coordinator
  (which selects only online devices) knows before it selects.  Every device is online
  for round 1: it has just registered.  An offline device that is sent a task anyway
  ignores it, as a powered-off board would.
* **Crashes** -- with ``crash_probability`` per task the device drops the task without
  answering and publishes ``offline`` for that round, as the broker would publish a
  crashed board's last will; the coordinator stops waiting for it.  It reboots (comes
  back online) at the next round's draw.

Draws come from two seeded streams per device (churn, crashes), so a run is repeatable
and the coordinator's choice of whom to select does not shift the churn sequence.
"""

from __future__ import annotations

import random
import resource
from dataclasses import dataclass, field

from fedmpq.errors import ConfigError
from fedmpq.profiles import ANALYTIC, COMPUTE_TIMES, MEASURED, DeviceProfileSpec
from fedmpq.resources import ModelCost, training_seconds, transfer_seconds
from fedmpq.wire.messages import DeviceProfile


@dataclass
class ProfileBinding:
    """Profile-bound behaviour of one emulated device (see the module docstring)."""

    spec: DeviceProfileSpec
    host_gflops: float
    seed: str
    realtime: bool = False
    compute_time: str = MEASURED  # how compute time is emulated: MEASURED or ANALYTIC
    online: bool = True  # this round's state
    announced_online: bool = True  # what the coordinator was last told
    round_seen: int = 0
    downlink_bytes: int = 0  # received for the current round: announcement, task, model
    _churn: random.Random = field(init=False, repr=False)
    _crash: random.Random = field(init=False, repr=False)
    _next_online: bool = field(init=False, repr=False)  # next round's state, drawn ahead

    def __post_init__(self) -> None:
        if self.compute_time not in COMPUTE_TIMES:
            raise ConfigError(f"compute time {self.compute_time!r}: use one of {COMPUTE_TIMES}")
        # String seeds hash deterministically (unlike hash()), across processes and runs.
        self._churn = random.Random(f"churn:{self.seed}")
        self._crash = random.Random(f"crash:{self.seed}")
        self._next_online = True

    def reported_profile(self) -> DeviceProfile:
        """The profile this device registers with: its spec's figures, not the host's."""
        s = self.spec
        return DeviceProfile(
            total_ram=s.ram_bytes,
            available_ram=s.free_ram_bytes,
            cpu_count=int(s.cores.value),
            cpu_freq_mhz=s.cpu_freq_mhz.value,
            load_avg=0.0,
            gflops=s.gflops.value,
            platform="linux",
            arch=s.arch,
            uplink_bps=s.uplink_mbps.value * 1e6,
            downlink_bps=s.downlink_mbps.value * 1e6,
            latency_s=s.latency_ms.value / 1e3,
            profile_name=s.name,
        )

    @property
    def available_ram(self) -> int:
        """Bytes a task may use: the profile's RAM minus its operating system's share."""
        return self.spec.free_ram_bytes

    # --- churn and crashes -------------------------------------------------------------
    def open_round(self, round: int, global_bytes: int) -> bool | None:
        """Round ``round`` was announced (``global_bytes`` long).

        Steps the availability chain to round ``round + 1`` and returns the state to
        announce for it (True online, False offline), or None if the coordinator already
        knows it.  Calls for a round already seen return None and change nothing.
        """
        if round <= self.round_seen:
            return None
        self.round_seen = round
        self.downlink_bytes = global_bytes
        # This round's state was announced during the previous round.
        if round > 1:
            self.online = self._next_online
        self._next_online = self._step(self.online)
        if self._next_online == self.announced_online:
            return None
        self.announced_online = self._next_online
        return self._next_online

    def _step(self, online: bool) -> bool:
        p = self.spec.online_probability.value
        session = self.spec.mean_session_rounds.value
        if online:
            return self._churn.random() >= 1.0 / session
        comeback = 1.0 if p >= 1.0 else p / (1.0 - p) / session
        return self._churn.random() < comeback

    def task_received(self, nbytes: int) -> None:
        self.downlink_bytes += nbytes

    def crashes(self) -> bool:
        """Draw whether this device crashes during the task it just received."""
        crashed = self._crash.random() < self.spec.crash_probability.value
        if crashed:
            self.announced_online = False  # its last will says offline
        return crashed

    # --- time ---------------------------------------------------------------------------
    def compute_seconds(
        self, host_seconds: float, cost: ModelCost, samples: int, epochs: int
    ) -> float:
        """The profiled device's compute time for a task the host ran in ``host_seconds``.

        ``measured``: the host's time stretched by host/profile GFLOPS.  ``analytic``:
        the task's FLOP count at the profile's GFLOPS, independent of the host's load.
        """
        if self.compute_time == ANALYTIC:
            return training_seconds(cost, samples, epochs, self.spec.gflops.value)
        return host_seconds * self.host_gflops / self.spec.gflops.value

    def emulated_seconds(self, compute_s: float, uplink_bytes: int) -> float:
        """Compute plus transfer time of this round on the profiled device.

        Downlink is what arrived this round (global model and task), uplink the update.
        """
        return round_seconds(self.spec, compute_s, self.downlink_bytes, uplink_bytes)


def round_seconds(
    spec: DeviceProfileSpec, compute_s: float, downlink_bytes: int, uplink_bytes: int
) -> float:
    """A round on ``spec``'s device: receive ``downlink_bytes``, compute for
    ``compute_s``, send ``uplink_bytes``; each transfer pays the link latency once."""
    latency = spec.latency_ms.value / 1e3
    return (
        transfer_seconds(downlink_bytes, spec.downlink_mbps.value * 1e6, latency)
        + compute_s
        + transfer_seconds(uplink_bytes, spec.uplink_mbps.value * 1e6, latency)
    )


def raise_fd_limit(needed: int) -> int:
    """Raise this process's soft open-file limit towards ``needed`` (capped by the hard
    limit): a process hosting hundreds of devices holds a socket for each.  Returns the
    soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft
